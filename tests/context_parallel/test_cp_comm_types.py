"""--cp-comm-type allgather (K/V all-gather, dK/dV reduce-scatter) and a2a+p2p (Ulysses inside
--hierarchical-context-parallel-sizes groups, the ring across) on gloo ranks equal one process (fp32: loss within
1e-5 relative, every full gradient within 1e-5 relative norm, on every rank).

Two spawns (2 and 4 ranks), on cp_harness's tiny GQA Llama (4 heads, 2 kv heads, seq 32):
- attention alone against full causal attention, forward and backward, with and without packed documents: the
  all-gather at cp 2 and 4 (math and torch-CPU-flash blocks), a2a+p2p as 2 x 2 at cp 4;
- the model: cp 2 / cp 4 all-gather (packed documents, full recompute), cp 2 x tp 2 with sequence parallelism,
  a2a+p2p 2 x 2 (and with documents);
- training: 3 AdamW steps with clipping through our DDP + distributed optimizer, cp 2 x dp 2 all-gather and cp 4
  a2a+p2p 2 x 2, against torch AdamW on the whole batch.
- ``pretrain`` with the flags as users type them: cp 2 all-gather + full recompute, cp 4 a2a+p2p 2 x 2.
Plus the one-line refusals of the argument check (per-layer lists, missing or wrong hierarchical sizes).
"""
import argparse
import re

import pytest
import torch

import cp_harness as H
from dist_utils import run_distributed
from megallama.config import ModelConfig
from megallama.errors import ConfigError
from megallama.model import context_parallel as mcp
from megallama.mpu import parallel_state as ps

TOL = H.TOL
CFG_LAYERS = H.CFG.num_layers
STEPS = 3
MODEL_CASES = {  # name: (world, tp, cp, comm, sequence_parallel, documents, recompute, hierarchical)
    "cp2_allgather": (2, 1, 2, "allgather", False, False, False, None),
    "cp2_allgather_documents_recompute": (2, 1, 2, "allgather", False, True, True, None),
    "cp4_allgather": (4, 1, 4, "allgather", False, False, False, None),
    "cp4_allgather_documents": (4, 1, 4, "allgather", False, True, False, None),
    "cp2_tp2_sp_allgather": (4, 2, 2, "allgather", True, False, False, None),
    "cp2_tp2_allgather_documents": (4, 2, 2, "allgather", False, True, False, None),
    "cp4_a2a+p2p_2x2": (4, 1, 4, "a2a+p2p", False, False, False, [2, 2]),
    "cp4_a2a+p2p_2x2_documents_recompute": (4, 1, 4, "a2a+p2p", False, True, True, [2, 2]),
}
LOOP = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3", "--lr", "1e-2",
        "--lr-warmup-iters", "0", "--mock-data", "--no-progress-bar", "--device", "cpu"]
TRAINING = {"cp2_dp2_allgather": (2, "allgather", None), "cp4_a2a+p2p_2x2": (4, "a2a+p2p", [2, 2])}


def _attention_cases(rank, world):
    """Each variant on this rank's zig-zag chunks against full causal attention (fp64 reference)."""
    ps.initialize_model_parallel(1, 1, context_parallel_size=world)
    out = {}
    try:
        variants = {"allgather_math": lambda *a, **kw: mcp.allgather_attention(*a, backend="math", **kw),
                    "allgather_sdpa_cpu": lambda *a, **kw: mcp.allgather_attention(*a, backend="sdpa_cpu", **kw)}
        if world == 4:
            mcp.set_context_parallel_comm_type("a2a+p2p", [2, 2])  # its sub-groups, for hierarchical_attention
            variants["a2a+p2p_2x2"] = mcp.hierarchical_attention
        out = H.attention_errors(rank, world, variants)[0]
    finally:
        mcp.set_context_parallel_comm_type("p2p")
        ps.destroy_model_parallel()
    return out


def _counting(calls, name):
    """Wrap ``mcp.<name>`` to count its calls: the model cases must reach the variant under test."""
    fn = getattr(mcp, name)

    def wrapped(*a, **kw):
        calls[name] = calls.get(name, 0) + 1
        return fn(*a, **kw)
    setattr(mcp, name, wrapped)


