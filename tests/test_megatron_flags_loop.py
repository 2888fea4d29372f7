"""Megatron's training-loop flags on a Megatron launch line: --skip-train evaluates and exits, the timers print
Megatron's per-phase report, the overlap flags map onto what megallama does (or are one error line), the run's
length is set once, --use-checkpoint-args takes the checkpoint's --seq-length, and Ulysses' head count is checked
before any model is built."""
import os
import re

import pytest
import torch

from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.timers import TIMERS_TO_LOG, Timers
from megallama.training import pretrain
from test_training import _corpus as training_corpus

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--lr", "3e-3", "--no-progress-bar", "--device", "cpu"]


def _args(argv, world_size=1):
    return parse_args(argv, world_size=world_size)


def _corpus(tmp_path):
    return training_corpus(tmp_path, 120)


def test_skip_train_evaluates_the_loaded_checkpoint_and_exits(tmp_path, capsys):
    data = TINY + ["--data-path", _corpus(tmp_path), "--data-cache-dir", str(tmp_path / "cache"), "--split", "80,10,10",
                   "--eval-iters", "2", "--eval-interval", "3", "--train-iters", "3"]
    ck = str(tmp_path / "ck")
    trained = pretrain(_args(data + ["--save", ck]))
    capsys.readouterr()
    out = pretrain(_args(data + ["--load", ck, "--skip-train"]))
    printed = capsys.readouterr().out
    assert out["losses"] == {} and out["iteration"] == 3  # no training step; Megatron's iteration: the loaded one
    assert out["test_loss"] == trained["test_loss"]  # the same weights on the same test draw, bit for bit
    assert "skipping training (--skip-train is on)" in printed
    assert "iteration 3 on validation set" in printed and "iteration 3 on test set" in printed
    assert [d for d in os.listdir(ck) if d.startswith("iter_")] == ["iter_0000003"]  # nothing saved
    # an eval-only run never steps the LR schedule: another one (--train-iters 5: decay over 5) is not refused, and
    # evaluates as a run that keeps the checkpoint's schedule
    other = data + ["--load", ck, "--skip-train", "--train-iters", "5"]
    changed = pretrain(_args(other))
    kept = pretrain(_args(other + ["--use-checkpoint-opt-param-scheduler"]))
    assert (changed["valid_losses"], changed["test_loss"]) == (kept["valid_losses"], kept["test_loss"])
    assert changed["test_loss"] == out["test_loss"] and changed["iteration"] == 3
    fresh = pretrain(_args(data + ["--skip-train"]))  # no --load: the initial model, as Megatron
    assert fresh["iteration"] == 0 and fresh["test_loss"] > trained["test_loss"]


def test_train_iters_and_epochs_together_are_one_line():
    with pytest.raises(ConfigError, match=re.escape("--train-iters 5 and --epochs 1 both set the run's length; "
                                                    "pass one")):
        _args(TINY + ["--train-iters", "5", "--epochs", "1"])


def test_overlap_flags_map_onto_what_megallama_does():
    a = _args(TINY + ["--train-iters", "2", "--no-align-grad-reduce", "--no-overlap-p2p-communication"])
    assert (a.align_grad_reduce, a.overlap_p2p_comm) == (False, False)  # pp 1: no p2p to overlap, as Megatron
    with pytest.raises(ConfigError, match="--no-overlap-p2p-communication is not supported: megallama's pipeline "
                                          "always posts"):
        _args(TINY + ["--train-iters", "2", "--pipeline-model-parallel-size", "2", "--no-overlap-p2p-communication"],
              world_size=2)
    flag = "--overlap-param-gather-with-optimizer-step"
    a = _args(TINY + ["--train-iters", "2", "--use-distributed-optimizer", "--overlap-param-gather", flag])
    assert a.overlap_param_gather_with_optimizer_step and a.zero_stage == 1
    with pytest.raises(ConfigError, match=re.escape(f"{flag} needs --overlap-param-gather")):
        _args(TINY + ["--train-iters", "2", "--use-distributed-optimizer", flag])
    with pytest.raises(ConfigError, match=re.escape(f"{flag} needs the distributed optimizer's parameter all-gather")):
        _args(TINY + ["--train-iters", "2", "--overlap-param-gather", flag])
    # Megatron asserts it: at ZeRO stage 0 there is no parameter all-gather to overlap (it was silently ignored)
    for stage0 in ([], ["--zero-stage", "0"]):
        with pytest.raises(ConfigError, match=re.escape("--overlap-param-gather needs the distributed optimizer")):
            _args(TINY + ["--train-iters", "2", "--overlap-param-gather"] + stage0)
    for zero in (["--use-distributed-optimizer"], ["--zero-stage", "2"], ["--zero-stage", "3"]):
        assert _args(TINY + ["--train-iters", "2", "--overlap-param-gather"] + zero).overlap_param_gather


