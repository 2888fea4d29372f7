"""--profile-step: one iteration under torch.profiler, summarised as a top-10 table (CPU operators here)."""
import pytest

from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.profiling import StepProfiler
from megallama.training import pretrain

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "16", "--vocab-size", "256",
        "--micro-batch-size", "2", "--global-batch-size", "2", "--no-progress-bar", "--device", "cpu", "--mock-data",
        "--train-iters", "3", "--log-interval", "1"]


def test_profile_step_prints_top_ops_of_that_iteration(capsys):
    out = pretrain(parse_args(TINY + ["--profile-step", "2"], world_size=1))
    text = capsys.readouterr().out
    assert "profile of iteration 2:" in text and text.count("profile of iteration") == 1
    table = [ln for ln in text.splitlines() if ln.startswith("| ") and "`" in ln]
    assert len(table) == 10
    shares = [float(ln.rsplit("|", 2)[-2].strip().rstrip("%")) for ln in table]
    assert shares[0] > 0 and all(0 <= s <= 100 for s in shares) and shares == sorted(shares, reverse=True)
    assert any("mm" in ln or "linear" in ln for ln in table)  # the matmuls are among the heaviest ops
    assert len(out["losses"]) == 3


def test_profile_step_must_be_positive():
    with pytest.raises(ConfigError, match="--profile-step 0"):
        StepProfiler(0, None)