def _job(rank, world):
    out = {"attention": _attention_cases(rank, world), "model": {}, "training": {}, "calls": {}}
    calls = {}
    for name in ("allgather_attention", "hierarchical_attention", "ring_attention", "ulysses_attention"):
        _counting(calls, name)
    for name, (w, tp, cp, comm, sp, docs, recompute, hier) in MODEL_CASES.items():
        if w == world:
            calls.clear()
            out["model"][name] = H.cp_run(tp, cp, comm, sp, docs, recompute, hierarchical=hier)
            out["calls"][name] = dict(calls)
    if world == 4:
        for name, (cp, comm, hier) in TRAINING.items():
            out["training"][name] = H.zero_training(1, cp, STEPS, comm, hier)
    return out


@pytest.fixture(scope="module")
def runs():
    return {world: run_distributed(_job, world) for world in (2, 4)}


@pytest.mark.parametrize("world", [2, 4])
def test_allgather_and_hierarchical_attention_equal_full_attention(runs, world):
    for rank, res in runs[world].items():
        att = res["attention"]
        assert len(att) == (4 if world == 2 else 6)
        for key, err in att.items():
            assert err < TOL, (world, rank, key, err)


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_model_loss_and_grads_equal_one_process(runs, references, name):
    world, docs = MODEL_CASES[name][0], MODEL_CASES[name][5]
    ref = references[docs]
    for rank, res in runs[world].items():
        got = res["model"][name]
        want = "allgather_attention" if MODEL_CASES[name][3] == "allgather" else "hierarchical_attention"
        assert res["calls"][name].get(want, 0) >= CFG_LAYERS, (name, res["calls"][name])
        assert "ulysses_attention" not in res["calls"][name], res["calls"][name]
        H.assert_same_as_one_process(got, ref, rank)


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_adamw_training_equals_one_process(runs, name):
    ref = H.reference_training(STEPS)
    for rank, res in runs[4].items():
        H.assert_training_same_as_one_process(res["training"][name], ref, rank)


def _check(comm, sizes=None, cp=4, tp=1, heads=4):
    from megallama.argument_checks import check_context_parallel
    cfg = ModelConfig(name="t", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=heads,
                      num_query_groups=2, vocab_size=256, max_position_embeddings=64)
    args = argparse.Namespace(context_parallel_size=cp, tensor_model_parallel_size=tp, seq_length=32,
                              cp_comm_type=comm, hierarchical_context_parallel_sizes=sizes, model_config=cfg)
    check_context_parallel(args)
    return args


def test_argument_check_refuses_in_one_line():
    assert _check(["allgather"]).cp_comm_type == "allgather"
    assert _check(["p2p", "p2p"]).cp_comm_type == "p2p"  # Megatron's per-layer list, all the same
    assert _check(["a2a+p2p"], [2, 2]).cp_comm_type == "a2a+p2p"
    assert _check(["allgather"], tp=2, heads=2).cp_comm_type == "allgather"  # any head count
    cases = {(("p2p", "a2a"), None): "per-layer --cp-comm-type lists (p2p a2a) are not supported",
             (("a2a+p2p",), None): "needs --hierarchical-context-parallel-sizes A B",
             (("a2a+p2p",), (2, 4)): "both >= 2, with A x B = --context-parallel-size 4; got [2, 4]",
             (("a2a+p2p",), (1, 4)): "both >= 2",
             (("allgather",), (2, 2)): "--hierarchical-context-parallel-sizes is for --cp-comm-type a2a+p2p",
             (("a2a+p2p",), (2, 2)): "to be divisible by the a2a size 2; use --cp-comm-type p2p or allgather"}
    for (comm, sizes), msg in cases.items():
        with pytest.raises(ConfigError, match=re.escape(msg)) as e:
            few = comm == ("a2a+p2p",) and sizes == (2, 2)  # 1 head per tp rank for an a2a of 2
            _check(list(comm), None if sizes is None else list(sizes), tp=2 if few else 1, heads=2 if few else 4)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("world,extra", [
    (2, ["--context-parallel-size", "2", "--cp-comm-type", "allgather", "--recompute-granularity", "full"]),
    (4, ["--context-parallel-size", "4", "--cp-comm-type", "a2a+p2p", "--hierarchical-context-parallel-sizes", "2",
         "2"]),
], ids=["cp2_allgather_recompute", "cp4_a2a+p2p_2x2"])
def test_pretrain_matches_single_process(world, extra):
    """The real loop, flags as users type them (the hierarchical sizes reach the loop through the argument check)."""
    from loop_harness import assert_layout_matches_single_process
    assert_layout_matches_single_process(LOOP, world, extra)
