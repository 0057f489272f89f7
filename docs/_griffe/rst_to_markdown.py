"""Griffe extension used by the docs build only: render reStructuredText bits as Markdown.

Some docstrings use reStructuredText: roles (``:class:`~sparsegan.masks.MaskedWeights```), the
``Example::`` literal-block marker, hyperlinks (```text <url>`_``) and simple tables
(``=====  =====`` rules; a row with a blank first column continues the row above).
mkdocstrings renders Markdown, where those appear verbatim. This extension rewrites them, at
build time only, to inline code (``MaskedWeights``), a plain colon, Markdown links and Markdown
tables. The package's source files are not touched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")
_LITERAL = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)
_RULE = re.compile(r"^ *=+( +=+)+ *$")
_LINK = re.compile(r"(?<!`)`([^`<>]+?)\s*<([^`<>]+)>`__?")


def _role(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2).strip()
    if short:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _tables(text: str) -> str:
    """Rewrite reST simple tables (rule, header, rule, rows, rule) as Markdown tables."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        end = i + 2
        if _RULE.match(lines[i]) and end < len(lines) and lines[end] == lines[i]:
            close = next((j for j in range(end + 1, len(lines)) if lines[j] == lines[i]), None)
            if close is not None:
                starts = [m.start() for m in re.finditer(r"=+", lines[i])]

                def cells(row: str, starts: list[int] = starts) -> list[str]:
                    bounds = zip(starts, [*starts[1:], None])
                    return [row[a:b].strip().replace("|", "\\|") for a, b in bounds]

                rows: list[list[str]] = []
                for row in lines[end + 1:close]:
                    if not row.strip():
                        continue
                    values = cells(row)
                    if rows and not values[0]:  # a blank first column continues the row above
                        rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], values)]
                    else:
                        rows.append(values)
                out.append("| " + " | ".join(cells(lines[i + 1])) + " |")
                out.append("|" + " --- |" * len(starts))
                out += ["| " + " | ".join(row) + " |" for row in rows]
                i = close + 1
                continue
        out.append(lines[i])
        i += 1
    return "\n".join(out)


def convert(text: str) -> str:
    """Return ``text`` with roles as inline code, links, ``::`` as ``:`` and simple tables in Markdown."""
    return _tables(_LITERAL.sub(r"\1:", _ROLE.sub(_role, _LINK.sub(r"[\1](\2)", text))))


class RestToMarkdown(griffe.Extension):
    """Rewrite the reStructuredText bits of every docstring as Markdown."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
