"""TensorBoard events carry Megatron's tag names and values: per --tensorboard-log-interval iteration the
iteration's loss, learning rate, grad norm and friends, each also "vs samples"; validation and test losses; timers
per --log-interval. Under pp 2 the events and the log lines (the last rank's, as Megatron's: a stage with the loss)
hold the single process's values, and the params-norm collective is taken by every rank. A resumed run's events go
on from the step it resumed at; MoE aux losses carry Megatron's names and values."""
import contextlib
import io
import json
import math
import os
import re

import pytest

from dist_utils import run_distributed

ARGV = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6", "--lr", "1e-2",
        "--lr-warmup-iters", "2", "--no-progress-bar", "--no-fused-kernels", "--device", "cpu", "--log-interval", "3",
        "--eval-interval", "3", "--eval-iters", "1", "--split", "80,10,10", "--log-params-norm",
        "--log-num-zeros-in-grad", "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard",
        "--log-world-size-to-tensorboard"]

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo plums".split()


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def write_corpus(folder) -> str:
    """The runs' jsonl, next to ``folder`` (written once: before spawning ranks that share it)."""
    corpus = os.path.join(os.path.dirname(str(folder)), "corpus.jsonl")
    if not os.path.exists(corpus):
        with open(corpus, "w") as f:
            for i in range(40):
                f.write(json.dumps({"text": " ".join(WORDS[(i * 5 + j) % len(WORDS)] for j in range(30))}) + "\n")
    return corpus


def _run(folder, extra=(), world=1):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    corpus = write_corpus(folder)
    return pretrain(parse_args(ARGV + ["--tensorboard-dir", str(folder), "--data-path", corpus, "--data-cache-dir",
                                       os.path.join(os.path.dirname(str(folder)), "cache"), *extra],
                               world_size=world))


def test_megatron_tags_and_values(tmp_path):
    out = _run(tmp_path / "tb")
    ev = _events(tmp_path / "tb")
    steps = [1, 2, 3, 4, 5, 6]
    samples = [4 * s for s in steps]
    for tag in ("learning-rate", "batch-size", "lm loss", "loss-scale", "grad-norm", "num-zeros", "params-norm",
                "world-size"):
        assert [s for s, _ in ev[tag]] == steps, tag
        assert [s for s, _ in ev[f"{tag} vs samples"]] == samples, tag
        assert [v for _, v in ev[tag]] == [v for _, v in ev[f"{tag} vs samples"]], tag
    assert [v for _, v in ev["lm loss"]] == pytest.approx([out["losses"][s] for s in steps], rel=1e-6)
    assert [v for _, v in ev["grad-norm"]] == pytest.approx([out["grad_norms"][s] for s in steps], rel=1e-6)
    assert [v for _, v in ev["batch-size"]] == [4] * 6 and [v for _, v in ev["world-size"]] == [1] * 6
    assert [v for _, v in ev["loss-scale"]] == [1.0] * 6
    lr = [v for _, v in ev["learning-rate"]]
    assert lr[0] == pytest.approx(5e-3) and lr[1] == pytest.approx(1e-2) and lr[1] > lr[-1] > 0  # warmup, decay
    assert [s for s, _ in ev["lm loss validation"]] == [3, 6]
    assert [s for s, _ in ev["lm loss validation vs samples"]] == [12, 24]
    assert [v for _, v in ev["lm loss validation"]] == pytest.approx([out["valid_losses"][3], out["valid_losses"][6]])
    assert [v for _, v in ev["lm loss validation ppl"]] == pytest.approx(
        [math.exp(out["valid_losses"][3]), math.exp(out["valid_losses"][6])], rel=1e-5)
    assert ev["lm loss test"] == [(6, pytest.approx(out["test_loss"]))]
    for tag in ("iteration-time", "throughput", "tokens-per-second"):
        assert [s for s, _ in ev[tag]] == [3, 6] and all(v > 0 for _, v in ev[tag]), tag
    assert not [t for t in ev if t.startswith(("train/", "valid/"))]


def test_tensorboard_log_interval_and_switches(tmp_path):
    _run(tmp_path / "tb", ["--tensorboard-log-interval", "2", "--no-log-learning-rate-to-tensorboard",
                           "--no-log-loss-scale-to-tensorboard"])
    ev = _events(tmp_path / "tb")
    assert [s for s, _ in ev["lm loss"]] == [2, 4, 6] and [s for s, _ in ev["params-norm"]] == [2, 4, 6]
    assert "learning-rate" not in ev and "loss-scale" not in ev
    assert [s for s, _ in ev["iteration-time"]] == [3, 6]  # timers follow --log-interval


def _pp2(rank, world, folder):
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        _run(folder, ["--pipeline-model-parallel-size", "2"], world=world)
    return os.getpid(), text.getvalue()


