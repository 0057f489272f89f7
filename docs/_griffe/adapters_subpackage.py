"""Griffe extension used by the docs build only: document ``adapters/`` as ``sparsegan.adapters``.

The repository keeps the adapters in a top-level ``adapters/`` folder, which ``pyproject.toml``
installs as the ``sparsegan.adapters`` subpackage (``[tool.setuptools.package-dir]``). Griffe
reads the sources from the repository root and cannot see that mapping, so ``:::
sparsegan.adapters.mimicry`` would not be found. When the ``sparsegan`` package is loaded, this
extension loads the ``adapters`` folder with the same loader (same docstring parser and
extensions) and attaches it as the ``adapters`` member of ``sparsegan``. Nothing is imported
and the package's files are not touched.
"""

from __future__ import annotations

from typing import Any

import griffe


class AdaptersSubpackage(griffe.Extension):
    """Attach the top-level ``adapters`` folder to ``sparsegan`` as ``sparsegan.adapters``."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:  # noqa: ARG002
        if pkg.name != "sparsegan" or "adapters" in pkg.members:
            return
        adapters = loader.load("adapters", try_relative_path=False)
        loader.modules_collection.del_member("adapters")
        pkg.set_member("adapters", adapters)
