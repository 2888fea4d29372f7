"""The estimator on today's features, against the real model: MoE shared experts, --moe-ffn-hidden-size, expert
capacity and padding to it, fp8 linears, --async-save's host copy.

Parameters are counted on built models; saved activation bytes are measured on CPU as tests/test_memory.py does
(``saved_tensors_hooks``, distinct storages, parameters excluded) and must equal the formulas exactly, in one
process and on tp 2 with and without sequence parallelism; the checkpoint's host copy is what a real
``SaveRequest`` copies; the CLI and the training flags' estimate accept the new flags.
"""
import os
import subprocess
import sys

import pytest
import torch

import megallama.activation_memory as am
from megallama.activation_memory import Numerics, Shape
from megallama.errors import ConfigError
from megallama.memory import estimate_requirements
from megallama.memory_tracker import saved_bytes
from megallama.moe_memory import MoEShape

from dist_utils import run_distributed
from test_memory import CFG, KERNELS, NUMERICS, ROOT, TINY, _autocast, _model, fused_kernels

E, K = 4, 2
# (name, strategy parameters): capacity 0.25 fills every expert (cap 4 of ~16 assignments each), so the bound the
# estimator takes (min(T*k, E*C) kept) is what the dispatch keeps
MOE_CASES = [("plain", {}), ("shared", {"moe_shared_expert_intermediate_size": 96}),
             ("ffn", {"moe_ffn_hidden_size": 32}),
             ("capacity", {"moe_expert_capacity_factor": 0.25}),
             ("padded", {"moe_expert_capacity_factor": 0.25, "moe_pad_expert_input_to_capacity": True}),
             ("padded-shared", {"moe_expert_capacity_factor": 0.5, "moe_pad_expert_input_to_capacity": True,
                                "moe_shared_expert_intermediate_size": 64})]


def _moe_model(cfg, prec, mode, rec, params, sp=False):
    from megallama.strategies import TrainingStrategy, apply_strategy
    m = _model(cfg, prec, mode, rec, sp)
    apply_strategy([m], TrainingStrategy("moe", dict(num_experts=E, experts_per_token=K, **params)))
    if mode == "params" and prec == "bf16":
        m.to(torch.bfloat16)  # the new MoE layers are built in fp32
    return m


def _moe_shape(cfg, params, ep=1):
    cf = params.get("moe_expert_capacity_factor")
    return MoEShape(E, E // ep, K, params.get("moe_ffn_hidden_size") or cfg.ffn_hidden_size,
                    params.get("moe_shared_expert_intermediate_size", 0), cf,
                    params.get("moe_pad_expert_input_to_capacity", False))


def _expected(cfg, x, num, rec, moe=None):
    layer = moe.layer_saved(x, num, rec) if moe is not None else am.layer_saved(x, num, rec)
    return cfg.num_layers * sum(layer.values()) + am.rope_tables(x) + am.embedding_saved(x) + \
        sum(am.head_saved(x, num).values())


def _run(m, cfg, prec, mode, b=2, s=16):
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    with saved_bytes(m) as got, _autocast(prec, mode):
        m(ids, labels=ids, loss_mask=torch.ones(b, s))
    return got["bytes"]


# ---------------------------------------------------------------- parameters


def _split(model):
    experts = sum(p.numel() for p in model.parameters() if getattr(p, "expert_parallel", False))
    return sum(p.numel() for p in model.parameters()) - experts, experts


@pytest.mark.parametrize("name,params", MOE_CASES[:3])
def test_moe_parameters_match_the_built_model(name, params):
    """num_params and the expert / dense split (shared expert and router dense: reduced over all of dp) equal the
    built model's; ZeRO-1 over dp 4 with ep 2 shards the experts' optimizer states over 2, the rest over 4."""
    from megallama.memory import model_split
    m = _moe_model(CFG, "fp32", "autocast", "none", params)
    dense, experts = _split(m)
    est = estimate_requirements("tiny", model_config=CFG.replace(num_experts=E, moe_router_topk=K), strategy="moe",
                                sequence_length=16, recommend=False, **params)
    assert est["num_params"] == est["params_per_gpu"] == dense + experts
    trainable, exp, frozen = model_split(CFG.replace(num_experts=E), "moe", **{
        k: v for k, v in params.items() if k != "moe_expert_capacity_factor"})
    assert (trainable, exp, frozen) == (dense, experts, 0)
    z1 = estimate_requirements("tiny", model_config=CFG.replace(num_experts=E, moe_router_topk=K), strategy="moe",
                               sequence_length=16, num_gpus=4, ep=2, zero_stage=1, recommend=False, **params)
    assert z1["breakdown_bytes"]["optimizer"] == 12 * dense // 4 + 12 * (experts // 2) // 2


