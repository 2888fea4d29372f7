"""The estimator's context-parallel term (megallama/cp_memory.py): each --cp-comm-type's attention-backward buffers
against a hand count, and how the estimate takes them (a phase of its own, reported under 'buffers')."""
import re

import pytest

from megallama.cp_memory import COMM_TYPES, cp_attention_backward_bytes
from megallama.errors import ConfigError
from megallama.memory import WORKSPACE_BYTES, estimate_requirements

# b 1, 1024 local tokens, 8 query heads, 2 kv heads (GQA 4), head dim 64, bf16, cp 4
B, S, HQ, HK, D, E, CP = 1, 1024, 8, 2, 64, 2, 4
KV = 2 * E * B * S * HK * D  # this rank's K and V: 524288
Q = E * B * S * HQ * D  # its queries: 1048576


def test_comm_types_are_the_models():
    from megallama.model.context_parallel import COMM_TYPES as MODEL
    assert COMM_TYPES == MODEL


def test_each_comm_type_against_a_hand_count():
    f = lambda comm, sizes=None: cp_attention_backward_bytes(B, S, HQ, HK, D, E, CP, comm, sizes)  # noqa: E731
    # ring: K/V in hand + arriving (2 KV), dK/dV fp32 out + in (2 x 2 KV), fp32 dq (2 Q), the kernel's dK/dV and
    # their 4-head expansion (KV + 4 KV)
    assert f("p2p") == 2 * KV + 4 * KV + 2 * Q + 5 * KV == 7864320
    # all-gather: gathered K/V (4 KV), their fp32 grads (8 KV), the first chunk's fp32 dq (Q), the late chunk's
    # kernel over all 4096 keys (4 KV + 16 KV)
    assert f("allgather") == 4 * KV + 8 * KV + Q + 20 * KV == 17825792
    # Ulysses: 2 kv heads over cp 4 are repeated to 4; send, receive and reorder of q (Q) and K/V (2 KV)
    assert f("a2a") == 3 * (Q + 2 * KV) == 6291456
    # 2 x 2: Ulysses over 2 (no repeat: 3 (Q + KV)) or the ring over 2 on its layout (as p2p), whichever is larger
    assert f("a2a+p2p", [2, 2]) == max(3 * (Q + KV), 11 * KV + 2 * Q) == 7864320
    assert cp_attention_backward_bytes(B, S, HQ, HK, D, E, 1, "allgather") == 0


def test_bad_comm_type_and_sizes_are_one_line_errors():
    for comm, sizes, msg in (("ring", None, "'ring' is not one of p2p, a2a, allgather, a2a+p2p; fix --cp-comm-type"),
                             ("a2a+p2p", None, "needs --hierarchical-context-parallel-sizes A B"),
                             ("a2a+p2p", [2, 4], "with A x B = --context-parallel-size 4; got [2, 4]")):
        with pytest.raises(ConfigError, match=re.escape(msg)) as e:
            cp_attention_backward_bytes(B, S, HQ, HK, D, E, CP, comm, sizes)
        assert "\n" not in str(e.value)


def test_estimate_prices_the_allgather_at_long_context():
    """Llama 3 8B, 128K tokens over cp 8 with full recompute: the all-gather's attention backward is the peak and
    its buffers are exactly the formula's (ZeRO 0: nothing else in 'buffers' but the cuBLAS workspace); the ring's
    peak stays the head's."""
    kw = dict(sequence_length=131072, num_gpus=8, cp=8, recompute="full", recommend=False)
    ring = estimate_requirements("llama3_8b", cp_comm_type="p2p", **kw)
    ag = estimate_requirements("llama3_8b", cp_comm_type="allgather", **kw)
    want = cp_attention_backward_bytes(1, 131072 // 8, 32, 8, 128, 2, 8, "allgather")
    assert ag["peak_phase"] == "attention backward" and ring["peak_phase"] == "head forward"
    assert ag["breakdown_bytes"]["buffers"] == WORKSPACE_BYTES + want
    assert ag["memory_per_gpu_gb"] > ring["memory_per_gpu_gb"]
    assert ag["layout"]["cp_comm_type"] == "allgather"
    one = dict(kw, cp=1, num_gpus=1)
    assert estimate_requirements("llama3_8b", cp_comm_type="allgather", **one)["memory_per_gpu_gb"] == \
        estimate_requirements("llama3_8b", **one)["memory_per_gpu_gb"]


def test_cli_takes_the_comm_type():
    from megallama.memory_cli import run
    base = ["--model", "llama3_8b", "--seq-length", "131072", "--cp", "8", "--gpus", "8",
            "--recompute-granularity", "full"]
    got = run(base + ["--cp-comm-type", "a2a+p2p", "--hierarchical-context-parallel-sizes", "2", "4"])["estimate"]
    assert got["layout"]["cp_comm_type"] == "a2a+p2p"
    assert run(base + ["--cp-comm-type", "allgather"])["estimate"]["peak_phase"] == "attention backward"


def test_training_flags_reach_the_estimate():
    """--dry-run / the API / measure_memory price what the loop will run (memory_args.feature_kw)."""
    from megallama.arguments import parse_args
    from megallama.memory_args import estimate_for_args
    args = parse_args(["--model", "llama3_8b", "--seq-length", "131072", "--max-position-embeddings", "131072",
                       "--context-parallel-size", "8", "--cp-comm-type", "allgather", "--recompute-granularity",
                       "full", "--bf16", "--mock-data", "--micro-batch-size", "1", "--global-batch-size", "1"],
                      world_size=8)
    got = estimate_for_args(args, 8, recommend=False)
    assert got["layout"]["cp_comm_type"] == "allgather" and got["peak_phase"] == "attention backward"
