"""``SparseGANWrapper``: sparse training of a GAN through PyTorch hooks, with no change to the loop.

The wrapper wires the parts together and owns every hook:

* discovery (:mod:`sparsegan.discovery`) finds each network's kernel weights;
* the strategy builds one :class:`~sparsegan.strategies.SparsityAlgorithm` per network, which
  draws the initial masks and decides on updates;
* :class:`~sparsegan.masks.MaskedWeights` enforces the masks in place;
* an optimizer step post-hook per network enforces the masks after every ``optimizer.step()``,
  counts the network's steps and runs due mask updates; a forward pre-hook re-enforces the masks
  when a masked parameter changed outside the optimizer (e.g. ``load_state_dict``).

Every hook returns a handle; :meth:`SparseGANWrapper.remove` removes them all.

What the wrapper refuses rather than get silently wrong:

* an optimizer that also holds the *other* network's masked weights (a ``ValueError`` at wrap
  time, or at the first step after such weights were added with ``add_param_group``);
* a state dict that does not fit (a :class:`WrapperStateError`, raised before anything changes);
* :meth:`SparseGANWrapper.density` after :meth:`~SparseGANWrapper.remove` /
  :meth:`~SparseGANWrapper.finalize`, once a pruned weight became nonzero (a ``RuntimeError``:
  the masks are no longer enforced, and their density is no longer the network's; while the
  weights still follow them it returns their density and logs that they are not enforced).

A due mask update whose inputs or scores are not finite (a diverged step) is skipped with a
warning instead of failing inside ``optimizer.step()``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from sparsegan._utils import (
    as_args,
    format_table,
    isolated_rng,
    preserved_state,
    to_module,
    unwrap_model,
    unwrap_optimizer,
)
from sparsegan.balance import ESTIMATORS, BalanceEstimator, BalanceProbe, BalanceRatio
from sparsegan.criteria import NonFiniteScoreError, first_non_finite
from sparsegan.discovery import METHODS, DiscoveryError, DiscoveryResult, ParameterFilter, discover
from sparsegan.distributed import all_reduce_mean, broadcast_masks, is_distributed
from sparsegan.ema import SparseEMA
from sparsegan.flops import FlopsLedger, layer_flops
from sparsegan.masks import MaskedWeights, OptimizerStatePolicy
from sparsegan.strategies import NETWORKS, SparsityAlgorithm, Strategy, create

__all__ = ["SparseGANWrapper", "WrapperStateError"]

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
_ALIASES = {"generator": "generator", "g": "generator", "discriminator": "discriminator", "d": "discriminator"}
_WRAPPED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


class WrapperStateError(ValueError):
    """A state dict that does not belong to this wrapper's models or strategy."""


@dataclass
class _Network:
    """Everything the wrapper keeps about one network."""

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    discovery: DiscoveryResult
    algorithm: SparsityAlgorithm | None
    weights: MaskedWeights
    generator: torch.Generator
    steps: int = 0
    mask_updates: int = 0
    skipped_updates: int = 0
    held: tuple[int, ...] = ()
    handles: list[RemovableHandle] = field(default_factory=list)

    def density(self) -> float:
        """Active fraction of the kernel weights: the masked ones plus those include=/exclude= keep dense."""
        if self.algorithm is None:
            return 1.0
        dense = sum(record.numel for record in self.discovery.unmasked)
        total = self.weights.total + dense
        return (sum(self.weights.active_counts()) + dense) / total if total else 1.0

    def dense_weights(self) -> list[tuple[str, int, str]]:
        """``(name, numel, reason)`` of the network's other weight tensors (2-D or more), kept dense."""
        params = dict(self.module.named_parameters())
        return [(s.name, params[s.name].numel(), s.reason) for s in self.discovery.skipped
                if s.name in params and params[s.name].dim() >= 2 and not s.reason.startswith("a parameter of the")]

    def weight_density(self) -> float:
        """Active fraction of all the network's weight tensors: masked kernels plus those kept dense."""
        dense = sum(n for _, n, _ in self.dense_weights())
        active = (sum(self.weights.active_counts()) if self.algorithm is not None else self.weights.total) + dense
        total = self.weights.total + dense
        return active / total if total else 1.0


class _EnforceMasks:
    """Forward pre-hook: re-apply the masks when a masked parameter changed since the last time.

    A copy of the module (``copy.deepcopy``, ``pickle``/``torch.save`` of the whole module) is not
    wrapped: the copied hook does nothing rather than reaching back to the original's masks.
    """

    def __init__(self, weights: MaskedWeights) -> None:
        self.weights = weights

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.weights.apply_if_stale_()

    def __deepcopy__(self, memo: dict[int, Any]) -> _Inert:
        return _Inert()

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_Inert, ())


class _Inert:
    """What a copied :class:`_EnforceMasks` becomes: a hook that does nothing."""

    def __call__(self, module: nn.Module, args: Any) -> None:
        return None


# Reasons for keeping a 2-D+ weight dense that are intended, not a gap in discovery.
_INTENDED_DENSE = frozenset({"embedding table", "excluded by exclude=", "not matched by include="})


