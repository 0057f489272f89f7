"""DDP: two CPU processes on gloo keep bit-identical masks and take the same controller decisions."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sparsegan import SparseGANWrapper
from sparsegan.strategies import DDST

ITERATIONS = 36


def _checksum(masks: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from tests.conftest import adam, mlp_gan, real_batch, train

    torch.manual_seed(0)  # identical initial weights, as DDP requires
    G, D = mlp_gan(hidden=16)
    ddp_g, ddp_d = nn.parallel.DistributedDataParallel(G), nn.parallel.DistributedDataParallel(D)
    g_opt, d_opt = adam(ddp_g), adam(ddp_d)
    strategy = DDST(0.3, 0.3, update_every=3, grow="random", d_update_every=3, br_every=1, br_window=2)
    # a different seed per rank on purpose: random growth differs, the broadcast must fix it
    sg = SparseGANWrapper(ddp_g, ddp_d, g_opt, d_opt, strategy=strategy, seed=rank,
                          latent=lambda n: torch.randn(n, 8),
                          real=lambda n: real_batch(n, torch.Generator().manual_seed(rank)))
    sums: list[list[str]] = []
    train(ddp_g, ddp_d, g_opt, d_opt, ITERATIONS, latent=8, seed=100 + rank,
          on_iteration=lambda it: sums.append([_checksum(sg.masks("G")), _checksum(sg.masks("D"))]))
    result = {
        "sums": sums,
        "updates": [sg.mask_updates("G"), sg.mask_updates("D")],
        "decisions": [[s, d.action, d.density] for s, d in sg.algorithm("D").controller.decisions],
        "history": [h[1] for h in sg.balance.history],
        "zeros_ok": all(torch.count_nonzero(G.get_parameter(n).detach()[~m]) == 0 for n, m in sg.masks("G").items()),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_two_rank_gloo_masks_are_bit_identical(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["sums"] == r1["sums"]  # after every iteration, both networks
    assert len({tuple(s) for s in r0["sums"]}) > 10  # the masks really changed along the way
    assert r0["updates"][0] >= 10 and r0["updates"] == r1["updates"]
    assert r0["decisions"] == r1["decisions"] and len(r0["decisions"]) >= 10
    assert r0["history"] == r1["history"]  # BR samples all-reduced
    assert r0["zeros_ok"] and r1["zeros_ok"]