def test_hybrid_trains_the_moe_layers_whole():
    """LoRA + experts: the routers and shared experts train with the experts (strategies.apply_strategy)."""
    from megallama.memory import model_split
    from megallama.strategies import TrainingStrategy, apply_strategy
    m = _model(CFG, "fp32", "autocast", "none")
    params = dict(num_experts=E, experts_per_token=K, moe_shared_expert_intermediate_size=96, lora_rank=4)
    apply_strategy([m], TrainingStrategy("hybrid", params))
    trained = [p for p in m.parameters() if p.requires_grad]
    want = (sum(p.numel() for p in trained if not getattr(p, "expert_parallel", False)),
            sum(p.numel() for p in trained if getattr(p, "expert_parallel", False)),
            sum(p.numel() for p in m.parameters() if not p.requires_grad))
    assert model_split(CFG.replace(num_experts=E), "hybrid", 4, moe_shared_expert_intermediate_size=96) == want


# ---------------------------------------------------------------- saved activations, one process


@pytest.mark.parametrize("fused", KERNELS)
def test_moe_saved_bytes_equal_formula(fused):
    with fused_kernels(fused):
        for prec, mode in NUMERICS:
            for rec in ("none", "selective"):
                for name, params in MOE_CASES:
                    if rec == "selective" and name not in ("shared", "padded"):
                        continue
                    got = _run(_moe_model(CFG, prec, mode, rec, params), CFG, prec, mode)
                    want = _expected(CFG, Shape.of(CFG, 2, 16), Numerics.of(prec, mode, fused), rec,
                                     _moe_shape(CFG, params))
                    assert got == want, (name, prec, mode, rec, got - want)


def test_padded_rows_are_capacity_sized():
    """Padding makes the expert rows E*min(C, T) whatever the routing: more than T*k at capacity factor 2."""
    moe = _moe_shape(CFG, {"moe_expert_capacity_factor": 2.0, "moe_pad_expert_input_to_capacity": True})
    assert moe.rows(32) == E * 32 and moe.kept(32) == 32 * K
    est = estimate_requirements("tiny", model_config=CFG.replace(num_experts=E, moe_router_topk=K), strategy="moe",
                                sequence_length=16, batch_size=2, recommend=False, moe_expert_capacity_factor=2.0,
                                moe_pad_expert_input_to_capacity=True)
    plain = estimate_requirements("tiny", model_config=CFG.replace(num_experts=E, moe_router_topk=K),
                                  strategy="moe", sequence_length=16, batch_size=2, recommend=False)
    assert est["layout"]["moe"]["expert_rows"] == 128 and plain["layout"]["moe"]["expert_rows"] == 64
    assert est["breakdown_bytes"]["activations"] > plain["breakdown_bytes"]["activations"]


def _fp8_model(cfg, prec, mode, rec, sp=False):
    from megallama.mpu.fp8 import Fp8Recipe, enable_fp8
    m = _model(cfg, prec, mode, rec, sp)
    enable_fp8(m.model.layers, Fp8Recipe("hybrid"))
    return m


def test_fp8_saved_bytes_equal_formula():
    """fp8 linears keep 1-byte inputs (q/k/v, o, gate/up, down) and their scales, no weight casts."""
    for prec, mode in (p for p in NUMERICS if p[0] == "bf16"):
        for rec in am.RECOMPUTE[:2]:
            got = _run(_fp8_model(CFG, prec, mode, rec), CFG, prec, mode)
            x = Shape.of(CFG, 2, 16)
            want = _expected(CFG, x, Numerics.of(prec, mode, KERNELS[-1], fp8=True), rec)
            assert got == want, (prec, mode, rec, got - want)
            bf16 = _expected(CFG, x, Numerics.of(prec, mode, KERNELS[-1]), rec)
            assert want < bf16


