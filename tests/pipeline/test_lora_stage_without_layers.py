"""LoRA on pipeline layouts with a stage that holds no decoder layer: the embedding alone ("E|tt|ttL"), the loss
alone (a virtual "...|L") or nothing ("Et||tttL", an identity stage).

Such layouts were refused while parsing, because ``apply_lora`` raised "no module of the model matches
--lora-target-modules" on a stage without a target and DDP refused a stage whose parameters are all frozen. Now such
a stage gets no adapters and trains nothing itself; the runs equal one process (losses and every LoRA gradient within
1e-5 relative, fp32, gloo CPU ranks, plain and through DDP / ZeRO-1 / ZeRO-3), --save-adapter writes the adapter one
process writes and --load-adapter fills every stage's adapters. When no stage matches the targets (hybrid with every
MLP an MoE layer and MLP-only targets), every rank stops with the same one line."""
import os
import zlib

import pytest
import torch

from dist_utils import run_distributed
from loop_harness import train_losses
from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from pp_harness import MBS, SEED, SEQ, STEPS, check_against_reference, collect, collect_pieces, make_batches, \
    tiny_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
M = 3
# name, decoder layers per model part (part k on rank k % 3), schedule, ZeRO stage (None: no DDP wrapper)
CASES = [("Et||tttL-zero1", (1, 0, 3), "1f1b", 1),  # rank 1 holds nothing
         ("E|tt|ttL", (0, 2, 2), "1f1b", None),  # rank 0: the frozen embedding alone
         ("E|tt|ttL-zero3", (0, 2, 2), "1f1b", 3),
         ("E|t|t|t|t|L-interleaved-zero0", (0, 1, 1, 1, 1, 0), "interleaved", 0)]  # rank 2's last chunk: L alone


def _lora(chunks):
    """LoRA on every projection, B moved off zero (by name, the same on any layout) so that A gets gradients too."""
    from megallama.strategies import TrainingStrategy, apply_strategy
    apply_strategy(chunks, TrainingStrategy("lora", {"lora_rank": 4, "target_modules": TARGETS}), seed=SEED)
    for c in chunks:
        for n, p in c.named_parameters():
            if n.endswith("lora_B.weight"):
                g = torch.Generator().manual_seed(zlib.crc32(n.encode()))
                p.data.copy_(0.1 * torch.randn(p.shape, generator=g))
    return chunks


def _reference(num_layers):
    from megallama.model import build_model
    from megallama.pipeline.no_pipelining import forward_backward_no_pipelining
    model = _lora([build_model(tiny_config(num_layers), seed=SEED)])[0]
    losses = forward_backward_no_pipelining(STEPS["per_token"], iter(make_batches(M, 256)), [model], M, SEQ, MBS)
    return [float(d["lm loss"]) for d in losses], {n: p.grad.clone() for n, p in model.named_parameters()
                                                   if p.grad is not None}


def _run_cases(rank, world):
    from megallama.optimizer import DistributedDataParallel
    from megallama.pipeline import build_model_chunks, get_forward_backward_func
    ps.initialize_model_parallel(1, world)
    out = {}
    for name, counts, schedule, zero in CASES:
        chunks = _lora(build_model_chunks(tiny_config(sum(counts)), seed=SEED, schedule=schedule,
                                          layer_counts=counts))
        fb = get_forward_backward_func(world, schedule)
        lora = sorted(n for c in chunks for n, p in c.named_parameters() if p.requires_grad)
        assert all(".lora_" in n for n in lora), lora
        if zero is None:
            losses = fb(STEPS["per_token"], iter(make_batches(M, 256)), chunks, M, SEQ, MBS)
            out[name] = dict(collect(chunks, losses, fb), lora=lora)
            continue
        ddps = [DistributedDataParallel(c, zero_stage=zero, bucket_size=3000) for c in chunks]
        losses = fb(STEPS["per_token"], iter(make_batches(M, 256)), ddps, M, SEQ, MBS)
        for d in ddps:
            d.finish_grad_sync()
        out[name] = dict(collect_pieces(ddps, losses, fb), lora=lora)
    frozen = build_model_chunks(tiny_config(3), seed=SEED, layer_counts=(1, 1, 1))[0].requires_grad_(False)
    try:  # a module frozen by hand, not by LoRA: still nothing for DDP to do
        DistributedDataParallel(frozen)
    except ConfigError as e:
        out["frozen"] = str(e)
    return out


