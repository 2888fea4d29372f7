"""--auto-configure searches expert parallelism for MoE models (ep dividing the experts and dp, the all-to-all
scored), leaves dense models as they were, and the estimate tool takes the training flag --grad-reduce-in-bf16."""
import pytest

import megallama.autoconfig as autoconfig
from megallama.arguments import parse_args
from megallama.autoconfig import a2a_cost, choose_layout, throughput_score
from megallama.autoconfig_args import layout_flags
from megallama.config import get_model_config
from megallama.errors import ConfigError
from megallama.memory_args import estimate_for_args
from megallama.memory_cli import run
from megallama.mpu.parallel_state import validate_grid

# 80 experts of Llama 3 8B's FFN in 2 layers (29B parameters) on 8 GPUs, ZeRO-1 fixed (--use-distributed-optimizer):
# no ep 1 layout fits 80 GiB, ep 4 (experts and their optimizer shards spread over the dp ranks) does
MOE = ["--model", "llama3_8b", "--num-layers", "2", "--num-experts", "80", "--zero-stage", "1", "--bf16",
       "--seq-length", "4096", "--mock-data", "--gpu-memory-gb", "80"]


def test_moe_too_big_for_ep1_gets_an_ep_plan_the_parser_accepts(monkeypatch):
    args = parse_args(MOE + ["--auto-configure", "--gpus", "8", "--dry-run"], world_size=1)
    ep, plan = args.expert_model_parallel_size, args.auto_layout
    assert ep > 1 and plan["ep"] == ep and 80 % ep == 0 and plan["dp"] % ep == 0 and plan["a2a"] > 0
    flags = layout_flags(args)
    assert flags[flags.index("--expert-model-parallel-size") + 1] == str(ep)
    again = parse_args(MOE + flags, world_size=8)  # the printed flags, typed without --auto-configure
    assert (again.expert_model_parallel_size, again.tensor_model_parallel_size, again.data_parallel_size) == \
        (ep, plan["tp"], plan["dp"])
    assert validate_grid(8, again.tensor_model_parallel_size, again.pipeline_model_parallel_size,
                         again.context_parallel_size, ep, model_config=again.model_config) == plan["dp"]
    est = estimate_for_args(again, 8, recommend=False)
    assert est["fits"] and est["layout"]["ep"] == ep
    monkeypatch.setattr(autoconfig, "_expert_sizes", lambda cfg, strategy, dp: [1])  # the search before ep
    with pytest.raises(ConfigError, match="found no layout"):
        parse_args(MOE + ["--auto-configure", "--gpus", "8", "--dry-run"], world_size=1)


def test_expert_sizes_follow_the_training_checks():
    cfg = get_model_config("llama3_8b")
    assert autoconfig._expert_sizes(cfg, "standard", 8) == [1]  # dense
    assert autoconfig._expert_sizes(cfg.replace(num_experts=6), "moe", 8) == [1, 2]  # divides 6 and dp 8
    assert autoconfig._expert_sizes(cfg.replace(num_experts=8), "moe", 4) == [1, 2, 4]
    assert autoconfig._expert_sizes(cfg.replace(num_experts=8), "lora", 8) == [1]  # no experts built


def test_all_to_all_term_and_dense_plans_unchanged():
    """ep 1 (every dense layout) scores as before; ep > 1 pays (ep-1)/ep of A2A_COST, more across nodes."""
    base = throughput_score(2, 2, 4, 1, "none", 2, 4096, 16)
    assert throughput_score(2, 2, 4, 1, "none", 2, 4096, 16, a2a=a2a_cost(1, 1.0, 2, 8)) == base
    assert a2a_cost(4, 1.0, 8, 8) == pytest.approx(0.075) and a2a_cost(4, 0.5, 16, 8) == pytest.approx(0.1125)
    assert throughput_score(2, 2, 4, 1, "none", 2, 4096, 16, a2a=0.075) == pytest.approx(base / 1.075)
    dense = choose_layout("llama3_8b", 8, gpu_memory_gb=80, sequence_length=4096, micro_batch_size=1)
    assert (dense["tp"], dense["pp"], dense["dp"], dense["ep"], dense["a2a"]) == (1, 1, 8, 1, 0.0)
    args = parse_args(["--model", "tiny_llama3_50m", "--auto-configure", "--gpus", "2", "--dry-run",
                       "--gpu-memory-gb", "80", "--mock-data"], world_size=1)
    assert args.expert_model_parallel_size == 1 and "--expert-model-parallel-size" not in layout_flags(args)


def test_estimate_tool_takes_grad_reduce_in_bf16():
    """The tool prices --grad-reduce-in-bf16 as the training --dry-run does (2-byte grads), with its rules."""
    line = ["--model", "llama3_8b", "--zero-stage", "1", "--bf16", "--micro-batch-size", "1",
            "--global-batch-size", "8", "--seq-length", "4096"]
    plain = run(line + ["--gpus", "8"])["estimate"]
    half = run(line + ["--gpus", "8", "--grad-reduce-in-bf16"])["estimate"]
    assert half["breakdown_bytes"]["grads"] * 2 == plain["breakdown_bytes"]["grads"]
    dry = estimate_for_args(parse_args(line + ["--grad-reduce-in-bf16", "--mock-data", "--dry-run"], world_size=8),
                            8, recommend=False)
    assert dry["breakdown_bytes"] == half["breakdown_bytes"]
    with pytest.raises(ConfigError, match="--params-dtype fp32"):
        run(line + ["--gpus", "8", "--grad-reduce-in-bf16", "--params-dtype", "fp32"])