# ---------------------------------------------------------------- tp 2 (+ sequence parallel)

CFG_TP = CFG.replace(ffn_hidden_size=192)  # fp8 needs every GEMM dim per tp rank a multiple of 16


def _tp_worker(rank, world, cases):
    from megallama.mpu import parallel_state as ps
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    out = []
    for kind, params, sp in cases:
        if kind == "fp8":
            m = _fp8_model(CFG_TP, "bf16", "params", "none", sp)
        else:
            m = _moe_model(CFG_TP, "bf16", "params", "none", params, sp)
        out.append((_run(m, CFG_TP, "bf16", "params"), sum(p.numel() for p in m.parameters())))
    return out


def test_saved_bytes_and_parameters_with_tensor_and_sequence_parallel():
    cases = [(kind, params, sp) for sp in (False, True)
             for kind, params in (("fp8", {}), ("moe", MOE_CASES[1][1]), ("moe", MOE_CASES[5][1]))]
    res = run_distributed(_tp_worker, 2, cases)
    for rank in (0, 1):
        for (kind, params, sp), (got, n_params) in zip(cases, res[rank]):
            x = Shape.of(CFG_TP, 2, 16, tp=2, sp=sp)
            num = Numerics.of("bf16", "params", KERNELS[-1], fp8=kind == "fp8")
            moe = _moe_shape(CFG_TP, params) if kind == "moe" else None
            assert got == _expected(CFG_TP, x, num, "none", moe), (rank, kind, params, sp)
            est = estimate_requirements("tiny", model_config=CFG_TP.replace(num_experts=E if moe else 0,
                                                                            moe_router_topk=K),
                                        strategy="moe" if moe else "standard", sequence_length=16, num_gpus=2,
                                        tp=2, recommend=False, fp8_format="hybrid" if kind == "fp8" else None,
                                        **params)
            assert est["params_per_gpu"] == n_params, (rank, kind, params)


# ---------------------------------------------------------------- --async-save's host copy


def test_checkpoint_host_copy_is_what_a_save_copies(tmp_path):
    """``SaveRequest.begin`` copies this rank's model tensors and optimizer states to host memory (pinned and kept
    with --async-save on CUDA); the estimate's host figure is their bytes (RNG state aside)."""
    from megallama.arguments import parse_args
    from megallama.checkpointing.save_request import SaveRequest
    from megallama.initialize import initialize_megatron
    from megallama.mpu import parallel_state as ps
    from megallama.training_setup import setup_model_and_optimizer
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import measure_memory
    args = parse_args(TINY + ["--bf16", "--mock-data", "--train-iters", "1", "--device", "cpu", "--async-save",
                              "--save", str(tmp_path)], world_size=1)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    dev = initialize_megatron(args)
    chunks, optimizer = setup_model_and_optimizer(args, dev)
    from megallama.training import make_forward_step
    from megallama.finalize_model_grads import finalize_model_grads
    from megallama.training_setup import get_forward_backward
    get_forward_backward(args)(make_forward_step(args, dev), measure_memory._batches(args, dev), chunks,
                               args.num_microbatches, args.seq_length, args.micro_batch_size, forward_only=False)
    finalize_model_grads(chunks, args)
    optimizer.step()  # Adam's moments exist from the first step on
    req = SaveRequest.begin(str(tmp_path), 1, chunks, optimizer, args, 0)
    copied = sum(t.numel() * t.element_size() for t in req.payload["tensors"].values())
    from megallama.memory_args import estimate_for_args
    est = estimate_for_args(args, 1, recommend=False)
    assert est["host_pinned_gb_per_gpu"] * 2**30 == pytest.approx(copied, rel=1e-3)
    assert measure_memory.estimate_for(args, dev, 1)["breakdown_bytes"]["optimizer"] > 0


# ---------------------------------------------------------------- the flags


