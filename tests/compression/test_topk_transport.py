"""Top-k's two transports (megallama/optimizer/compression_topk.py): the all-gather of every rank's
pairs and the reduce-scatter to the owner chunks (then an all-gather of the dense chunks at stage 0, nothing more at
ZeRO-1) send the same pairs and give the same training, on 4 gloo ranks; each step's bytes are the chosen
transport's, and the choice is the cheaper one."""
import math

import pytest
import torch

from compression_harness import make, train
from dist_utils import run_distributed
from megallama.optimizer.compression import CompressionConfig
from megallama.optimizer.compression_topk import TopKCompressor, topk_layout, topk_transport_bytes

STEPS = 8
CFG = CompressionConfig("topk", topk_ratio=0.3, warmup_steps=0)  # exact steps would sum in another order


def _runs(rank, world):
    out = {}
    auto = TopKCompressor.transport
    for name, stage, forced in (("ag0", 0, "all_gather"), ("rs0", 0, "reduce_scatter"), ("rs1", 1, None)):
        TopKCompressor.transport = auto if forced is None else (lambda self, b, k, f=forced: f)
        ddp, opt, comps = make(stage, CFG, clip_grad=0.0)
        chosen = auto(comps[0], ddp.layout.buckets[0], math.ceil(CFG.topk_ratio * ddp.layout.buckets[0].numel_unpadded))
        losses, rep = train(ddp, opt, STEPS)
        params = torch.cat([p.detach().reshape(-1) for p in ddp.module.parameters()]).numpy()
        b = ddp.layout.buckets[0]
        out[name] = (losses, params, rep, chosen, len(ddp.layout.buckets), b.numel_unpadded, b.numel)
    TopKCompressor.transport = auto
    return out


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_runs, 4)


def test_transports_train_alike(runs):
    for rank, r in runs.items():
        l_ag, p_ag = r["ag0"][:2]
        for name in ("rs0", "rs1"):
            losses, params = r[name][:2]
            assert all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(l_ag, losses)), (rank, name, l_ag, losses)
            p, q = torch.from_numpy(params), torch.from_numpy(p_ag)
            assert float((p - q).norm() / q.norm()) <= 1e-6, (rank, name)


def test_bytes_are_the_transports_and_the_cheaper_is_chosen(runs):
    r = runs[0]
    for name, stage, transport in (("ag0", 0, "all_gather"), ("rs0", 0, "reduce_scatter"),
                                   ("rs1", 1, "reduce_scatter")):
        _, _, rep, chosen, n_buckets, unpadded, numel = r[name]
        assert n_buckets == 1
        k = math.ceil(CFG.topk_ratio * unpadded)
        costs = topk_transport_bytes(unpadded, numel, k, 4, stage)
        exact = rep["baseline_bytes_per_step"]
        want = (CFG.warmup_steps * exact + (STEPS - CFG.warmup_steps) * costs[transport]) / STEPS
        assert rep["bytes_per_step"] == pytest.approx(want, rel=1e-9), name
        assert chosen == min(costs, key=costs.get)
    # at 4 ranks and 30 %, reduce-scatter wins at both stages, and at ZeRO-1 it sends less than DDP's own
    assert r["rs0"][3] == r["rs1"][3] == "reduce_scatter"
    assert r["rs1"][2]["compression_ratio"] > 1.5


def test_layout_and_choice():
    c, kc, counts = topk_layout(1000, 1000, 1000, 4)  # ratio 1: every entry of every chunk
    assert c == 256 and kc == 256 and counts == (256, 256, 256, 232)
    c, kc, counts = topk_layout(1000, 1024, 100, 4)  # the ZeRO-1 padded bucket: the last chunk is whole
    assert (c, kc, counts) == (256, 26, (26, 26, 26, 26))
    n = 1 << 20
    few = topk_transport_bytes(n, n, n // 100, 4, 0)  # 1 % on 4 ranks: the all-gather is cheaper
    assert few["all_gather"] < few["reduce_scatter"]
    many = topk_transport_bytes(n, n, n // 100, 64, 0)  # on 64 ranks the all-gather grows 63x the message
    assert many["reduce_scatter"] < many["all_gather"]
