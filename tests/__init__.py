"""The sparsegan test suite (a regular package, so that ``tests.conftest`` is ours even when an
installed distribution, e.g. torch-fidelity 0.4, ships a top-level ``tests`` package)."""
