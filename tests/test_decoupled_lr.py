"""Megatron's --decoupled-lr/--decoupled-min-lr: the input embedding and the output layer train at their own LR on
the run's schedule (warmup from --lr-warmup-init, decay style, iterations); every other parameter at --lr.

Single process: the LR each optimizer group has at every step of a warmup + decay run, against the formula written
out here; the log line; a resume that continues bit for bit, and what a changed --decoupled-lr does on resume
(refused, or Megatron's two flags). Parallel (gloo, 1e-5): pp2 with tied embeddings (the last stage's copy of the
output weight is decoupled too) and ZeRO-1/3 over dp2 equal the single-process run.
"""
import re

import pytest
import torch

from loop_harness import assert_layout_matches_single_process
from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.training import pretrain

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--mock-data", "--vocab-size", "256", "--no-progress-bar", "--device", "cpu"]
# peak 3e-3 -> floor 3e-4 for the rest; 3e-2 -> 1e-3 for embedding/output; 2 warmup iterations from 1e-4, then linear
SCHEDULE = ["--train-iters", "6", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--lr-warmup-init",
            "1e-4", "--lr-decay-style", "linear"]
DECOUPLED = ["--decoupled-lr", "3e-2", "--decoupled-min-lr", "1e-3"]
ENDS = {"model.embed_tokens.weight", "lm_head.weight"}


def _expected(i, peak, floor, init=1e-4, warmup=2, decay=6):
    """Megatron's warmup then linear decay, for the i-th update (0-based)."""
    if i < warmup:
        return init + (peak - init) * (i + 1) / warmup
    return floor + (peak - floor) * (1 - (i - warmup) / (decay - warmup))


def _spy(monkeypatch):
    """Record, at every optimizer step, each group's (is_decoupled_lr, lr, names of its parameters); check that the
    groups hold every piece once."""
    import megallama.training as tr
    setup, seen = tr.setup_model_and_optimizer, []

    def wrapped(args, device):
        chunks, opt = setup(args, device)
        step, names = opt.step, {id(pc.master): pc.name for pc in opt.pieces}

        def record():
            grouped = [id(p) for g in opt.param_groups for p in g["params"]]
            assert sorted(grouped) == sorted(names), "every parameter piece is in exactly one group"
            seen.append([(g.get("is_decoupled_lr", False), g["lr"], {names[id(p)] for p in g["params"]})
                         for g in opt.param_groups])
            return step()
        opt.step = record
        return chunks, opt
    monkeypatch.setattr(tr, "setup_model_and_optimizer", wrapped)
    return seen


def test_embedding_and_output_follow_the_decoupled_schedule_the_rest_the_main_one(monkeypatch, capsys):
    seen = _spy(monkeypatch)
    out = pretrain(parse_args(TINY + SCHEDULE + DECOUPLED + ["--untie-embeddings-and-output-weights"], world_size=1))
    assert len(seen) == 6
    for i, groups in enumerate(seen):
        for decoupled, lr, names in groups:
            peak, floor = (3e-2, 1e-3) if decoupled else (3e-3, 3e-4)
            assert lr == pytest.approx(_expected(i, peak, floor), rel=1e-12), (i, decoupled, lr)
            assert not names or (names <= ENDS if decoupled else not names & ENDS), (decoupled, names)
    assert set().union(*(n for d, _, n in seen[0] if d)) == ENDS  # both, in the weight-decayed group
    logged = re.findall(r"\| learning rate: ([0-9.E+-]+) \| decoupled learning rate: ([0-9.E+-]+) \|",
                        capsys.readouterr().out)
    assert [tuple(map(float, x)) for x in logged][-1] == pytest.approx((_expected(5, 3e-3, 3e-4),
                                                                        _expected(5, 3e-2, 1e-3)), rel=1e-6)
    seen.clear()
    plain = pretrain(parse_args(TINY + SCHEDULE + ["--untie-embeddings-and-output-weights"], world_size=1))
    assert len(seen[0]) == 2 and not any(d for d, _, _ in seen[0])  # no decoupled groups without the flag
    assert abs(plain["losses"][3] - out["losses"][3]) > 1e-3 * abs(out["losses"][3])  # so the pp/dp tests can fail


def test_only_decoupled_lr_decays_to_min_lr_and_tied_embedding_is_decoupled(monkeypatch):
    seen = _spy(monkeypatch)
    pretrain(parse_args(TINY + SCHEDULE + ["--decoupled-lr", "3e-2"], world_size=1))
    for i, groups in enumerate(seen):
        dec = [(lr, n) for d, lr, n in groups if d and n]
        assert dec and all(lr == pytest.approx(_expected(i, 3e-2, 3e-4), rel=1e-12) for lr, _ in dec)
    assert set().union(*(n for d, _, n in seen[0] if d)) == {"model.embed_tokens.weight"}  # tied: one weight