def _printed(out):
    """The log lines' loss, loss scale, grad norm, num zeros and params norm, and the validation losses."""
    lines = re.findall(r"lm loss: ([0-9.E+-]+) \| loss scale: ([0-9.]+) \| grad norm: ([0-9.]+) \| num zeros: "
                       r"([0-9.]+) \| params norm: ([0-9.]+) \|", out)
    return [float(v) for line in lines for v in line] + [float(v) for v in re.findall(r"lm loss value: (\S+) ", out)]


def test_pipeline_run_writes_the_single_process_values(tmp_path):
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        ref = _run(tmp_path / "one")
    outs = run_distributed(_pp2, 2, str(tmp_path / "pp2"))
    (pid0, out0), (pid1, out1) = outs[0], outs[1]
    files = os.listdir(tmp_path / "pp2")  # events.out.tfevents.<time>.<host>.<pid>.<n>: Megatron's last rank writes
    assert len(files) == 1 and f".{pid1}." in files[0] and f".{pid0}." not in files[0], files
    assert out1.count("lm loss:") == 2 and out1.count("validation loss at") == 3  # printed once (the last rank)
    assert "lm loss:" not in out0 and "validation loss at" not in out0
    # the last stage prints every value of the log line as one process does (to the printed digits)
    assert len(_printed(out1)) == 2 * 5 + 3 and _printed(out1) == pytest.approx(_printed(text.getvalue()),
                                                                                rel=1e-5, abs=1.5e-3)
    one, pp2 = _events(tmp_path / "one"), _events(tmp_path / "pp2")
    for tag in ("lm loss", "grad-norm", "params-norm", "num-zeros", "lm loss validation", "lm loss test"):
        assert [s for s, _ in pp2[tag]] == [s for s, _ in one[tag]], tag
        assert [v for _, v in pp2[tag]] == pytest.approx([v for _, v in one[tag]], rel=1e-5), tag
    assert [v for _, v in pp2["world-size"]] == [2] * 6
    assert ref["losses"]


def test_timer_tags_are_seconds_per_iteration_as_megatrons_timers_write(tmp_path):
    _run(tmp_path / "tb", ["--timing-log-level", "1"])
    ev = _events(tmp_path / "tb")
    for (s, fb), (s2, it) in zip(ev["forward-backward-time"], ev["iteration-time"]):
        assert s == s2 and 0 < fb < it < 60, (s, fb, it)  # in ms the forward-backward would exceed the iteration


def test_resumed_run_goes_on_from_its_step_without_duplicates(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    _run(tmp_path / "tb", ["--save", ckpt, "--exit-interval", "3", "--eval-interval", "0"])
    _run(tmp_path / "tb", ["--save", ckpt, "--load", ckpt, "--eval-interval", "0"])
    ev = _events(tmp_path / "tb")  # two event files, read in file-name order (not always the runs' order)
    assert sorted(s for s, _ in ev["lm loss"]) == [1, 2, 3, 4, 5, 6]
    assert sorted(s for s, _ in ev["lm loss vs samples"]) == [4, 8, 12, 16, 20, 24]
    assert sorted(s for s, _ in ev["iteration-time"]) == [3, 6]


def test_moe_aux_losses_carry_megatrons_names_and_values(tmp_path):
    from megallama.logging import moe_scalars
    from megallama.model.moe import MoEConfig
    report = {"aux_loss": 0.0125, "z_loss": 0.004, "max_load": 1.5}
    cfg = MoEConfig(num_experts=4, topk=2, aux_loss_coeff=1e-2, z_loss_coeff=1e-3)
    assert moe_scalars(cfg, report) == {"load_balancing_loss": pytest.approx(1.25), "z_loss": pytest.approx(4.0),
                                        "moe/max_load": 1.5}  # Megatron's tracker divides the coefficients out
    cfg = MoEConfig(num_experts=4, topk=2, aux_loss_coeff=1e-2, load_balancing_type="seq_aux_loss")
    assert set(moe_scalars(cfg, report)) == {"seq_load_balancing_loss", "moe/max_load"}  # no z-loss: no tag
    _run(tmp_path / "tb", ["--strategy", "moe", "--num-experts", "4", "--moe-router-topk", "2",
                           "--moe-z-loss-coeff", "1e-3", "--eval-interval", "0"])
    ev = _events(tmp_path / "tb")
    assert [s for s, _ in ev["load_balancing_loss"]] == [3, 6] and [s for s, _ in ev["z_loss"]] == [3, 6]
    assert all(0.5 < v < 4 for _, v in ev["load_balancing_loss"])  # ~1 for a balanced router, as Megatron's
    assert not [t for t in ev if t in ("moe/aux_loss", "moe/z_loss")]
