"""Kernel banks: N kernels in one parameter, mixed per sample, then one grouped conv (issue 14 item 1).

The models are ours, in plain torch and in einops form. What is checked: discovery follows the
bank through the sum over its axis (every method); the bank gets one kernel mask shared across
the bank, so the mixed kernel that reaches the conv is exactly as sparse as the mask and the FLOPs
ledger's ratio is the hand-computed one; DST keeps the bank's masks shared, with hand-worked
prune-and-grow and resize cases; unshared masks are refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from sparsegan import SparseGANWrapper
from sparsegan.discovery import discover
from sparsegan.masks import MaskedWeights, MaskStateError
from sparsegan.schedules import ConstantDropFraction, UpdateSchedule
from sparsegan.strategies import DST, DynamicSparsity, Static

BANK, C_IN, C_OUT, K, STYLE, SIDE = 4, 6, 5, 3, 8, 6


class BankConv(nn.Module):
    """A conv whose kernel is a per-sample softmax mix of a bank of ``BANK`` kernels, modulated."""

    def __init__(self, use_einops: bool) -> None:
        super().__init__()
        self.bank = nn.Parameter(torch.randn(BANK, C_OUT, C_IN, K, K) * 0.2)
        self.to_mix = nn.Linear(STYLE, BANK)
        self.to_style = nn.Linear(STYLE, C_IN)
        self.use_einops = use_einops

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        mix = F.softmax(self.to_mix(style), dim=-1)
        if self.use_einops:
            import einops

            kernels = einops.repeat(self.bank, "n o i h w -> b n o i h w", b=b)
            kernels = einops.reduce(kernels * einops.rearrange(mix, "b n -> b n 1 1 1 1"),
                                    "b n o i h w -> b o i h w", "sum")
        else:
            kernels = self.bank.unsqueeze(0).expand(b, -1, -1, -1, -1, -1)
            kernels = (kernels * mix[:, :, None, None, None, None]).sum(1)
        kernels = kernels * (self.to_style(style)[:, None, :, None, None] + 1.0)
        out = F.conv2d(x.reshape(1, b * C_IN, SIDE, SIDE), kernels.reshape(b * C_OUT, C_IN, K, K),
                       padding=K // 2, groups=b)
        return out.reshape(b, C_OUT, SIDE, SIDE)


class BankGenerator(nn.Module):
    def __init__(self, use_einops: bool = False) -> None:
        super().__init__()
        self.style = nn.Linear(STYLE, STYLE)
        self.start = nn.Linear(STYLE, C_IN * SIDE * SIDE)
        self.block = BankConv(use_einops)
        self.to_rgb = nn.Conv2d(C_OUT, 3, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.start(z).reshape(-1, C_IN, SIDE, SIDE)
        return self.to_rgb(F.relu(self.block(x, self.style(z))))


def small_d() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 4 * 4, 1))


# dense MACs per sample, by hand
MACS = {
    "style.weight": STYLE * STYLE,
    "start.weight": STYLE * C_IN * SIDE * SIDE,
    "block.bank": SIDE * SIDE * C_OUT * C_IN * K * K,  # the grouped conv, once per sample
    "block.to_mix.weight": STYLE * BANK,
    "block.to_style.weight": STYLE * C_IN,
    "to_rgb.weight": SIDE * SIDE * 3 * C_OUT,
}


class _ConvWeights(TorchFunctionMode):
    """Records the weight operand of every conv2d call."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.conv2d:
            self.weights.append(args[1].detach().clone())
        return func(*args, **(kwargs or {}))


