"""The memory estimate of a stage that sends its outputs: one hidden state alive (the latest, until its send is
over), not one per microbatch in flight; interleaved groups of N hold the warm-up's chunk forwards. Each rank's
measured peak of real training steps (CPU, every byte tracked) against its own stage's estimate, pp 2: the
first stage holds 2 (1F1B, ZB-H1) to 8 (GPipe) microbatches, so a held output per microbatch would show."""
import pytest

from dist_utils import run_distributed
from test_memory import TINY
from test_memory_zb_h1 import _zb_worker

PP = TINY[:2] + ["--num-layers", "4"] + TINY[4:] + ["--pipeline-model-parallel-size", "2", "--global-batch-size", "16"]
CONFIGS = [(PP, 0.005), (PP + ["--pipeline-schedule", "gpipe"], 0.005), (PP + ["--pipeline-schedule", "zb-h1"], 0.005),
           (PP + ["--recompute-granularity", "full"], 0.01),
           # interleaved prices each chunk forward in flight a little low (-0.2% a chunk here): 7 of them with N = 4
           (PP + ["--num-layers-per-virtual-pipeline-stage", "1", "--microbatch-group-size-per-virtual-pipeline-stage",
                  "4"], 0.02)]


@pytest.fixture(scope="module")
def errors():
    return run_distributed(_zb_worker, 2, [argv for argv, _ in CONFIGS])


@pytest.mark.parametrize("i", range(len(CONFIGS)), ids=lambda i: " ".join(CONFIGS[i][0][len(PP):]) or "1f1b")
def test_each_stage_within_its_estimate(errors, i):
    """The first stage (it sends) within ``tol``; the last within test_memory's 4% (it sends nothing here but
    interleaved's first chunk)."""
    for rank, values in errors.items():
        err, _ = values[i]
        assert abs(err) < (CONFIGS[i][1] if rank == 0 else 0.04), (rank, CONFIGS[i][0][len(PP):], err)
