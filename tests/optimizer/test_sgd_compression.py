"""Gradient compression under ``--optimizer sgd`` (the setting PowerSGD and DGC were designed in), 2 gloo ranks on
the compression tests' byte-level corpus: full-rank PowerSGD + SGD trains like uncompressed SGD (1e-5), rank-4
PowerSGD at ZeRO-1 and top-k 10% compress every step after the warm-up and the loss falls as fast as uncompressed
SGD's (within 5%). 1-bit Adam with SGD is refused (test_sgd.py)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "compression"))
from compression_harness import make, train  # noqa: E402
from dist_utils import run_distributed  # noqa: E402
from megallama.optimizer.compression import CompressionConfig  # noqa: E402

SGD = dict(optimizer="sgd", lr=0.5, sgd_momentum=0.9)
STEPS = 30
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _job(rank, world):
    out = {}
    ddp, opt, _ = make(0, **SGD)
    out["plain8"], _ = train(ddp, opt, 8)
    ddp, opt, comps = make(0, CompressionConfig("powersgd", rank=256, min_compression_rate=0.0, warmup_steps=2), **SGD)
    out["full_rank"], _ = train(ddp, opt, 8)
    out["full_rank_matrices"] = (sum(len(g["offs"]) for st in comps[0].state.values() for g in st["groups"]),
                                 sum(1 for p in ddp.module.parameters() if p.dim() >= 2))
    ddp, opt, _ = make(0, **SGD)
    out["plain"], _ = train(ddp, opt, STEPS)
    for name, stage, cfg in (("powersgd", 1, CompressionConfig("powersgd", rank=4, warmup_steps=3)),
                             ("topk", 0, CompressionConfig("topk", topk_ratio=0.1, warmup_steps=3))):
        ddp, opt, _ = make(stage, cfg, **SGD)
        losses, rep = train(ddp, opt, STEPS)
        out[name] = (losses, rep["compression_ratio"], type(opt.optimizer).__name__)
    return out


@pytest.fixture(scope="module")
def runs():
    return run_distributed(_job, 2)


def test_full_rank_powersgd_with_sgd_equals_uncompressed_sgd(runs):
    for rank, out in runs.items():
        compressed, matrices = out["full_rank_matrices"]
        assert compressed == matrices  # every matrix went through PowerSGD
        for a, b in zip(out["plain8"], out["full_rank"]):
            assert abs(a - b) <= 1e-5 * abs(a), (rank, out["plain8"], out["full_rank"])


@pytest.mark.parametrize("name", ["powersgd", "topk"])
def test_compressed_sgd_trains_like_uncompressed(runs, name):
    for rank, out in runs.items():
        losses, ratio, kind = out[name]
        plain = out["plain"]
        assert kind == "SGD" and ratio > 2, (name, ratio, kind)
        assert sum(losses[-5:]) / 5 < plain[0] - 1.0, (name, losses)  # it learns
        assert sum(losses[-5:]) <= 1.05 * sum(plain[-5:]), (name, losses[-5:], plain[-5:])