def test_timers_reduce_over_the_ranks_in_megatron_format(monkeypatch):
    ms = torch.zeros(2, len(TIMERS_TO_LOG), dtype=torch.float64)
    ms[:, TIMERS_TO_LOG.index("forward-backward")] = torch.tensor([40.0, 60.0])
    ms[1, TIMERS_TO_LOG.index("optimizer")] = 8.0  # ran on rank 1 only: rank 0's zero is left out
    for option, text in (("minmax", "(min, max) time across ranks (ms):\n    forward-backward " + "." * 31 +
                          ": (20.00, 30.00)\n    optimizer " + "." * 38 + ": (4.00, 4.00)"),
                         ("max", "max time across ranks (ms):\n    forward-backward " + "." * 31 + ": 30.00\n"
                          "    optimizer " + "." * 38 + ": 4.00"),
                         ("all", "times across ranks (ms):\n  forward-backward:\n     rank  0: 20.00\n     rank  1: "
                          "30.00\n  optimizer:\n     rank  1: 4.00")):
        t = Timers(1, option, True, torch.device("cpu"))
        monkeypatch.setattr(t, "_all_ranks", lambda: ms.clone())
        assert t.log(2) == (text, {"forward-backward": 30.0, "optimizer": 4.0})
    assert Timers(0, "minmax", True, torch.device("cpu")).log(1) == (None, {})


def test_timing_log_level_prints_the_phases_after_the_log_line(capsys):
    _args(TINY + ["--timing-log-option", "max", "--timing-log-level", "0"])  # level 0: nothing to reduce
    capsys.readouterr()
    pretrain(_args(TINY + ["--mock-data", "--vocab-size", "256", "--train-iters", "2", "--log-interval", "2",
                           "--timing-log-level", "1", "--timing-log-option", "max"]))
    out, err = capsys.readouterr()
    report = out.split("iteration        2/       2 |")[1].split("\n", 1)[1]
    assert report.startswith("max time across ranks (ms):\n    forward-backward ....")
    assert "    optimizer ...." in report and "batch-generator" not in report  # a level-2 timer
    assert "--timing-log-level 1: megallama times forward-backward, layernorm-grads-all-reduce" in err


def test_use_checkpoint_args_takes_the_checkpoints_seq_length(tmp_path):
    ck = str(tmp_path / "ck")
    pretrain(_args(TINY + ["--mock-data", "--vocab-size", "256", "--train-iters", "1", "--save", ck]))
    run = TINY[TINY.index("--seq-length") + 2:]  # the line's run flags: no model shape, no --seq-length
    line = ["--use-checkpoint-args", "--load", ck, "--mock-data", "--train-iters", "2"] + run
    assert _args(line).seq_length == 32  # it was min(context, 2048)
    assert _args(line + ["--seq-length", "16"]).seq_length == 16  # typed: Megatron's command line wins


def test_ulysses_head_count_is_checked_before_any_model_is_built():
    line = TINY + ["--train-iters", "2", "--seq-length", "64", "--tensor-model-parallel-size", "2",
                   "--context-parallel-size", "4", "--cp-comm-type", "a2a"]
    with pytest.raises(ConfigError, match=re.escape("--cp-comm-type a2a needs the 2 attention heads per "
                                                    "tensor-parallel rank (4/2) to be divisible by "
                                                    "--context-parallel-size 4; use --cp-comm-type p2p")):
        _args(line, world_size=8)
    assert _args(line[:-1] + ["p2p"], world_size=8).cp_comm_type == "p2p"


def test_fp32_mixed_precision_with_bf16_is_refused():
    """--mixed-precision fp32 --bf16 trained bf16 silently."""
    with pytest.raises(ConfigError, match="--mixed-precision fp32 and --bf16 contradict each other"):
        _args(TINY + ["--mixed-precision", "fp32", "--bf16"])


def test_auto_configure_with_overlap_param_gather_searches_only_distributed_optimizer_stages():
    """--overlap-param-gather needs ZeRO >= 1: --auto-configure must not pick stage 0 and then refuse its own plan."""
    from megallama.autoconfig_args import _zero_stages
    a = _args(TINY + ["--train-iters", "2", "--use-distributed-optimizer", "--overlap-param-gather"])
    assert _zero_stages(a) == (1,)
    a.zero_stage = None
    assert _zero_stages(a) == (1, 2, 3)
    a.overlap_param_gather = False
    assert _zero_stages(a) == (0, 1, 2, 3)