def _held(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    """A cheap signature of what an optimizer holds: the size of each parameter group."""
    return tuple(len(group["params"]) for group in optimizer.param_groups)


@contextlib.contextmanager
def _checking(what: str) -> Iterator[None]:
    """Turn any error raised while checking part of a state dict into a :class:`WrapperStateError`."""
    try:
        yield
    except WrapperStateError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        detail = f"missing entry {exc}" if isinstance(exc, KeyError) else str(exc)
        raise WrapperStateError(f"{what}: {detail}") from None


def _count(value: Any, what: str) -> int:
    """A non-negative int from a state dict entry."""
    if isinstance(value, bool) or int(value) != value or int(value) < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return int(value)


def _per_network(value: Any, network: str) -> Any:
    if isinstance(value, Mapping) and set(value) <= set(NETWORKS):
        return value.get(network)
    return value


class SparseGANWrapper:
    """Sparse training of a generator and a discriminator, hooked into their optimizers.

    Wrapping finds the kernel weights of both networks, draws masks from the strategy, zeroes
    the inactive weights, and registers hooks so that the user's own training loop runs
    unchanged::

        sg = sparsegan.SparseGANWrapper(G, D, g_opt, d_opt,
                                        strategy=sparsegan.strategies.Static(0.1, 0.2))
        # ... the usual loop: d_opt.step(), g_opt.step(), ...

    **One optimizer per network.** Each optimizer must hold its own network's masked weights
    and none of the other network's (a G that keeps D as a submodule, built with
    ``Adam(G.parameters())``, or two optimizers each built over both networks, are refused with
    a ``ValueError`` that names the shared weights). A network's masks, step count, scheduled
    updates and optimizer-state resets all follow that network's own optimizer: steps of another
    optimizer would move the weights at pruned positions, and its moments there would never be
    reset. Re-enforcing the masks after the other optimizer too would hide what is nearly always
    a bug in the loop (G's step also training D on G's loss), while still leaving that
    optimizer's state, D's step count and D's schedule out of step; so the wrapper refuses. The
    check runs at wrap time, and again at the next step of an optimizer whose parameter groups
    grew (``add_param_group``); then the masks are enforced before the error is raised.

    **Non-finite updates.** A due mask update is skipped, with a warning naming the network,
    the step and the layer, when a masked weight or its gradient is not finite, or when the
    algorithm finds its scores not finite (:class:`~sparsegan.criteria.NonFiniteScoreError`).
    The masks, the algorithm's state and the network's random generator are left as they were,
    and the update is tried again at the next step at which the algorithm is due (DST: the next
    multiple of ``update_every``; DDST's D: its next step in the same iteration, else the next
    decision iteration). :meth:`report` counts the skipped updates.

    Args:
        generator: The generator (any ``nn.Module``; DDP / ``torch.compile`` wrappers allowed).
        discriminator: The discriminator.
        g_optimizer: The optimizer of the generator's parameters.
        d_optimizer: The optimizer of the discriminator's parameters.
        strategy: A :class:`~sparsegan.strategies.Strategy` or a registered name (``"dense"``).
        seed: Seed of the per-network random generators (initial masks, random growth). The
            global RNG is never used.
        latent: Optional callable ``n -> G input`` (a tensor or a tuple of G's arguments), used
            to build example inputs for discovery and by the balance-ratio probe.
        real: Optional real batches for the balance-ratio probe: an iterable (a DataLoader is
            cycled; ``(image, label)`` batches give D the image) or a callable ``n -> batch``.
            The ``"fresh"`` estimator needs it; ``"step"`` uses it only when it cannot tell the
            real batch of the user's D step apart.
        br_estimator: How the balance ratio is measured every ``strategy.br_every`` G steps:
            ``"step"`` (default, the reference's estimator: the latents of the user's own G
            step, D's score of them from that step, and the real batch of the last D step,
            recorded by forward hooks), ``"fresh"`` (fresh latents from ``latent`` and real
            batches from ``real``: a different, smaller quantity) or ``None`` (no probe; feed BR
            with :meth:`observe`). The ``"step"`` probe runs whenever the strategy needs BR
            (DDST) or ``real`` is given; the first :meth:`observe` call switches it off. See
            :class:`~sparsegan.balance.BalanceProbe`.
        probe_batch_size: Latents per ``"fresh"`` BR sample (default: the real batch's size).
        g_example_inputs: Example positional input(s) of G for discovery (default: ``latent(2)``).
        d_example_inputs: Example input(s) of D (default: G's output on the G example).
        g_example_kwargs: Keyword arguments of G's example call (e.g. a required keyword-only
            ``labels=``), for discovery and the example pass that makes D's example. The
            ``"step"`` probe replays the keywords of the loop's own calls; the ``"fresh"`` probe
            calls G with ``latent``'s positional arguments only, so such a G needs ``"step"``.
        d_example_kwargs: Keyword arguments of D's example call.
        d_inputs: ``images -> D's positional inputs`` for a D that takes more than the image
            (e.g. ``lambda x: (x, D.real_images_to_rgbs(x))``). It makes D's discovery example from
            G's output, and the balance-ratio probe scores every image batch through it. Without
            it, a probe that would have to call such a D on an image alone (``"fresh"``, or
            ``real=`` given) is refused at wrap time.
        include: Only mask discovered weights matching this glob / list / callable; or a dict
            ``{"generator": ..., "discriminator": ...}``.
        exclude: Never mask discovered weights matching this (same forms as ``include``).
        optimizer_state: ``"reset"`` (zero optimizer state at pruned/regrown positions) or
            ``"keep"``.
        discovery_methods: The discovery cascade (default ``("fx", "export", "runtime")``).
        g_ema: Keep a sparse-aware EMA copy of G with this decay (e.g. 0.999), available as
            :attr:`ema`; its pruned positions follow G's masks.

    Raises:
        TypeError: If a model or optimizer has the wrong type.
        ValueError: If the optimizers are the same object, an optimizer does not hold its
            network's masked weights or also holds the other network's masked weights, a sparse
            network has no maskable weights, or a module is already wrapped.
        DiscoveryError: If a network cannot be analysed (the message says how to fix it).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        strategy: Strategy | str,
        *,
        seed: int = 0,
        latent: Callable[[int], Any] | None = None,
        real: Iterable[Any] | Callable[[int], Any] | None = None,
        br_estimator: BalanceEstimator | None = "step",
        probe_batch_size: int | None = None,
        g_example_inputs: Any = None,
        d_example_inputs: Any = None,
        g_example_kwargs: Mapping[str, Any] | None = None,
        d_example_kwargs: Mapping[str, Any] | None = None,
        d_inputs: Callable[[torch.Tensor], Any] | None = None,
        include: ParameterFilter | Mapping[str, ParameterFilter] | None = None,
        exclude: ParameterFilter | Mapping[str, ParameterFilter] | None = None,
        optimizer_state: OptimizerStatePolicy = "reset",
        discovery_methods: tuple[str, ...] = METHODS,
        g_ema: float | None = None,
    ) -> None:
        self.strategy: Strategy = create(strategy) if isinstance(strategy, str) else strategy
        if not isinstance(self.strategy, Strategy):
            raise TypeError(f"strategy must be a sparsegan.strategies.Strategy or a name, got {type(strategy).__name__}")
        modules = {"generator": unwrap_model(generator), "discriminator": unwrap_model(discriminator)}
        optimizers = {"generator": unwrap_optimizer(g_optimizer), "discriminator": unwrap_optimizer(d_optimizer)}
        for net in NETWORKS:
            if not isinstance(optimizers[net], torch.optim.Optimizer):
                raise TypeError(f"{net[0]}_optimizer must be a torch.optim.Optimizer, got {type(optimizers[net]).__name__}")
            if modules[net] in _WRAPPED:
                raise ValueError(
                    f"the {net} is already wrapped by another SparseGANWrapper; call .remove() on "
                    "that wrapper first (wrapping twice would enforce two sets of masks)"
                )
        if optimizers["generator"] is optimizers["discriminator"]:
            raise ValueError("g_optimizer and d_optimizer are the same object; GAN training needs one optimizer per network")
        if modules["generator"] is modules["discriminator"]:
            raise ValueError("generator and discriminator are the same module")
        self.seed = int(seed)
        if d_inputs is not None and not callable(d_inputs):
            raise TypeError("d_inputs must be a callable images -> D's positional inputs (a tensor or a tuple)")
        examples = self._examples(modules["generator"], modules["discriminator"], latent, g_example_inputs,
                                  d_example_inputs, g_example_kwargs, d_example_kwargs, d_inputs)
        image = examples.pop("image")[0]
        algorithms = self.strategy.build()
        self._networks: dict[str, _Network] = {}
        for index, net in enumerate(NETWORKS):
            self._networks[net] = self._build_network(
                net, modules[net], optimizers[net], algorithms[net], examples[net],
                _per_network(include, net), _per_network(exclude, net), optimizer_state,
                discovery_methods, self.seed + index,
                # a network kept inside the other (G holding D) owns its own weights there
                {other: modules[other] for other in NETWORKS
                 if other != net and any(m is modules[other] for m in modules[net].modules())},
            )
        self._check_shared_parameters()
        self._removed: str | None = None
        self._warned_removed = False
        self.balance = BalanceRatio(self.strategy.br_window)
        self._probe: BalanceProbe | None = None
        self._probe_handles: list[RemovableHandle] = []
        needs_br = any(getattr(n.algorithm, "needs_balance_ratio", False) for n in self._networks.values())
        if br_estimator is not None and br_estimator not in ESTIMATORS:
            raise ValueError(f"br_estimator must be 'step', 'fresh' or None, got {br_estimator!r}")
        if br_estimator == "fresh" or (br_estimator == "step" and (needs_br or real is not None)):
            self._probe = BalanceProbe(modules["generator"], modules["discriminator"], latent, real,
                                       estimator=br_estimator, batch_size=probe_batch_size, seed=self.seed + 2,
                                       d_inputs=d_inputs)
            if isinstance(image, torch.Tensor) and (br_estimator == "fresh" or real is not None or d_inputs is not None):
                self._probe.check_discriminator(to_module(image, modules["discriminator"]))
            self._probe_handles = self._probe.attach()
        elif needs_br:
            logger.warning("%s steers D's density by the balance ratio, but br_estimator=None: call "
                           "sg.observe(...) after each generator step", type(self.strategy).__name__)
        self.ema: SparseEMA | None = None
        if g_ema is not None:  # copied before the hooks exist, so the copy carries none of ours
            self.ema = SparseEMA(modules["generator"], g_ema, masks=self.masks("generator"))
        self.ledger: FlopsLedger | None = None
        try:
            # kernels that include=/exclude= keep dense count as dense layers, so the ratio does not over-claim
            self.ledger = FlopsLedger({n.name: layer_flops(n.discovery.weights + n.discovery.unmasked)
                                       for n in self._networks.values()})
        except ValueError as exc:
            logger.info("FLOPs accounting is off: %s", exc)
        else:
            for network in self._networks.values():
                self.ledger.set_densities(network.name, self._layer_densities(network))
        for network in self._networks.values():
            self._register_hooks(network)
            _WRAPPED[network.module] = network.name
        logger.info("wrapped: %s", self)

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _examples(g_module: nn.Module, d_module: nn.Module, latent: Callable[[int], Any] | None, g_example: Any,
                  d_example: Any, g_kwargs: Mapping[str, Any] | None = None,
                  d_kwargs: Mapping[str, Any] | None = None,
                  d_inputs: Callable[[torch.Tensor], Any] | None = None) -> dict[str, tuple[Any, dict[str, Any]]]:
        """Example ``(inputs, kwargs)`` per network, moved to its device and floating dtype.

        Raises:
            TypeError: If G cannot be called on its example (e.g. a required keyword argument
                is missing); the message names the fix.
        """
        g_kw = to_module(dict(g_kwargs or {}), g_module)
        d_kw = to_module(dict(d_kwargs or {}), d_module)
        g_example_given = g_example
        if g_example is None and latent is not None:
            with isolated_rng():  # wrapping must not shift the user's random stream
                g_example = latent(2)
        if g_example is not None:
            g_example = to_module(g_example, g_module)  # e.g. CPU latents for a CUDA generator
        if d_example is None and g_example is not None:
            try:
                with preserved_state(g_module), torch.no_grad():
                    out = g_module(*as_args(g_example), **g_kw)
            except TypeError as exc:
                source = "latent(2)" if g_example_given is None else "g_example_inputs"
                raise TypeError(
                    f"calling the generator on its example ({source}"
                    f"{', g_example_kwargs' if g_kw else ''}) failed: {exc}. Pass the keyword arguments "
                    "G's forward needs as g_example_kwargs={...}, or return a tuple of all its positional "
                    "arguments from latent= (or pass d_example_inputs= to skip this call)."
                ) from None
            d_example = out if isinstance(out, torch.Tensor) else next(
                (x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)), None)
            image = d_example
            if d_inputs is not None and d_example is not None:
                with preserved_state(d_module), torch.no_grad():
                    d_example = d_inputs(to_module(d_example, d_module))
        else:
            image = as_args(d_example)[0] if d_example is not None and as_args(d_example) else None
        if d_example is not None:
            d_example = to_module(d_example, d_module)
        return {"generator": (g_example, g_kw), "discriminator": (d_example, d_kw), "image": (image, {})}

    def _build_network(
        self, name: str, module: nn.Module, optimizer: torch.optim.Optimizer,
        algorithm: SparsityAlgorithm | None, example: tuple[Any, dict[str, Any]], include: Any, exclude: Any,
        optimizer_state: OptimizerStatePolicy, methods: tuple[str, ...], seed: int,
        others: Mapping[str, nn.Module],
    ) -> _Network:
        try:
            found = discover(module, example[0], example_kwargs=example[1], include=include, exclude=exclude,
                             methods=methods, other_models=others)
        except DiscoveryError as exc:
            keyword = "g_example_inputs" if name == "generator" else "d_example_inputs"
            raise DiscoveryError(
                f"{name}: {exc} With SparseGANWrapper, pass {keyword}=... or latent=lambda n: ... "
                "(a function returning a batch of the generator's input)."
            ) from None
        params = {n: p for n, p in module.named_parameters()}
        weights = MaskedWeights(found.names, [params[n] for n in found.names], optimizer_state=optimizer_state,
                                shared_dims=[w.shared_dims for w in found.weights])
        rng = torch.Generator().manual_seed(seed)
        if algorithm is not None:
            if not found.weights:
                reasons = "; ".join(f"{s.name}: {s.reason}" for s in found.skipped[:8]) or "it has no parameters"
                raise ValueError(
                    f"the {name} ({type(module).__name__}) has no maskable weights (conv/linear kernels) "
                    f"to make sparse [{reasons}]. Check that you passed the right module, or use "
                    "strategies.Dense() / density 1.0 for this network."
                )
            self._check_optimizer(name, optimizer, weights)
            shapes = {n: tuple(p.shape) for n, p in zip(weights.names, weights.params)}
            banks = {w.name: w.shared_dims for w in found.weights if w.shared_dims}
            # kernel banks get one mask shared across the bank (passed only when there are banks,
            # so that an algorithm overriding initial_masks without the keyword keeps working)
            initial = (algorithm.initial_masks(shapes, generator=rng, shared_dims=banks) if banks
                       else algorithm.initial_masks(shapes, generator=rng))
            weights.masks = weights._checked(broadcast_masks(initial))
            weights.apply_()
            if optimizer_state == "reset":
                weights.reset_optimizer_state(optimizer)
        net = _Network(name, module, optimizer, found, algorithm, weights, rng)
        if algorithm is not None:
            unexpected = [(n, reason) for n, _, reason in net.dense_weights() if reason not in _INTENDED_DENSE]
            if unexpected:
                logger.warning(
                    "%s: %d weight tensor(s) stay dense, so the network is denser than its masked kernels "
                    "(all weights %.4f against %.4f): %s. See the discovery docs ('What to do for each reason'), "
                    "or pass include=/exclude= to state what you want.", name, len(unexpected),
                    net.weight_density(), net.density(),
                    "; ".join(f"{n} ({reason})" for n, reason in unexpected[:8]) + ("; ..." if len(unexpected) > 8 else ""))
        return net

    @staticmethod
    def _check_optimizer(name: str, optimizer: torch.optim.Optimizer, weights: MaskedWeights) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [n for n, p in zip(weights.names, weights.params) if id(p) not in held]
        if missing:
            raise ValueError(
                f"{name[0]}_optimizer does not hold {len(missing)} of the {name}'s masked weights "
                f"(e.g. {missing[:3]}); build it from {name}.parameters() of the same module you pass "
                "to SparseGANWrapper (did you swap g_optimizer and d_optimizer?)"
            )

    def _check_shared_parameters(self) -> None:
        """Refuse an optimizer that also holds the other network's masked weights (see the class docs).

        Raises:
            ValueError: Naming, per optimizer, the other network's masked weights it holds, and the fix.
        """
        problems: list[str] = []
        fixes: list[str] = []
        for net in self._networks.values():
            if net.algorithm is None:
                continue
            for other in self._networks.values():
                if other is net:
                    continue
                held = {id(p) for group in other.optimizer.param_groups for p in group["params"]}
                shared = [(n, p) for n, p in zip(net.weights.names, net.weights.params) if id(p) in held]
                if not shared:
                    continue
                inside = {id(p): n for n, p in other.module.named_parameters(remove_duplicate=False)}
                listed = [f"{n!r} (the {other.name}'s {inside[id(p)]!r})" if id(p) in inside else repr(n)
                          for n, p in shared[:4]]
                more = f" and {len(shared) - 4} more" if len(shared) > 4 else ""
                problems.append(f"{other.name[0]}_optimizer also holds {len(shared)} of the {net.name}'s "
                                f"{len(net.weights)} masked weights: {', '.join(listed)}{more}")
                prefixes = sorted({inside[id(p)].split(".")[0] for _, p in shared if id(p) in inside})
                if prefixes and len(shared) == sum(id(p) in inside for _, p in shared):
                    skip = " or ".join(f"n.startswith({prefix + '.'!r})" for prefix in prefixes)
                    fixes.append(f"{other.name[0]}_optimizer = torch.optim.Adam([p for n, p in "
                                 f"{other.name}.named_parameters() if not ({skip})], ...)")
                else:
                    fixes.append(f"build {other.name[0]}_optimizer from {other.name}.parameters() alone, "
                                 f"not chained with the {net.name}'s")
        if problems:
            raise ValueError(
                "; ".join(problems) + ". Each network's masks, step count and optimizer-state resets follow its "
                "own optimizer: another optimizer's steps would write into the pruned weights, and its moments "
                "there would never be reset. Build each optimizer from its own network's parameters only, "
                "e.g. " + "; ".join(fixes) + " (or keep those weights dense with exclude=)."
            )
        for net in self._networks.values():
            net.held = _held(net.optimizer)

    def _recheck_shared_parameters(self) -> None:
        """At a step of an optimizer whose parameter groups changed: enforce the masks, then check again."""
        self.apply_masks()  # whatever the check finds, no weight is left violating its mask
        self._check_shared_parameters()

    def _register_hooks(self, net: _Network) -> None:
        def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._after_step(net)

        net.handles.append(net.optimizer.register_step_post_hook(after_step))
        if net.name == "generator":
            def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
                if self._probe is not None and (net.steps + 1) % self.strategy.br_every == 0:
                    if not self._probe.before_step():
                        self.balance.skipped += 1

            net.handles.append(net.optimizer.register_step_pre_hook(before_step))
        if net.algorithm is not None:
            net.handles.append(net.module.register_forward_pre_hook(_EnforceMasks(net.weights)))

    def _after_step(self, net: _Network) -> None:
        if _held(net.optimizer) != net.held:
            self._recheck_shared_parameters()
        net.steps += 1
        if net.algorithm is not None:
            net.weights.apply_()
        if self._probe is not None:
            if net.name == "generator":
                if self._probe.pending:
                    measured = self._probe.after_step()
                    if measured is not None:
                        self.balance.add(*all_reduce_mean(measured), step=net.steps)
                self._probe.generator_stepped()
            else:
                self._probe.discriminator_stepped()
        changed = False
        if net.algorithm is not None:
            clock: dict[str, Any] = {}
            if net.algorithm.needs_balance_ratio:
                clock = {"iteration": self._networks["generator"].steps}
            due = net.algorithm.is_due(net.steps, **clock)
            if due and clock:
                self._check_balance_source()
            extra = {"balance": self.balance, **clock} if clock else {}
            if due:
                changed = self._due_update(net, extra)
            else:
                changed = net.algorithm.update(net.steps, net.weights, net.optimizer, net.generator, **extra)
            if due and is_distributed():  # every rank takes part, whether or not it skipped
                changed = self._sync_masks(net) or changed
        if changed:
            net.mask_updates += 1
            if self.ledger is not None:
                self.ledger.set_densities(net.name, self._layer_densities(net))
        if self.ledger is not None:
            self.ledger.record_step(net.name, dense_gradient=changed)
        if net.name == "generator" and self.ema is not None:
            if changed:
                self.ema.set_masks(self.masks("generator"))
            self.ema.update(net.module)

    def _due_update(self, net: _Network, extra: dict[str, Any]) -> bool:
        """Run a due update, or skip it when its inputs or scores are not finite (see the class docs)."""
        assert net.algorithm is not None
        names = net.weights.names
        bad = first_non_finite(net.weights.params)
        reason = None if bad is None else f"the weight {names[bad]!r} is not finite"
        if reason is None:
            bad = first_non_finite([p.grad for p in net.weights.params])
            reason = None if bad is None else f"the gradient of {names[bad]!r} is not finite"
        if reason is None:
            state = copy.deepcopy(net.algorithm.state_dict())
            rng = net.generator.get_state()
            masks = [m.clone() for m in net.weights.masks]
            try:
                return net.algorithm.update(net.steps, net.weights, net.optimizer, net.generator, **extra)
            except NonFiniteScoreError as exc:
                net.algorithm.load_state_dict(state)
                net.generator.set_state(rng)
                if any(not torch.equal(a, b) for a, b in zip(masks, net.weights.masks)):
                    net.weights.set_masks(masks, [net.optimizer])
                layer = names[exc.layer] if 0 <= exc.layer < len(names) else f"#{exc.layer}"
                reason = f"the scores of {layer!r} are not finite ({exc})"
        net.skipped_updates += 1
        when = f"step {net.steps}"
        if "iteration" in extra:
            when += f" (iteration {extra['iteration']})"
        logger.warning("%s: the mask update due at %s is skipped: %s (NaN or inf; a diverged step?). The masks "
                       "are unchanged; the update is tried again at the next step at which it is due.",
                       net.name, when, reason)
        return False

    @staticmethod
    def _sync_masks(net: _Network) -> bool:
        """Make every rank's masks rank 0's (called on all ranks at the same scheduled steps)."""
        agreed = broadcast_masks(net.weights.masks)
        if all(torch.equal(a, b) for a, b in zip(agreed, net.weights.masks)):
            return False
        logger.warning("%s masks differed from rank 0's after the update at step %d; using rank 0's",
                       net.name, net.steps)
        net.weights.set_masks(agreed, [net.optimizer])
        return True

    @staticmethod
    def _layer_densities(net: _Network) -> dict[str, float]:
        dense = {record.name: 1.0 for record in net.discovery.unmasked}
        if net.algorithm is None:
            return {name: 1.0 for name in net.weights.names} | dense
        return net.weights.layer_densities() | dense

    def _check_balance_source(self) -> None:
        if self._probe is None and not self.balance.history and self.balance.skipped == 0:
            raise RuntimeError(
                f"{type(self.strategy).__name__} needs balance-ratio samples to steer the discriminator's "
                "density, but none were measured. Either leave br_estimator='step' (the default) so the "
                "wrapper measures them on your G steps, or call "
                "sg.observe(d_real=..., d_fake_before=..., d_fake_after=...) after each generator step."
            )

    # ------------------------------------------------------------------ public API

    def _net(self, network: str) -> _Network:
        key = _ALIASES.get(str(network).lower())
        if key is None:
            raise ValueError(f"network must be 'generator' or 'discriminator' (or 'G'/'D'), got {network!r}")
        return self._networks[key]

    def density(self, network: str) -> float:
        """Fraction of the network's kernel weights that are active (1.0 for a dense network).

        Kernel weights that ``include=`` / ``exclude=`` keep dense count as fully active, so the
        density never claims more sparsity than the network's conv/linear kernels have;
        :meth:`weight_density` also counts the weights discovery could not follow.

        After :meth:`remove` / :meth:`finalize` the masks are no longer enforced. The density of
        the masks is then returned only while the weights still follow them (every pruned weight
        still exactly 0, as right after ``finalize()`` or Lightning's teardown), with a warning
        logged once that they are no longer enforced; once a pruned weight is nonzero (training
        went on without the hooks) it raises, because that density would no longer be true.

        Raises:
            ValueError: For an unknown network name.
            RuntimeError: After :meth:`remove` / :meth:`finalize`, when the network's weights no
                longer follow its masks (the message gives how many pruned weights are nonzero
                and the density the masks had).
        """
        net = self._net(network)
        if self._removed is not None and net.algorithm is not None:
            violations = self._violations(net)
            if violations:
                raise RuntimeError(
                    f"the {net.name}'s masks are no longer enforced: {self._removed} removed the wrapper's "
                    f"hooks after {net.steps} {net.name} steps, and since then {violations} pruned weights "
                    f"became nonzero, so the masks' density {net.density():.4f} is no longer the "
                    f"{net.name}'s. Count the module's nonzero weights to measure it, or wrap the models "
                    "again to keep training sparse."
                )
            if not self._warned_removed:
                self._warned_removed = True
                logger.warning("the masks are no longer enforced (%s removed the wrapper's hooks); density() "
                               "reports the masks, which the weights still follow", self._removed)
        return net.density()

    @staticmethod
    def _violations(net: _Network) -> int:
        """Nonzero weights at pruned positions (0 while the masks are enforced)."""
        with torch.no_grad():
            return sum(int(torch.count_nonzero(p.detach()[~m.to(p.device)]))
                       for p, m in zip(net.weights.params, net.weights.masks))

    def weight_density(self, network: str) -> float:
        """Active fraction of *all* the network's weight tensors (2-D or more), masked or not.

        :meth:`density` counts the masked kernels only. Weights that discovery left dense (an op
        it does not recognise, an embedding table, anything ``exclude=`` names) count here as
        fully active, so this is the density the network really has. The two agree when
        everything is masked; :meth:`report` shows both when they differ.

        Raises:
            ValueError: For an unknown network name.
        """
        return self._net(network).weight_density()

    @property
    def enforcing(self) -> bool:
        """Whether the masks are still enforced (``False`` after :meth:`remove` / :meth:`finalize`)."""
        return self._removed is None

    def masks(self, network: str) -> dict[str, torch.Tensor]:
        """Copies of the network's bool masks by parameter name (empty for a dense network).

        After :meth:`remove` / :meth:`finalize` these are the masks as they were then (e.g. for
        :func:`sparsegan.save_sparse` of the finalized modules); they are no longer enforced.
        """
        net = self._net(network)
        if net.algorithm is None:
            return {}
        return {n: m.clone() for n, m in zip(net.weights.names, net.weights.masks)}

    def steps(self, network: str) -> int:
        """Optimizer steps the network has taken since wrapping (or as restored by loading)."""
        return self._net(network).steps

    def discovery(self, network: str) -> DiscoveryResult:
        """What discovery found in the network."""
        return self._net(network).discovery

    def algorithm(self, network: str) -> SparsityAlgorithm | None:
        """The network's sparsity algorithm (``None`` when it is dense)."""
        return self._net(network).algorithm

    def observe(self, d_real: torch.Tensor | float, d_fake_before: torch.Tensor | float,
                d_fake_after: torch.Tensor | float) -> float | None:
        """Feed one balance-ratio sample computed in your own training step (no extra forward).

        Args:
            d_real: D's scores of a real batch.
            d_fake_before: D's scores of G(z) before the generator's update.
            d_fake_after: D's scores of G'(z) for the same z after the update.

        The first call switches the wrapper's own probe off (the loop now feeds every sample).

        Returns:
            The sample, or ``None`` when it was skipped (non-finite scores, zero denominator).
        """
        if self._probe is not None:
            logger.info("observe() called: the wrapper's balance-ratio probe is switched off, samples now "
                        "come from observe()")
            self._remove_probe()
        values = [float(torch.as_tensor(v).detach().float().mean()) for v in (d_real, d_fake_before, d_fake_after)]
        return self.balance.add(*all_reduce_mean(values), step=self._networks["generator"].steps)

    @property
    def balance_ratio(self) -> float | None:
        """The current windowed balance ratio (``None`` before the first sample)."""
        return self.balance.value

    def flops(self) -> dict[str, dict[str, float]]:
        """Training FLOPs so far (per sample), sparse vs dense, for G, D and in total.

        Also reports each network's current inference FLOPs under ``"inference"``. Counts cover
        conv/linear kernels (1 MAC = 2 FLOPs; a training step = 3 forward passes, plus the dense
        weight gradient on gradient-growth update steps).

        Raises:
            RuntimeError: When layer costs are unknown (no example input was available).
        """
        if self.ledger is None:
            raise RuntimeError(
                "FLOPs need each layer's cost from an example forward pass; pass latent= (or "
                "g_example_inputs= / d_example_inputs=) to SparseGANWrapper"
            )
        summary = self.ledger.summary()
        summary["inference"] = {n: self.ledger.inference_flops(n)["ratio"] for n in NETWORKS}
        return summary

    def mask_updates(self, network: str) -> int:
        """How many times the network's masks changed since wrapping."""
        return self._net(network).mask_updates

    def apply_masks(self) -> None:
        """Enforce both networks' masks now (done automatically after every optimizer step)."""
        for net in self._networks.values():
            if net.algorithm is not None:
                net.weights.apply_()

    def report(self) -> str:
        """A per-layer table of both networks: what was found, how, and how dense it is.

        After :meth:`remove` / :meth:`finalize` the report says first that the masks are no
        longer enforced and whether the weights still follow them, and gives each density as that
        of the masks when the hooks were removed.
        """
        blocks = [f"SparseGANWrapper with {self.strategy!r}"]
        if self._removed is not None:
            steps = ", ".join(f"{net.name} {net.steps}" for net in self._networks.values())
            violations = {net.name: self._violations(net) for net in self._networks.values() if net.algorithm is not None}
            broken = ", ".join(f"{n}: {v} pruned weights nonzero" for n, v in violations.items() if v)
            follow = (f"the weights no longer follow them ({broken})" if broken
                      else "the weights still follow them")
            blocks.append(
                f"MASKS NO LONGER ENFORCED: {self._removed} removed every hook (after steps: {steps}); the "
                f"densities below are the masks' at that point, and {follow}."
            )
        density = "density" if self._removed is None else "density when removed"
        for net in self._networks.values():
            found = net.discovery
            w = net.weights
            active = w.active_counts() if net.algorithm is not None else [m.numel() for m in w.masks]
            # kernels include=/exclude= keep dense count as active, as in net.density()
            kept = sum(record.numel for record in found.unmasked) if net.algorithm is not None else 0
            total = w.total + kept
            skipped = (f"; {net.skipped_updates} due mask updates skipped (non-finite weights or scores)"
                       if net.skipped_updates else "")
            dense = net.dense_weights()
            all_weights = (f"; all weight tensors {net.weight_density():.4f} ({len(dense)} kept dense)"
                           if dense and net.algorithm is not None else "")
            blocks.append(
                f"\n{net.name} ({type(net.module).__name__}): {len(w)} kernel weights found by "
                f"{found.method}; {density} {net.density():.4f} ({sum(active) + kept}/{total} active){all_weights}; "
                f"{net.algorithm!r}{skipped}"
            )
            rows = [("name", "shape", "op", "found by", "via", "density", "active")]
            for rec, count in zip(found.weights, active):
                name = rec.name + (f" (= {', '.join(rec.aliases)})" if rec.aliases else "")
                rows.append((name, "x".join(map(str, rec.shape)), rec.op, rec.method,
                             " > ".join(rec.via) or "-", f"{count / rec.numel:.4f}", f"{count}/{rec.numel}"))
            blocks.append("\n".join(format_table(rows)))
            blocks += found.skipped_lines()
        if self._probe is not None:
            latents = "the G step's own latents" if self._probe.estimator == "step" else "fresh latents"
            source = f"probe on {latents} every {self.strategy.br_every} G steps"
            if self._probe.fresh_fallbacks:
                source += f"; {self._probe.fresh_fallbacks} samples on fresh latents (G's forward not seen by hooks)"
        else:
            source = "one sample per observe() call"
        blocks.append(f"\nbalance ratio ({source}, window {self.balance.window}): {self.balance!r}")
        return "\n".join(blocks)

    def state_dict(self) -> dict[str, Any]:
        """Masks, step counters, algorithm state and RNG states of both networks.

        The models' own ``state_dict`` keys are untouched; save this next to them.
        """
        return {
            "format": STATE_FORMAT,
            "strategy": type(self.strategy).__name__,
            "strategy_config": repr(self.strategy),
            "balance": self.balance.state_dict(),
            "probe": self._probe.state_dict() if self._probe is not None else None,
            "ledger": self.ledger.state_dict() if self.ledger is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "networks": {
                net.name: {
                    "masks": net.weights.state_dict() if net.algorithm is not None else {},
                    "steps": net.steps,
                    "mask_updates": net.mask_updates,
                    "skipped_updates": net.skipped_updates,
                    "rng": net.generator.get_state(),
                    "algorithm": net.algorithm.state_dict() if net.algorithm is not None else {},
                }
                for net in self._networks.values()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output and enforce the masks.

        To resume bit-identically: build the models and optimizers, wrap them, then load the
        models', the optimizers' and this state dict (in any order), and continue the loop.

        Loading is atomic: every part (both networks' masks, counters, random generators and
        algorithm states, the balance ratio, the probe, the FLOPs ledger, the G-EMA) is checked
        first, and nothing changes unless all of them fit.

        Raises:
            WrapperStateError: If the state comes from another strategy or model, or any part of
                it is malformed (the wrapper is then unchanged).
        """
        self._check_state(state)
        for net in self._networks.values():
            saved = state["networks"][net.name]
            with _checking(net.name):
                if net.algorithm is not None:
                    net.weights.load_state_dict(saved["masks"])
                    net.algorithm.load_state_dict(saved["algorithm"])
                net.steps = int(saved["steps"])
                net.mask_updates = int(saved.get("mask_updates", 0))
                net.skipped_updates = int(saved.get("skipped_updates", 0))
                net.generator.set_state(saved["rng"])
        with _checking("balance ratio"):
            self.balance.load_state_dict(state["balance"])
        if self._probe is not None and state.get("probe") is not None:
            with _checking("balance-ratio probe"):
                self._probe.load_state_dict(state["probe"])
        if self.ledger is not None and state.get("ledger") is not None:
            with _checking("FLOPs ledger"):
                self.ledger.load_state_dict(state["ledger"])
        if self.ema is not None and state.get("ema") is not None:
            with _checking("G-EMA"):
                self.ema.load_state_dict(state["ema"])
        self._warn_resume_limits(state)

    def _warn_resume_limits(self, state: Mapping[str, Any]) -> None:
        """Say what a load could not carry over, so a resumed run is not silently different."""
        if state.get("ema") is not None and self.ema is None:
            logger.warning("the state dict holds a G-EMA copy, but this wrapper has no g_ema: the EMA copy is "
                           "not loaded (wrap with g_ema=... to keep it)")
        elif state.get("ema") is None and self.ema is not None:
            logger.warning("the state dict holds no G-EMA copy: the EMA starts again from the current generator")
        probe = self._probe
        if probe is not None and probe.real is not None and not callable(probe.real):
            logger.warning("the balance-ratio probe's real= iterable starts again from its first batch after a load "
                           "(an iterator's position cannot be saved), so samples that use it differ from an "
                           "uninterrupted run; pass real= as a seeded callable n -> batch for an exact resume")

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """Everything :meth:`load_state_dict` checks before it changes anything.

        Raises:
            WrapperStateError: At the first part that does not fit.
        """
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT \
                or not isinstance(state.get("networks"), Mapping):
            raise WrapperStateError("not a SparseGANWrapper state dict (expected the output of sg.state_dict())")
        if state.get("strategy") != type(self.strategy).__name__:
            raise WrapperStateError(
                f"state dict was saved with strategy {state.get('strategy')}, this wrapper uses "
                f"{type(self.strategy).__name__}; wrap with the same strategy to resume"
            )
        saved_config = state.get("strategy_config")  # absent in state dicts of earlier versions
        if saved_config is not None and saved_config != repr(self.strategy):
            raise WrapperStateError(
                f"state dict was saved with {saved_config}, this wrapper uses {self.strategy!r}; wrap with the same "
                "strategy configuration (densities, mode, schedules) to resume"
            )
        for net in self._networks.values():
            saved = state["networks"].get(net.name)
            if not isinstance(saved, Mapping):
                raise WrapperStateError(f"state dict has no entry for the {net.name}")
            with _checking(net.name):
                if net.algorithm is not None:
                    net.weights.check_state_dict(saved["masks"])
                    copy.deepcopy(net.algorithm).load_state_dict(saved["algorithm"])
                _count(saved["steps"], "steps")
                _count(saved.get("mask_updates", 0), "mask_updates")
                _count(saved.get("skipped_updates", 0), "skipped_updates")
                torch.Generator(device=net.generator.device).set_state(saved["rng"])
        with _checking("balance ratio"):
            copy.deepcopy(self.balance).load_state_dict(state["balance"])
        probe = state.get("probe")
        if self._probe is not None and probe is not None:
            with _checking("balance-ratio probe"):
                saved_estimator = probe.get("estimator", "fresh")
                if saved_estimator != self._probe.estimator:
                    raise WrapperStateError(
                        f"balance-ratio probe: saved balance-ratio estimator is {saved_estimator!r}, this probe's "
                        f"is {self._probe.estimator!r}; wrap with the same br_estimator"
                    )
                torch.Generator(device=self._probe.rng.device).set_state(probe["rng"])
        if self.ledger is not None and state.get("ledger") is not None:
            with _checking("FLOPs ledger"):
                self.ledger.check_state_dict(state["ledger"])
        if self.ema is not None and state.get("ema") is not None:
            with _checking("G-EMA"):
                self.ema.check_state_dict(state["ema"])

    def finalize(self) -> tuple[nn.Module, nn.Module]:
        """Bake the masks into the weights, remove every hook and return the plain modules.

        The returned generator and discriminator are the user's own (unwrapped) modules; their
        ``state_dict`` keys are unchanged, so it loads into a fresh, unwrapped instance of the same
        architecture. Save them compactly with :func:`sparsegan.save_sparse` (with
        ``masks=sg.masks(...)``, which still returns the baked masks).

        Afterwards the masks are no longer enforced: :meth:`density` raises and :meth:`report`
        says so.
        """
        self.apply_masks()
        self.remove()
        self._removed = "finalize()"
        return self._networks["generator"].module, self._networks["discriminator"].module

    def __reduce__(self) -> Any:
        raise TypeError(
            "a SparseGANWrapper cannot be pickled or deep-copied: it owns hooks on live modules and "
            "optimizers. Save sg.state_dict() next to the models' and optimizers' state dicts, and "
            "wrap the restored models again."
        )

    def _remove_probe(self) -> None:
        for handle in self._probe_handles:
            handle.remove()
        self._probe_handles.clear()
        self._probe = None  # with its hooks gone, nothing refers to the calls it recorded

    def remove(self) -> None:
        """Remove every hook. Weights stay as they are (inactive ones remain 0).

        Afterwards the masks are no longer enforced: further training may make pruned weights
        nonzero, so :meth:`density` raises and :meth:`report` says so. Removing twice is harmless.
        """
        if self._removed is None:
            self._removed = "remove()"
        self._remove_probe()
        for net in self._networks.values():
            for handle in net.handles:
                handle.remove()
            net.handles.clear()
            if _WRAPPED.get(net.module) == net.name:
                del _WRAPPED[net.module]

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{n.name}={type(n.module).__name__}(density={n.density():.4f}, weights={len(n.weights)})"
            for n in self._networks.values()
        )
        removed = "" if self._removed is None else f", masks no longer enforced since {self._removed}"
        return f"SparseGANWrapper(strategy={self.strategy!r}, {parts}{removed})"
