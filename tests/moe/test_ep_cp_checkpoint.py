"""The training loop with expert parallelism carved from context parallelism (2 ranks: cp 2 x ep 2, dp 1; ZeRO 1,
and ZeRO 3 whose dense params are sharded over the cp pair and gathered for the save): each cp rank holds other
experts, so each writes its experts (one writer per ep rank: expert-dp rank 0, whatever its cp rank) and their
Adam states. The save resumes bit-exact and loads into one process (next loss within 1e-6)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "checkpoint"))
import pytest  # noqa: E402
from ckpt_helpers import TINY, losses, ok, run  # noqa: E402


@pytest.mark.parametrize("zero", ["1", "3"])
def test_cp_x_ep_checkpoint_resumes_and_loads_into_one_process(tmp_path, zero):
    args = TINY + ["--num-experts", "4", "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "4"]
    layout = ["--context-parallel-size", "2", "--expert-model-parallel-size", "2", "--zero-stage", zero]
    ck, log = str(tmp_path / "ck"), str(tmp_path / "cp_ep.log")
    ok(run(args + layout + ["--save", ck, "--save-interval", "2", "--loss-log", log], 2))
    ref = losses(log)
    src = os.path.join(ck, "iter_0000002")
    log2 = str(tmp_path / "resumed.log")
    ok(run(args + layout + ["--load", src, "--loss-log", log2], 2))
    assert losses(log2) == {3: ref[3], 4: ref[4]}
    log3 = str(tmp_path / "single.log")
    ok(run(args + ["--load", src, "--loss-log", log3], 1))
    got = float(losses(log3)[3])
    assert abs(got - float(ref[3])) <= 1e-6 * float(ref[3]), (got, ref[3])
