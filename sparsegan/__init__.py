"""sparsegan: sparse and balanced dynamic sparse training of GANs, two lines from your own loop.

Typical use::

    import sparsegan
    sg = sparsegan.SparseGANWrapper(G, D, g_optimizer, d_optimizer,
                                    strategy=sparsegan.strategies.Static(g_density=0.1, d_density=0.2))
    # ... your own training loop, unchanged ...
    print(sg.report())

Public API: :class:`SparseGANWrapper`, :func:`discover`, :mod:`sparsegan.strategies`,
:mod:`sparsegan.distributions`, :mod:`sparsegan.criteria`, :mod:`sparsegan.schedules`,
:class:`~sparsegan.masks.MaskedWeights`.
"""

from sparsegan import criteria, distributions, schedules, strategies
from sparsegan.discovery import DiscoveryError, DiscoveryResult, SkippedParameter, WeightRecord, discover
from sparsegan.export import load_sparse, save_sparse
from sparsegan.masks import MaskedWeights, MaskStateError
from sparsegan.wrapper import SparseGANWrapper, WrapperStateError

__version__ = "0.1.0.dev0"

__all__ = [
    "SparseGANWrapper",
    "WrapperStateError",
    "discover",
    "DiscoveryError",
    "DiscoveryResult",
    "WeightRecord",
    "SkippedParameter",
    "save_sparse",
    "load_sparse",
    "MaskedWeights",
    "MaskStateError",
    "strategies",
    "distributions",
    "criteria",
    "schedules",
    "__version__",
]
