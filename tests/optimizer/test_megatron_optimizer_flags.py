"""Megatron's optimizer flags on megallama's command line: each restates megallama (accepted) or is refused with
one line naming the flag and what megallama does instead, never argparse's bare "unrecognized arguments" and never
silently ignored. The Adam and clipping values are checked when the arguments are parsed, with the flag's name."""
import subprocess
import sys
from pathlib import Path

import pytest

from megallama.arguments import parse_args
from megallama.errors import ConfigError

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--mock-data", "--vocab-size", "256", "--train-iters", "2", "--device", "cpu",
        "--no-progress-bar"]

REFUSED = {  # flags -> what the one error line must name (besides the flag itself)
    ("--exp-avg-dtype", "bf16"): "fp32",
    ("--exp-avg-sq-dtype", "fp16"): "fp32",
    ("--main-params-dtype", "fp16"): "fp32",
    ("--main-grads-dtype", "bf16"): "--grad-reduce-in-bf16",
    ("--optimizer-cpu-offload",): "--zero-stage",
    ("--optimizer-offload-fraction", "0.5"): "--zero-stage",
    ("--use-torch-optimizer-for-cpu-offload",): "--zero-stage",
    ("--overlap-cpu-optimizer-d2h-h2d",): "--zero-stage",
    ("--no-pin-cpu-grads",): "--zero-stage",
    ("--no-pin-cpu-params",): "--zero-stage",
    ("--sgd-momentum", "0.9"): "--optimizer sgd",
    ("--init-method-xavier-uniform",): "--init-method-std",
    ("--optimizer", "muon"): "adam (AdamW) or sgd",
    ("--adam-beta1", "1.0"): "[0, 1)",
    ("--adam-beta2", "-0.1"): "[0, 1)",
    ("--adam-eps", "0"): "> 0",
    ("--weight-decay", "-0.1"): ">= 0",
    ("--clip-grad", "-1"): "0 turns clipping off",
}


@pytest.mark.parametrize("flags", list(REFUSED), ids=lambda f: " ".join(f))
def test_refused_with_one_line_naming_the_flag_and_the_alternative(flags):
    with pytest.raises(ConfigError) as e:
        parse_args(TINY + list(flags), world_size=1)
    msg = str(e.value)
    assert flags[0] in msg and REFUSED[flags] in msg and "\n" not in msg, msg


@pytest.mark.parametrize("flags", [
    ["--use-precision-aware-optimizer"],
    ["--use-precision-aware-optimizer", "--main-grads-dtype", "fp32", "--main-params-dtype", "fp32",
     "--exp-avg-dtype", "fp32", "--exp-avg-sq-dtype", "fp32"],
    ["--apply-wd-to-qk-layernorm"], ["--no-weight-decay-cond-type", "apply_wd_to_qk_layernorm"],
    ["--optimizer", "adam"], ["--optimizer", "sgd"], ["--optimizer", "sgd", "--sgd-momentum", "0.5"],
    ["--clip-grad", "0"], ["--adam-beta1", "0"], ["--weight-decay", "0"]],
    ids=lambda f: " ".join(f))
def test_restating_values_are_accepted(flags):
    args = parse_args(TINY + flags, world_size=1)
    assert args.train_iters == 2


def test_command_line_prints_one_error_line_and_exits_nonzero():
    """Through the script: before any model is built, one line, exit status != 0."""
    r = subprocess.run([sys.executable, "pretrain_llama.py"] + TINY + ["--exp-avg-dtype", "bf16"],
                       capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    out = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode != 0
    assert any(line.startswith("error: --exp-avg-dtype bf16 is not supported") for line in out), out
    assert not any("Traceback" in line or "holds" in line for line in out), out
