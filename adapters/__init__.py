"""Integrations with third-party GAN code, importable as ``sparsegan.adapters.<name>``.

The folder is shipped as the ``sparsegan.adapters`` subpackage (the bare top-level name
``adapters`` is taken on PyPI). Adapters are added by later releases; the core wrapper works on
any ``nn.Module`` without them.
"""
