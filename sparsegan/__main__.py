"""``python -m sparsegan``: the same command line as the ``sparsegan`` console script."""

from __future__ import annotations

import sys

from sparsegan.cli import main

if __name__ == "__main__":
    sys.exit(main())
