"""--auto-configure with a fixed --context-parallel-size searches ep over dp x cp (Megatron's rule, as training's
grid checks it), so a MoE plan may carve its expert groups out of cp (ep > dp); every layout it weighs passes
training's checks, and the estimate prices ep spanning cp as ep spanning dp (E/ep experts per rank, their states
sharded over dp x cp / ep)."""
import contextlib
import io

import pytest

from megallama.arguments import parse_args
from megallama.autoconfig import _candidates, choose_layout, context_parallel_tps
from megallama.autoconfig_args import layout_flags
from megallama.cli import dry_run
from megallama.config import get_model_config
from megallama.errors import ConfigError
from megallama.memory import estimate_requirements
from megallama.memory_args import estimate_for_args
from megallama.memory_states import model_split
from megallama.mpu.parallel_state import validate_grid

# 16 experts of Llama 3 8B's FFN in 2 layers on 4 GPUs, all of them context-parallel (cp 4: dp 1), ZeRO-0 fixed:
# the experts fit 60 GiB only spread over 4 ranks (ep 1: 125 GiB, ep 2: 74 GiB), i.e. ep 4 > dp 1
MOE = ["--model", "llama3_8b", "--num-layers", "2", "--num-experts", "16", "--zero-stage", "0", "--bf16",
       "--seq-length", "4096", "--mock-data", "--gpu-memory-gb", "60", "--context-parallel-size", "4"]


def test_cp_plan_shards_the_experts_over_cp_and_training_accepts_its_flags():
    with contextlib.redirect_stdout(io.StringIO()) as said:
        args = parse_args(MOE + ["--auto-configure", "--gpus", "4", "--dry-run"], world_size=1)
    plan = args.auto_layout
    assert (plan["dp"], plan["cp"], plan["ep"]) == (1, 4, 4) and args.expert_model_parallel_size == 4
    assert "dp 1 cp 4 ep 4" in said.getvalue() and "shards the experts over dp x cp" in said.getvalue()
    flags = layout_flags(args)
    assert flags[flags.index("--context-parallel-size") + 1] == "4"
    assert flags[flags.index("--expert-model-parallel-size") + 1] == "4"
    # the printed flags, typed without --auto-configure: training's parser, the grid check of initialize_megatron,
    # and the one-process --dry-run (pretrain_llama.py's planning path) all take them
    base = MOE[:-2]  # the flags carry --context-parallel-size
    again = parse_args(base + flags, world_size=4)
    assert (again.data_parallel_size, again.context_parallel_size, again.expert_model_parallel_size) == (1, 4, 4)
    assert validate_grid(4, again.tensor_model_parallel_size, again.pipeline_model_parallel_size,
                         again.context_parallel_size, again.expert_model_parallel_size,
                         model_config=again.model_config) == 1
    with contextlib.redirect_stdout(io.StringIO()):
        assert dry_run(base + flags + ["--gpus", "4", "--dry-run"]) == 0
    # it saves memory: the plan fits (with the search's 5 % margin), the same layout at an ep dividing dp (1) not
    est = estimate_for_args(again, 4, recommend=False)
    assert est["layout"]["ep"] == 4 and est["memory_per_gpu_gb"] <= 0.95 * 60
    again.expert_model_parallel_size = 1
    assert not estimate_for_args(again, 4, recommend=False)["fits"]


@pytest.mark.parametrize("world,cp,experts,eps", [(4, 4, 16, {1, 2, 4}), (4, 4, 6, {1, 2}), (8, 2, 8, {1, 2, 4, 8}),
                                                  (8, 4, 4, {1, 2, 4})])
def test_every_candidate_passes_the_grid_check(world, cp, experts, eps):
    """ep runs over the divisors of dp x cp and the experts (more than dp's), and each (tp, pp, cp, ep) is a grid
    training builds."""
    cfg = get_model_config("llama3_8b", num_layers=2).replace(num_experts=experts)
    seen = set()
    for tp, pp, dp, ep, *_ in _candidates(cfg, world, 8, [1], (0, 1), ("none",), lambda tp: cfg, "moe", cp=cp):
        assert tp * pp * dp * cp == world and experts % ep == 0
        assert validate_grid(world, tp, pp, cp, ep, model_config=cfg) == dp
        if (tp, pp) == (1, 1):
            seen.add(ep)
    assert seen == eps and max(eps) > world // cp  # ep beyond dp at tp = pp = 1


def test_cp_rules_of_training_hold_for_the_search():
    """A --cp-comm-type a2a plan keeps the heads per tp rank divisible by cp (no tp the run would refuse); a
    sequence the zig-zag split cannot take is training's one-line error, not 'no layout fits'."""
    cfg = get_model_config("llama3_8b", num_layers=2).replace(num_experts=8)  # 32 heads
    assert context_parallel_tps(cfg, 8, 4096, "a2a") == (1, 2, 4) and context_parallel_tps(cfg, 8, 4096) == (1, 2, 4, 8)
    plan = choose_layout(cfg, 64, 80, 4096, strategy="moe", context_parallel_size=8, cp_comm_type="a2a",
                         explain=False)
    assert plan["cp"] == 8 and (32 // plan["tp"]) % 8 == 0 and plan["dp"] * 8 % plan["ep"] == 0
    with pytest.raises(ConfigError, match="zig-zag"):
        choose_layout(cfg, 8, 80, 4098, strategy="moe", context_parallel_size=2, explain=False)


def test_estimate_prices_ep_over_cp_as_ep_over_dp():
    """ep 4 at dp 1 x cp 4 keeps E/4 experts per rank and shards their states over dp x cp / ep, exactly as ep 4
    at dp 4: same model states for every ZeRO stage; 3/4 of the expert weights leave each rank."""
    cfg = get_model_config("llama3_8b", num_layers=2).replace(num_experts=16)
    kw = dict(model_config=cfg, strategy="moe", num_gpus=4, sequence_length=4096, recommend=False)
    experts = model_split(cfg, "moe")[1]
    for zero in (0, 1, 2, 3):
        over_cp = estimate_requirements(cp=4, ep=4, zero_stage=zero, **kw)
        over_dp = estimate_requirements(cp=1, ep=4, zero_stage=zero, **kw)
        for key in ("weights", "grads", "optimizer"):
            assert over_cp["breakdown_bytes"][key] == over_dp["breakdown_bytes"][key], (zero, key)
        assert estimate_requirements(cp=4, ep=1, zero_stage=zero, **kw)["params_per_gpu"] - \
            over_cp["params_per_gpu"] == experts * 3 // 4


def test_estimate_memory_tool_plans_as_training_does():
    """tools/estimate_memory.py --auto-configure keeps --context-parallel-size too (it was refused there) and picks
    training's plan for the same line."""
    from megallama.memory_cli import run
    line = ["--model", "llama3_8b", "--num-layers", "2", "--num-experts", "16", "--zero-stage", "0", "--bf16",
            "--seq-length", "4096", "--gpu-memory-gb", "60", "--context-parallel-size", "4", "--gpus", "4"]
    with contextlib.redirect_stdout(io.StringIO()):
        plan = run(line + ["--auto-configure"])["plan"]
        trained = parse_args(MOE + ["--auto-configure", "--gpus", "4", "--dry-run"], world_size=1).auto_layout
    assert (plan["dp"], plan["cp"], plan["ep"]) == (1, 4, 4)
    assert {k: plan[k] for k in ("tp", "pp", "dp", "cp", "ep", "zero_stage", "recompute", "micro_batch_size")} == \
        {k: trained[k] for k in ("tp", "pp", "dp", "cp", "ep", "zero_stage", "recompute", "micro_batch_size")}
