"""ZeRO-3 with expert parallelism: under ep each rank keeps E/ep experts sharded over the expert-data-parallel group
(N/ep ranks), i.e. E/N of them, which is what ZeRO-3 over all N ranks keeps without ep: ep saves no model states
at stage 3 (it does at stages 0-2, where the experts' weights stay whole). Training builds the layout
(optimizer/zero3.py shards a MoE layer's experts over expert-dp, its dense params over dp x cp), so the estimator,
the tool and --dry-run price it."""
import json
import os
import subprocess
import sys

import pytest

from megallama.memory import estimate_requirements

from dist_utils import run_distributed
from test_memory import ROOT, TINY

MOE = ["--num-layers", "2", "--num-experts", "4", "--global-batch-size", "8"]

# tiny_llama3_50m by hand: hidden 256, FFN 1792, 10 layers, vocabulary 128256 (tied), 8 heads / 4 kv heads of 32
H, F, L, V, KV = 256, 1792, 10, 128256, 4 * 32
EXPERT = 3 * H * F  # gate, up, down of one expert
DENSE = V * H + L * (2 * H * H + 2 * H * KV + 2 * H + H * 8) + H  # embedding, attention, norms, router (8), norm


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_zero3_prices_experts_at_one_nth_per_rank_whatever_ep(ep):
    """8 GPUs, 8 experts, bf16 (p, g, K = 2, 4, 12): at ZeRO-3 every state is Ψ / 8, experts included (E/ep local
    experts over 8/ep expert-dp ranks); at ZeRO-2 the weights keep the dense params and the E/ep local experts."""
    r = estimate_requirements("tiny_llama3_50m", num_gpus=8, ep=ep, zero_stage=3, num_experts=8, strategy="moe",
                              precision="bf16", recommend=False)
    psi = DENSE + L * 8 * EXPERT
    assert r["num_params"] == psi
    b = r["breakdown_bytes"]
    assert (b["weights"], b["grads"], b["optimizer"]) == (2 * psi // 8, 4 * psi // 8, 12 * psi // 8)
    z2 = estimate_requirements("tiny_llama3_50m", num_gpus=8, ep=ep, zero_stage=2, num_experts=8, strategy="moe",
                               precision="bf16", recommend=False)["breakdown_bytes"]
    assert z2["weights"] == 2 * (DENSE + L * (8 // ep) * EXPERT)
    assert (z2["grads"], z2["optimizer"]) == (b["grads"], b["optimizer"])


def _build(rank, world, argv):
    """Build the model and optimizer as the training loop does: the number of experts this rank's ZeRO-3 shard
    holds and its expert-dp size."""
    from megallama.arguments import parse_args
    from megallama.initialize import initialize_megatron
    from megallama.mpu import parallel_state as ps
    from megallama.training_setup import setup_model_and_optimizer
    args = parse_args(argv + ["--mock-data", "--device", "cpu", "--bf16"], world_size=world)
    dev = initialize_megatron(args)
    model = setup_model_and_optimizer(args, dev)[0]
    ddp = model[0]
    return ddp.expert_comm.size, ps.get_expert_model_parallel_world_size(), ddp.zero_stage


def test_zero3_with_expert_parallel_builds_and_is_planned():
    """Two CPU ranks, ep 2, ZeRO-3: training builds it (expert-dp of one rank); the tool and --dry-run plan it."""
    argv = TINY + MOE + ["--expert-model-parallel-size", "2", "--zero-stage", "3"]
    assert run_distributed(_build, 2, argv) == {0: (1, 2, 3), 1: (1, 2, 3)}
    tool = os.path.join(ROOT, "tools", "estimate_memory.py")
    out = subprocess.run([sys.executable, tool] + argv + ["--gpus", "2", "--json"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    plan = json.loads(out.stdout)
    assert plan["layout"]["ep"] == 2 and plan["layout"]["zero_stage"] == 3
    out = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_llama.py"), "--dry-run"] + argv +
                         ["--gpus", "2"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