def wrap(use_einops: bool, strategy, seed: int = 0) -> tuple[SparseGANWrapper, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    G, D = BankGenerator(use_einops), small_d()
    g_opt, d_opt = torch.optim.Adam(G.parameters(), lr=1e-2), torch.optim.Adam(D.parameters())
    sg = SparseGANWrapper(G, D, g_opt, d_opt, strategy=strategy, latent=lambda n: torch.randn(n, STYLE),
                          br_estimator=None)
    return sg, G, g_opt


def assert_shared(mask: torch.Tensor) -> None:
    assert bool((mask == mask[:1]).all()), "the bank's mask differs between its kernels"


@pytest.mark.parametrize("use_einops", [False, True])
@pytest.mark.parametrize("methods", [("fx", "export", "runtime"), ("export",), ("runtime",)])
def test_discovery_follows_the_bank_through_the_sum_over_its_axis(use_einops, methods) -> None:
    example = (torch.randn(2, C_IN, SIDE, SIDE), torch.randn(2, STYLE))
    result = discover(BankConv(use_einops), example, methods=methods)
    bank = result["bank"]
    assert (bank.op, bank.shared_dims) == ("conv2d", (0,))
    assert "sum over bank dim 0" in bank.via
    assert bank.macs_per_sample == MACS["block.bank"]
    assert "bank" not in {s.name for s in result.skipped}
    if methods[0] == "fx" and not use_einops:
        # fx traces it but has no shapes to find the bank's axis: it hands over to export, saying why
        assert result.method == "export"
        assert any("bank reach a sum over a named axis" in note for note in result.notes)


@pytest.mark.parametrize("use_einops", [False, True])
def test_the_bank_has_one_mask_shared_across_its_kernels_and_the_conv_sees_that_sparsity(use_einops) -> None:
    sg, G, _ = wrap(use_einops, Static(0.3, 0.5))
    mask = sg.masks("generator")["block.bank"]
    assert_shared(mask)
    kernel_density = float(mask[0].float().mean())
    assert 0 < kernel_density < 1
    record = ConvWeights = _ConvWeights()
    with torch.no_grad(), record:
        G(torch.randn(3, STYLE))
    mixed = ConvWeights.weights[0].reshape(3, C_OUT, C_IN, K, K)
    # the per-sample kernel is zero exactly where the shared mask is: one mask, not a union of N
    for sample in mixed:
        assert torch.equal(sample != 0, mask[0])
    # the density is the fraction of active parameters, and it is exact for the whole network
    assert sg.density("generator") == pytest.approx(0.3, abs=1 / 2000)


@pytest.mark.parametrize("use_einops", [False, True])
def test_the_flops_ratio_counts_the_bank_at_its_kernel_density(use_einops) -> None:
    sg, _, _ = wrap(use_einops, Static(0.3, 0.5))
    masks = sg.masks("generator")
    density = {name: float(m.float().mean()) for name, m in masks.items()}
    assert set(density) == set(MACS)
    expected = sum(MACS[n] * density[n] for n in MACS) / sum(MACS.values())
    assert sg.flops()["inference"]["generator"] == pytest.approx(expected)


@pytest.mark.parametrize("use_einops", [False, True])
def test_dst_updates_keep_the_bank_shared_with_exact_counts(use_einops) -> None:
    sg, G, g_opt = wrap(use_einops, DST(0.3, 0.5, update_every=2, drop_fraction=0.3))
    counts = {n: int(m.sum()) for n, m in sg.masks("generator").items()}
    history = [sg.masks("generator")["block.bank"]]
    for _ in range(8):
        g_opt.zero_grad()
        G(torch.randn(4, STYLE)).square().mean().backward()
        g_opt.step()
        masks = sg.masks("generator")
        assert_shared(masks["block.bank"])
        # a bank replaces its own share (the ordinary layers are ranked together): its count and
        # the network's are unchanged
        assert int(masks["block.bank"].sum()) == counts["block.bank"]
        assert sum(int(m.sum()) for m in masks.values()) == sum(counts.values())
        assert bool((G.block.bank[~masks["block.bank"]] == 0).all())
        # regrown positions start from zero optimizer state (the "reset" policy)
        grown = masks["block.bank"] & ~history[-1]
        assert bool((g_opt.state[G.block.bank]["exp_avg"][grown] == 0).all())
        history.append(masks["block.bank"].clone())
    assert sg.mask_updates("generator") == 4
    assert any(not torch.equal(a, b) for a, b in zip(history, history[1:])), "the bank was never rewired"


def _bank_and_plain() -> tuple[MaskedWeights, torch.optim.Optimizer, nn.Parameter, nn.Parameter]:
    # a bank of 2 kernels of shape 1x4, and an ordinary 1x4 weight
    bank = nn.Parameter(torch.tensor([[[1.0, 0.1, 3.0, 0.0]], [[1.0, 0.2, -2.0, 0.0]]]))
    plain = nn.Parameter(torch.tensor([[0.5, 0.4, 0.0, 0.1]]))
    kernel = torch.tensor([[True, True, True, False]])
    weights = MaskedWeights(["bank", "plain"], [bank, plain],
                            [kernel.expand(2, 1, 4).clone(), torch.tensor([[True, True, False, True]])],
                            shared_dims=[(0,), ()])
    return weights, torch.optim.SGD([bank, plain], lr=0.1), bank, plain


def test_prune_and_grow_of_a_bank_by_hand() -> None:
    weights, opt, bank, plain = _bank_and_plain()
    # |w| summed over the bank: [2, 0.3, 5, 0]; |grad| summed: [0, 18, 0, 1.5]
    bank.grad = torch.tensor([[[0.0, 9.0, 0.0, 1.0]], [[0.0, 9.0, 0.0, 0.5]]])
    plain.grad = torch.tensor([[0.0, 0.0, 2.0, 7.0]])
    dst = DynamicSparsity(0.5, update=UpdateSchedule(every=1), drop_fraction=ConstantDropFraction(1 / 3))
    moved = dst.prune_and_grow(weights, opt, torch.Generator(), 1 / 3)
    # bank: replace round(3 / 3) = 1 of its 3 positions: prune position 1 (0.3); position 1 has the
    # largest gradient but was just pruned, so grow position 3 (1.5), in both kernels
    assert weights.masks[0].tolist() == [[[True, False, True, True]], [[True, False, True, True]]]
    # the ordinary layer ranks alone: prune 0.1 (position 3), grow position 2 (grad 2; 3 was just pruned)
    assert weights.masks[1].tolist() == [[True, True, True, False]]
    assert moved == 2 + 1  # parameter entries that became active
    assert bank[0, 0, 1] == 0 and bank[1, 0, 1] == 0


def test_resize_of_a_bank_by_hand() -> None:
    from sparsegan.balance import DensityController
    from sparsegan.strategies.ddst import ControlledDensity

    weights, opt, bank, plain = _bank_and_plain()
    weights.set_masks(weights.expand([torch.tensor([[True, False, True, False]]),
                                      torch.tensor([[True, False, False, True]])]))
    assert weights.active_counts() == [4, 2]  # 6 of 12 entries
    bank.grad = torch.tensor([[[0.0, 1.0, 0.0, 4.0]], [[0.0, 1.0, 0.0, 1.0]]])
    plain.grad = torch.tensor([[0.0, 3.0, 1.0, 0.0]])
    controller = DensityController(0.5, bounds=(0.4, 0.6), step=0.25)
    algorithm = ControlledDensity(0.5, controller=controller, update=UpdateSchedule(every=1))
    # to 10 of 12: the bank scales its 2 positions to round(2 * 10 / 6) = 3 (grow position 3,
    # |grad| 5 > 2), and the ordinary layer takes the other 10 - 6 - 2 = 2 entries
    assert algorithm.resize(weights, opt, torch.Generator(), 10 / 12)
    assert weights.masks[0][0].tolist() == [[True, False, True, True]]
    assert_shared(weights.masks[0])
    assert weights.masks[1].tolist() == [[True, True, True, True]]
    assert sum(weights.active_counts()) == 10
    # down to 4 of 12: bank round(3 * 4 / 10) = 1 (keeps position 2: |w| 5; the grown position 3
    # is 0), ordinary layer 4 - 2 = 2 (keeps 0.5 and 0.1; the grown positions 1 and 2 are 0)
    assert algorithm.resize(weights, opt, torch.Generator(), 4 / 12)
    assert weights.masks[0][0].tolist() == [[False, False, True, False]]
    assert weights.masks[1].tolist() == [[True, False, False, True]]
    assert sum(weights.active_counts()) == 4


def test_a_mask_that_differs_across_the_bank_is_refused() -> None:
    weights, _, _, _ = _bank_and_plain()
    state = weights.state_dict()
    state["bank"][1, 0, 0] = False
    with pytest.raises(MaskStateError, match="kernel bank 'bank' differs along its bank axes"):
        weights.load_state_dict(state)
    assert weights.masks[0][1, 0, 0]  # nothing changed


@pytest.mark.parametrize("use_einops", [False, True])
def test_a_wrapped_bank_resumes_from_a_checkpoint(use_einops) -> None:
    sg, G, g_opt = wrap(use_einops, DST(0.3, 0.5, update_every=2))
    for _ in range(4):
        g_opt.zero_grad()
        G(torch.randn(4, STYLE)).square().mean().backward()
        g_opt.step()
    state = sg.state_dict()
    sg.remove()
    other, other_G, _ = wrap(use_einops, DST(0.3, 0.5, update_every=2), seed=1)
    assert not torch.equal(other.masks("generator")["block.bank"], sg.masks("generator")["block.bank"])
    other.load_state_dict(state)
    saved = state["networks"]["generator"]["masks"]
    assert all(torch.equal(other.masks("generator")[n], saved[n]) for n in saved)
    assert_shared(other.masks("generator")["block.bank"])
    assert (other.steps("generator"), other.mask_updates("generator")) == (4, 2)
    # the loaded masks are enforced on the other model's bank at once
    assert int(torch.count_nonzero(other_G.block.bank.detach()[~saved["block.bank"]])) == 0


def test_initial_masks_round_a_bank_to_whole_kernel_positions_and_keep_the_total_exact() -> None:
    shapes = {"bank": (4, 2, 3), "plain": (10, 10)}
    for density in (0.1, 0.37, 0.5, 0.9):
        masks = Static(density, density).build()["generator"].initial_masks(
            shapes, generator=torch.Generator().manual_seed(0), shared_dims={"bank": (0,)})
        assert_shared(masks[0])
        # 124 entries: the bank's count is a multiple of 4, the ordinary layer absorbs the rest
        assert sum(int(m.sum()) for m in masks) == round(density * 124)
        assert int(masks[0].sum()) % 4 == 0 and int(masks[0].sum()) > 0