def test_a_resume_continues_exactly_and_a_changed_decoupled_lr_needs_a_flag(tmp_path, monkeypatch):
    argv = TINY + SCHEDULE + DECOUPLED
    full = pretrain(parse_args(argv, world_size=1))["losses"]
    ck = str(tmp_path / "ck")
    pretrain(parse_args(argv + ["--save", ck, "--save-interval", "3", "--exit-interval", "3"], world_size=1))
    seen = _spy(monkeypatch)
    rest = pretrain(parse_args(argv + ["--load", ck], world_size=1))["losses"]
    assert sorted(rest) == [4, 5, 6] and all(rest[s] == full[s] for s in rest), (rest, full)
    changed = TINY + SCHEDULE + ["--decoupled-lr", "2e-2", "--decoupled-min-lr", "1e-3", "--load", ck]
    with pytest.raises(ConfigError, match=re.escape("--decoupled-lr 0.03 in the checkpoint, 0.02 now")):
        pretrain(parse_args(changed, world_size=1))
    for flag, peak in (("--override-opt-param-scheduler", 2e-2), ("--use-checkpoint-opt-param-scheduler", 3e-2)):
        seen.clear()
        pretrain(parse_args(changed + [flag], world_size=1))
        lrs = [lr for d, lr, n in seen[0] if d]
        assert lrs and all(lr == pytest.approx(_expected(3, peak, 1e-3), rel=1e-12) for lr in lrs), (flag, lrs)
    with pytest.raises(ConfigError, match="pass --decoupled-lr 0.03 --decoupled-min-lr 0.001"):
        pretrain(parse_args(TINY + SCHEDULE + ["--load", ck, "--use-checkpoint-opt-param-scheduler"], world_size=1))


@pytest.mark.parametrize("argv,says", [
    (["--decoupled-min-lr", "1e-5"], "--decoupled-min-lr 1e-05 needs --decoupled-lr"),
    (["--decoupled-lr", "-1"], "--decoupled-lr must be >= 0, got -1"),
    (["--decoupled-lr", "1e-4", "--decoupled-min-lr", "1e-3"], "--decoupled-min-lr 0.001 is above --decoupled-lr"),
    (["--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 reduces a --bf16 model's gradients in bf16"),
    (["--grad-reduce-in-bf16", "--bf16", "--params-dtype", "fp32"], "but --params-dtype fp32 was given"),
    (["--grad-reduce-in-bf16", "--bf16", "--gradient-compression", "powersgd"], "pass one"),
])
def test_flag_mistakes_are_one_line(argv, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_args(TINY + ["--train-iters", "4"] + argv, world_size=1)


def test_grad_reduce_in_bf16_reaches_the_gradient_buffer(monkeypatch):
    import megallama.training as tr
    setup, dtypes = tr.setup_model_and_optimizer, []

    def wrapped(args, device):
        chunks, opt = setup(args, device)
        dtypes.append([c.grad_buffer.dtype for c in chunks])
        return chunks, opt
    monkeypatch.setattr(tr, "setup_model_and_optimizer", wrapped)
    for extra, want in ((["--grad-reduce-in-bf16"], torch.bfloat16), ([], torch.float32)):
        pretrain(parse_args(TINY + ["--train-iters", "1", "--bf16"] + extra, world_size=1))
        assert dtypes.pop() == [want]


PARALLEL = TINY + ["--train-iters", "4"] + SCHEDULE[2:] + DECOUPLED
UNTIED = ["--untie-embeddings-and-output-weights"]


@pytest.mark.parametrize("world,base,extra", [
    (2, PARALLEL, ["--pipeline-model-parallel-size", "2"]),
    (2, PARALLEL + UNTIED, ["--zero-stage", "1"]),
    (2, PARALLEL + UNTIED, ["--zero-stage", "3", "--overlap-grad-reduce"]),
], ids=["pp2_tied", "dp2_zero1", "dp2_zero3_overlap"])
def test_decoupled_lr_layouts_match_single_process(world, base, extra):
    assert_layout_matches_single_process(base, world, extra)


def test_python_api_training_config_passes_megatrons_optimizer_and_save_flags(tmp_path):
    """TrainingConfig carries --decoupled-lr/--decoupled-min-lr, --grad-reduce-in-bf16 and --async-save to the
    same parser (and its one-line refusals) as the command line."""
    from megallama.api import TrainingConfig
    cfg = TrainingConfig(mixed_precision="bf16", decoupled_lr=1e-2, decoupled_min_lr=1e-3, grad_reduce_in_bf16=True,
                         async_save=True, save_dir=str(tmp_path))
    args = parse_args(TINY + cfg.to_argv(), world_size=1)
    assert (args.decoupled_lr, args.decoupled_min_lr, args.grad_reduce_in_bf16, args.async_save) == \
        (1e-2, 1e-3, True, True)
    plain = parse_args(TINY + TrainingConfig(mixed_precision="bf16").to_argv(), world_size=1)
    assert (plain.decoupled_lr, plain.grad_reduce_in_bf16, plain.async_save) == (None, False, False)
    with pytest.raises(ConfigError, match="--grad-reduce-in-bf16"):
        parse_args(TINY + TrainingConfig(mixed_precision="fp32", grad_reduce_in_bf16=True).to_argv(), world_size=1)