@pytest.fixture(scope="module")
def three_ranks():
    return run_distributed(_run_cases, 3)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_lora_grads_equal_one_process(three_ranks, case):
    name, counts, schedule, zero = case
    per_rank = {r: v[name] for r, v in three_ranks.items()}
    for r, res in per_rank.items():  # adapters exactly where decoder layers are; a stage without any trains nothing
        held = [counts[k] for k in range(r, len(counts), 3)]
        assert bool(res["lora"]) == (sum(held) > 0), (r, res["lora"])
        got = res["pieces"] if zero is not None else res["grads"]
        assert len(got) == len(res["lora"]), (r, len(got))
    ref_losses, ref_grads = _reference(sum(counts))
    assert all(float(ref_grads[n].abs().max()) > 0 for n in ref_grads)  # A and B both get gradients
    check_against_reference(per_rank, ref_losses, ref_grads, M, 3)


def test_a_stage_frozen_by_hand_is_still_refused(three_ranks):
    for r in range(3):
        assert three_ranks[r].get("frozen") == "the model has no trainable parameters; nothing for DDP/ZeRO to do"


# ------------------------------------------------------------------ the training loop, --save/--load-adapter
ARGS = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "32", "--vocab-size", "512", "--lr", "3e-2",
        "--lr-warmup-iters", "0", "--no-progress-bar", "--device", "cpu", "--mock-data", "--no-fused-kernels",
        "--micro-batch-size", "2", "--global-batch-size", "6", "--train-iters", "3", "--zero-stage", "1",
        "--strategy", "lora", "--lora-rank", "4", "--lora-target-modules", "q_proj,v_proj,down_proj",
        "--init-method-std", "0.2"]


def _pp3(layout):
    return ["--pipeline-model-parallel-size", "3", "--pipeline-model-parallel-layout", layout]


def _adapter(path):
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_loop_save_and_load_adapter_with_stages_without_layers(tmp_path):
    """pp 3 "Et||tttL" (rank 1 holds nothing) trains as one process and its --save-adapter equals one process's;
    "E|tt|ttL" (rank 0 holds the frozen embedding alone) loads that adapter into every stage (--load-adapter at lr 0:
    the adapter it saves is the one it loaded) and computes one process's losses from it."""
    one, pp = str(tmp_path / "one"), str(tmp_path / "pp")
    ref = run_distributed(train_losses, 1, ARGS + ["--save-adapter", one])[0]
    for losses in run_distributed(train_losses, 3, ARGS + _pp3("Et||tttL") + ["--save-adapter", pp]).values():
        assert sorted(losses) == [1, 2, 3]
        for s in ref:
            assert abs(losses[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, losses[s], ref[s])
    a, b = _adapter(one), _adapter(pp)
    assert sorted(a) == sorted(b) and len(a) == 4 * 3 * 2
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
    assert all(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # trained: B moved off zero

    load = ["--load-adapter", one, "--lr", "0", "--train-iters", "1"]
    back = str(tmp_path / "back")
    ref = run_distributed(train_losses, 1, ARGS + load)[0]
    for losses in run_distributed(train_losses, 3, ARGS + load + _pp3("E|tt|ttL") + ["--save-adapter", back]
                                  ).values():
        assert abs(losses[1] - ref[1]) <= 1e-5 * abs(ref[1]), (losses, ref)
    c = _adapter(back)
    assert sorted(c) == sorted(a) and all(torch.equal(a[k], c[k]) for k in a)


def _typo_worker(rank, world, argv):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    try:
        pretrain(parse_args(list(argv), world_size=world))
    except ConfigError as e:
        return str(e)
    return None


def test_no_stage_matching_the_targets_is_one_line_on_every_rank():
    """Hybrid with every MLP an MoE layer and --lora-target-modules down_proj: no stage holds a target (experts are
    not adapted). Each stage alone has none either; the check over the pipeline says so on every rank."""
    argv = [a for a in ARGS if a not in ("lora", "q_proj,v_proj,down_proj")]
    argv[argv.index("--strategy") + 1:argv.index("--strategy") + 1] = ["hybrid"]
    argv[argv.index("--lora-target-modules") + 1:argv.index("--lora-target-modules") + 1] = ["down_proj"]
    argv += ["--num-experts", "2", "--moe-router-topk", "1"] + _pp3("Et||tttL")
    errors = run_distributed(_typo_worker, 3, argv)
    assert len(set(errors.values())) == 1, errors
    msg = errors[0]
    assert msg is not None and "\n" not in msg, msg
    assert msg.startswith("no module of the model matches --lora-target-modules down_proj"), msg