def test_training_flags_reach_the_estimate():
    """What --dry-run and the pretrain-time advice print (memory_args) carries the MoE options, fp8, async-save."""
    from megallama.arguments import parse_args
    from megallama.memory_args import estimate_for_args
    moe = ["--num-experts", "4", "--moe-shared-expert-intermediate-size", "96", "--moe-ffn-hidden-size", "32",
           "--moe-expert-capacity-factor", "1.5", "--moe-pad-expert-input-to-capacity"]
    est = estimate_for_args(parse_args(TINY + ["--bf16", "--mock-data", "--async-save", "--save", "/nonexistent"]
                                       + moe, world_size=1), 1, recommend=False)
    lay = est["layout"]["moe"]
    assert (lay["ffn_hidden_size"], lay["shared_expert_intermediate_size"], lay["pad_to_capacity"]) == (32, 96, True)
    assert est["host_pinned_gb_per_gpu"] > 0
    fp8 = estimate_for_args(parse_args(TINY + ["--bf16", "--mock-data", "--fp8-format", "hybrid"], world_size=1), 1,
                            recommend=False)
    bf16 = estimate_for_args(parse_args(TINY + ["--bf16", "--mock-data"], world_size=1), 1, recommend=False)
    assert fp8["layout"]["fp8_format"] == "hybrid"
    assert fp8["breakdown_bytes"]["activations"] < bf16["breakdown_bytes"]["activations"]


def test_estimate_memory_tool_accepts_the_new_flags():
    from megallama.memory_cli import run
    from megallama.mpu.fp8 import FORMATS
    from megallama import memory
    assert tuple(memory.FP8_FORMATS) == tuple(FORMATS)
    est = run(["--model", "tiny_llama3_50m", "--strategy", "moe", "--num-experts", "8",
               "--moe-shared-expert-intermediate-size", "512", "--moe-expert-capacity-factor", "1.0",
               "--moe-pad-expert-input-to-capacity", "--async-save", "--seq-length", "64"])["estimate"]
    assert est["layout"]["moe"]["expert_rows"] == 8 * 16 and est["host_pinned_gb_per_gpu"] > 0
    est = run(["--model", "tiny_llama3_50m", "--fp8-format", "e4m3", "--seq-length", "64"])["estimate"]
    assert est["layout"]["fp8_format"] == "e4m3" and est["breakdown_bytes"]["weight_casts"] == 0
    tool = os.path.join(ROOT, "tools", "estimate_memory.py")
    for bad, fragment in ((["--fp8-format", "hybrid", "--precision", "fp16"], "needs bf16"),
                          (["--strategy", "moe", "--num-experts", "8", "--moe-pad-expert-input-to-capacity"],
                           "needs --moe-expert-capacity-factor")):
        out = subprocess.run([sys.executable, tool, "--model", "tiny_llama3_50m", *bad], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 2 and out.stderr.startswith("error:") and fragment in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="does not cover MoE"):
        estimate_requirements("tiny_llama3_50m", strategy="moe", num_experts=8, fp8_format="hybrid")


# ---------------------------------------------------------------- whole training steps on CPU


@pytest.mark.parametrize("extra", [
    ["--fp8-format", "hybrid"],
    ["--num-experts", "4", "--moe-shared-expert-intermediate-size", "96", "--moe-expert-capacity-factor", "1.5",
     "--moe-pad-expert-input-to-capacity"]], ids=["fp8", "moe-shared-padded"])
def test_whole_training_step_matches_estimate_on_cpu(extra):
    """The loop's own pieces (benchmarks/measure_memory.py), every byte tracked: within 3% of the estimate."""
    from test_memory import _measure
    rec = _measure(TINY + extra)
    assert abs(rec["rel_err"]) < 0.03, (extra, rec["measured"], rec["estimate"])


def test_grad_reduce_in_bf16_halves_the_gradient_estimate():
    """--grad-reduce-in-bf16 keeps a bf16 gradient buffer (optimizer/distributed.py): 2 bytes a parameter."""
    from megallama.arguments import parse_args
    from megallama.memory_args import estimate_for_args
    base = TINY + ["--bf16", "--mock-data"]
    fp32 = estimate_for_args(parse_args(base, world_size=1), 1, recommend=False)["breakdown_bytes"]
    bf16 = estimate_for_args(parse_args(base + ["--grad-reduce-in-bf16"], world_size=1), 1,
                             recommend=False)["breakdown_bytes"]
    assert bf16["grads"] == pytest.approx(fp32["grads"] / 2) and bf16["weights"] == fp32["weights"]
