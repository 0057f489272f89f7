"""FLOPs accounting: sparse vs dense training FLOPs of the generator and the discriminator.

Convention: one multiply-accumulate (MAC) is 2 FLOPs, as in
:class:`torch.utils.flop_counter.FlopCounterMode` for convolutions, linear layers and matrix
products. Only the kernel ops of the discovered weights are counted (conv / linear / matmul);
bias additions, normalisation layers, activations and other elementwise work are ignored, as are
the optimizer's own FLOPs.

With ``F_l`` the dense forward FLOPs per sample of layer ``l`` and ``d_l`` its density:

* sparse forward (inference) per sample: ``sum_l d_l * F_l``;
* one sparse training step (forward + backward, backward ~ 2 x forward) per sample:
  ``3 * sum_l d_l * F_l``;
* a step on which the network's masks were updated with gradient-based growth, which needs the
  dense gradient of the weights: ``2 * sum_l d_l * F_l + sum_l F_l``;
* the dense reference for any step: ``3 * sum_l F_l``.

Typical use::

    ledger = FlopsLedger({"generator": layer_flops(g_discovery.weights),
                          "discriminator": layer_flops(d_discovery.weights)})
    ledger.set_densities("generator", g_weights.layer_densities())  # after every mask change
    ledger.record_step("generator")                                  # after every optimizer step
    print(ledger.report())
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sparsegan._utils import first_batch_size, format_table, preserved_state, unwrap_model
from sparsegan.discovery import WeightRecord

__all__ = ["LayerFlops", "layer_flops", "dense_forward_flops", "FlopsLedger"]

logger = logging.getLogger(__name__)

_STATE_FORMAT = 1
_TOTAL = "total"


@dataclass(frozen=True)
class LayerFlops:
    """Dense forward FLOPs of one masked weight.

    Attributes:
        name: The weight's canonical parameter name (the name its density is reported under).
        forward_flops: Dense FLOPs per input sample of the weight's kernel op(s) in one forward
            pass (``2 * macs_per_sample``).
    """

    name: str
    forward_flops: int


def layer_flops(records: Sequence[WeightRecord]) -> list[LayerFlops]:
    """Dense forward FLOPs per sample of each discovered weight.

    Args:
        records: Discovered weights (``DiscoveryResult.weights``), found with an example input so
            that their ``macs_per_sample`` is known.

    Returns:
        One :class:`LayerFlops` per record, in the same order, with ``2 * macs_per_sample`` FLOPs.

    Raises:
        ValueError: If some record has no ``macs_per_sample``.
    """
    unknown = [r.name for r in records if r.macs_per_sample is None]
    if unknown:
        raise ValueError(
            f"the FLOPs of {len(unknown)} weight(s) are unknown ({', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}): counting FLOPs needs an example input at "
            "discovery; pass latent=... (or g_example_inputs=... / d_example_inputs=...) to "
            "SparseGANWrapper, or example_inputs=... to sparsegan.discover"
        )
    return [LayerFlops(r.name, 2 * int(r.macs_per_sample or 0)) for r in records]  # None ruled out above


def dense_forward_flops(module: nn.Module, *example_inputs: Any) -> int:
    """Total FLOPs per sample of one dense forward pass, as counted by ``FlopCounterMode``.

    The forward runs under :func:`torch.no_grad` with no lasting effect on the module (buffers
    such as BatchNorm statistics or spectral-norm vectors, training flags and the RNG are
    restored). Unlike :func:`layer_flops` this counts every op ``FlopCounterMode`` knows, whether
    or not its weight is masked (e.g. attention's activation-activation products).

    Args:
        module: The network.
        *example_inputs: Positional arguments of one forward call; the batch size is the leading
            dimension of the first tensor among them.

    Returns:
        The total FLOPs divided by the batch size (integer division).
    """
    module = unwrap_model(module)
    batch = first_batch_size(example_inputs)
    counter = FlopCounterMode(display=False)
    with preserved_state(module), torch.no_grad(), counter:
        module(*example_inputs)
    return int(counter.get_total_flops()) // max(batch, 1)


@dataclass
class _Network:
    """The ledger's counters for one network."""

    layers: tuple[LayerFlops, ...]
    dense_forward: int
    densities: dict[str, float] | None = None
    sparse_forward: float = 0.0
    sparse: float = 0.0
    dense: int = 0
    steps: int = 0


def _ratio(sparse: float, dense: float) -> float:
    return sparse / dense if dense > 0 else math.nan


class FlopsLedger:
    """Cumulative sparse and dense training FLOPs of several networks.

    Call :meth:`set_densities` whenever a network's masks change and :meth:`record_step` after
    every optimizer step; :meth:`record_step` only adds cached numbers (O(1)). Before the first
    :meth:`set_densities` of a network, its layers count as dense (density 1.0).

    Args:
        layers: Network name (``"generator"``, ``"discriminator"``) -> its layers' dense forward
            FLOPs (from :func:`layer_flops`).

    Raises:
        ValueError: If there is no network, a network is called ``"total"``, a network repeats a
            layer name, or a layer has negative FLOPs.
    """

    def __init__(self, layers: Mapping[str, Sequence[LayerFlops]]) -> None:
        if not layers:
            raise ValueError("FlopsLedger needs at least one network, e.g. {'generator': layer_flops(records)}")
        self._nets: dict[str, _Network] = {}
        for network, net_layers in layers.items():
            if network == _TOTAL:
                raise ValueError(f"{_TOTAL!r} is reserved for the sum over networks; rename that network")
            net_layers = tuple(net_layers)
            names = [layer.name for layer in net_layers]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{network}: layer name(s) {repeated} appear more than once; give each weight one entry")
            negative = [layer.name for layer in net_layers if layer.forward_flops < 0]
            if negative:
                raise ValueError(f"{network}: layer(s) {negative} have negative forward_flops")
            dense_forward = sum(int(layer.forward_flops) for layer in net_layers)
            self._nets[network] = _Network(net_layers, dense_forward, None, float(dense_forward))

    # ------------------------------------------------------------------ recording

    @property
    def networks(self) -> tuple[str, ...]:
        """The network names, in the order given."""
        return tuple(self._nets)

    def layers(self, network: str) -> tuple[LayerFlops, ...]:
        """The layers of ``network``."""
        return self._net(network).layers

    def densities(self, network: str) -> dict[str, float]:
        """The per-layer densities in force for ``network`` (all 1.0 before :meth:`set_densities`)."""
        net = self._net(network)
        if net.densities is None:
            return {layer.name: 1.0 for layer in net.layers}
        return dict(net.densities)

    def set_densities(self, network: str, densities: Mapping[str, float]) -> None:
        """Set the per-layer densities in force for the following steps of ``network``.

        Args:
            network: A network name given at construction.
            densities: Layer name -> density in [0, 1], for every layer of the network (e.g.
                ``MaskedWeights.layer_densities()``).

        Raises:
            ValueError: If the network is unknown, a layer is missing or unknown, or a density
                is outside [0, 1].
        """
        net = self._net(network)
        checked = self._checked_densities(network, net, densities)
        net.densities = checked
        net.sparse_forward = sum(checked[layer.name] * layer.forward_flops for layer in net.layers)
        logger.debug("%s: sparse forward %.4g of dense %d FLOPs per sample", network, net.sparse_forward, net.dense_forward)

    def record_step(self, network: str, *, dense_gradient: bool = False, samples: int = 1) -> None:
        """Add one optimizer step of ``network`` at the densities in force.

        Args:
            network: A network name given at construction.
            dense_gradient: Whether the masks were updated on this step with gradient-based
                growth (the backward pass then computes the dense weight gradient).
            samples: Number of input samples the step processed (1 keeps the totals per sample).

        Raises:
            ValueError: If the network is unknown or ``samples`` is not a positive integer.
        """
        net = self._net(network)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int (the batch size of the step), got {samples!r}")
        if dense_gradient:
            net.sparse += samples * (2.0 * net.sparse_forward + net.dense_forward)
        else:
            net.sparse += samples * 3.0 * net.sparse_forward
        net.dense += samples * 3 * net.dense_forward
        net.steps += 1

    # ------------------------------------------------------------------ reading

    def inference_flops(self, network: str) -> dict[str, float]:
        """Forward FLOPs per sample of ``network`` at the densities in force.

        Returns:
            ``{"sparse": sum d*F, "dense": sum F, "ratio": sparse / dense}`` (ratio is NaN when
            the network has no FLOPs).
        """
        net = self._net(network)
        return {"sparse": net.sparse_forward, "dense": float(net.dense_forward),
                "ratio": _ratio(net.sparse_forward, net.dense_forward)}

    def summary(self) -> dict[str, dict[str, float]]:
        """Cumulative training FLOPs, per network and in total.

        Returns:
            ``{network: {"sparse", "dense", "ratio", "steps"}, ..., "total": {...}}``; FLOPs are
            per sample unless steps were recorded with ``samples=``; ``ratio`` is
            ``sparse / dense`` (NaN before any step); ``steps`` counts recorded steps.
        """
        out: dict[str, dict[str, float]] = {}
        for network, net in self._nets.items():
            out[network] = {"sparse": net.sparse, "dense": float(net.dense),
                            "ratio": _ratio(net.sparse, net.dense), "steps": net.steps}
        sparse = sum(net.sparse for net in self._nets.values())
        dense = sum(net.dense for net in self._nets.values())
        out[_TOTAL] = {"sparse": sparse, "dense": float(dense), "ratio": _ratio(sparse, dense),
                       "steps": sum(net.steps for net in self._nets.values())}
        return out

    def report(self) -> str:
        """A plain-text table of cumulative training FLOPs: sparse, dense and their ratio."""
        rows: list[tuple[str, ...]] = [("network", "steps", "training FLOPs sparse", "dense", "ratio")]
        for network, s in self.summary().items():
            ratio = "-" if math.isnan(s["ratio"]) else f"{s['ratio']:.4f}"
            rows.append((network, str(int(s["steps"])), f"{s['sparse']:.4g}", f"{s['dense']:.4g}", ratio))
        return "\n".join(format_table(rows))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Cumulative counters, step counts and densities in force, per network."""
        return {
            "format": _STATE_FORMAT,
            "networks": {
                network: {"sparse": net.sparse, "dense": net.dense, "steps": net.steps,
                          "densities": None if net.densities is None else dict(net.densities)}
                for network, net in self._nets.items()
            },
        }

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check a state saved by :meth:`state_dict` without changing anything.

        Raises:
            ValueError: If the state's networks or layers differ from this ledger's (a
                checkpoint of another model), its format is unknown or an entry is malformed.
        """
        self._parsed(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load counters saved by :meth:`state_dict` (nothing changes on an error).

        Raises:
            ValueError: If the state's networks or layers differ from this ledger's (a
                checkpoint of another model), its format is unknown or an entry is malformed.
        """
        for network, (sparse, dense, steps, densities) in self._parsed(state).items():
            net = self._nets[network]
            net.sparse, net.dense, net.steps = sparse, dense, steps
            if densities is None:
                net.densities, net.sparse_forward = None, float(net.dense_forward)
            else:
                self.set_densities(network, densities)

    def _parsed(self, state: Mapping[str, Any]) -> dict[str, tuple[float, int, int, dict[str, float] | None]]:
        if not isinstance(state, Mapping) or state.get("format") != _STATE_FORMAT \
                or not isinstance(state.get("networks"), Mapping):
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not a FlopsLedger state (format {found!r}, expected {_STATE_FORMAT})")
        saved = state["networks"]
        if set(saved) != set(self._nets):
            raise ValueError(
                f"the state holds networks {sorted(saved)} but this ledger has {sorted(self._nets)}; "
                "was it saved for a different setup?"
            )
        loaded: dict[str, tuple[float, int, int, dict[str, float] | None]] = {}
        for network, entry in saved.items():
            net = self._nets[network]
            try:
                densities = entry.get("densities")
                checked = None if densities is None else self._checked_densities(network, net, densities)
                sparse, dense, steps = float(entry["sparse"]), int(entry["dense"]), int(entry["steps"])
            except (KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{network}: malformed ledger entry ({type(exc).__name__}: {exc})") from None
            if steps < 0 or sparse < 0 or dense < 0:
                raise ValueError(f"{network}: negative counters in the state")
            loaded[network] = (sparse, dense, steps, checked)
        return loaded

    # ------------------------------------------------------------------ helpers

    def _net(self, network: str) -> _Network:
        try:
            return self._nets[network]
        except KeyError:
            raise ValueError(f"unknown network {network!r}; this ledger has {list(self._nets)}") from None

    @staticmethod
    def _checked_densities(network: str, net: _Network, densities: Mapping[str, float]) -> dict[str, float]:
        names = [layer.name for layer in net.layers]
        missing = [n for n in names if n not in densities]
        extra = [n for n in densities if n not in set(names)]
        if missing or extra:
            raise ValueError(
                f"{network}: densities do not match the ledger's layers: missing {missing}, "
                f"unknown {extra}; pass one density per layer given to FlopsLedger"
            )
        checked = {n: float(densities[n]) for n in names}
        bad = {n: d for n, d in checked.items() if not 0.0 <= d <= 1.0}
        if bad:
            raise ValueError(f"{network}: densities must lie in [0, 1], got {bad}")
        return checked

    def __repr__(self) -> str:
        parts = []
        for network, net in self._nets.items():
            ratio = _ratio(net.sparse, net.dense)
            parts.append(f"{network}: {len(net.layers)} layers, {net.steps} steps, ratio "
                         + ("-" if math.isnan(ratio) else f"{ratio:.4f}"))
        return f"FlopsLedger({'; '.join(parts)})"
