"""One parameter count serves the start-up log and the memory estimator (``memory_states.param_counts``), checked
against models ``apply_strategy`` builds: the whole model and the estimator's (trainable, trainable expert, frozen)
split. ``model_split`` used to count apart from the log and missed the shared expert's gate, the LoRA adapters on a
shared expert, and counted adapters on MLPs that MoE layers no longer have."""
import pytest
import torch

from megallama.config import ModelConfig
from megallama.memory import estimate_requirements
from megallama.memory_states import lora_params, model_split, param_counts
from megallama.startup_lines import built_param_counts
from megallama.strategies import TrainingStrategy, apply_strategy

from dist_utils import run_distributed

CFG = ModelConfig(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  vocab_size=128)
SHARED = {"moe_shared_expert_intermediate_size": 48, "moe_ffn_hidden_size": 16}
CASES = [
    ("dense", "standard", {}),
    ("moe", "moe", {"num_experts": 4}),
    ("moe-ffn-every-2nd", "moe", {"num_experts": 4, "moe_ffn_hidden_size": 48, "moe_layer_freq": 2}),
    ("moe-shared", "moe", {"num_experts": 4, "moe_shared_expert_intermediate_size": 32}),
    ("moe-shared-gate", "moe", {"num_experts": 4, "moe_shared_expert_gate": True, **SHARED}),
    ("moe-no-sparse-layer", "moe", {"num_experts": 2, "moe_layer_freq": [0, 0, 0, 0]}),  # moe_layers []: none
    ("lora", "lora", {"lora_rank": 4}),
    ("lora-all", "lora", {"lora_rank": 4, "target_modules": "all"}),
    ("lora-on-experts", "lora", {"lora_rank": 4, "num_experts": 2}),  # trains as hybrid does
    ("hybrid", "hybrid", {"num_experts": 2, "moe_layer_freq": 2, "lora_rank": 4}),
    ("hybrid-all", "hybrid", {"num_experts": 2, "moe_layer_freq": 2, "lora_rank": 4, "target_modules": "all"}),
    ("hybrid-all-shared", "hybrid", {"num_experts": 2, "moe_layers": [1, 2], "lora_rank": 4,
                                     "target_modules": "all", **SHARED}),
    ("hybrid-all-shared-gate", "hybrid", {"num_experts": 2, "lora_rank": 2, "target_modules": "all",
                                          "moe_shared_expert_gate": True, **SHARED}),
]


def _built(strategy):
    from megallama.model import build_model
    m = build_model(CFG, dtype=torch.float32)
    apply_strategy([m], strategy)
    return m


def _split(m):
    """(trainable non-expert, trainable expert, frozen), as ZeRO and the optimizer see them."""
    expert = lambda p: getattr(p, "expert_parallel", False)  # noqa: E731
    ps = list(m.parameters())
    return (sum(p.numel() for p in ps if p.requires_grad and not expert(p)),
            sum(p.numel() for p in ps if p.requires_grad and expert(p)),
            sum(p.numel() for p in ps if not p.requires_grad))


@pytest.mark.parametrize("name, kind, params", CASES, ids=[c[0] for c in CASES])
def test_one_count_equals_the_built_model(name, kind, params, one_thread):
    strategy = TrainingStrategy(kind, params)
    m = _built(strategy)
    total = sum(p.numel() for p in m.parameters())
    cfg, kw = strategy.model_config(CFG), strategy.estimate_kw()
    assert model_split(cfg, **kw) == _split(m)
    c = param_counts(cfg, **kw)
    assert c == built_param_counts(CFG, strategy)  # the start-up log's count is the estimator's
    assert c["total"] == total
    assert c["experts"] == sum(p.numel() for p in m.parameters() if getattr(p, "expert_parallel", False))
    assert c["adapters"] == sum(p.numel() for p in m.parameters() if getattr(p, "lora", False))
    est = estimate_requirements("tiny", model_config=cfg, sequence_length=16, device="cpu", recommend=False, **kw)
    assert est["num_params"] == total


def _tp_adapters(rank, world, targets):
    from megallama.mpu import parallel_state as ps
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    m = _built(TrainingStrategy("lora", {"lora_rank": 4, "target_modules": targets}))
    return sum(p.numel() for p in m.parameters() if getattr(p, "lora", False))


def test_lora_params_per_tp_rank(one_thread):
    """down_proj is row-parallel: its A [r, f/tp] is split, its B [h, r] whole (it was priced the other way)."""
    targets = ["o_proj", "gate_proj", "down_proj"]
    got = run_distributed(_tp_adapters, 2, targets)
    assert got[0] == got[1] == CFG.num_layers * lora_params(CFG, 4, targets, 2)


def test_api_plan_counts_the_expert_sizes(one_thread):
    """The API's plan took the strategy's estimator arguments without the expert sizes: it counted experts of the
    dense FFN and no shared expert."""
    import megallama
    from megallama.model import build_model
    strategy = TrainingStrategy("hybrid", CASES[-1][2])
    shape = dict(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 vocab_size=128)
    orch = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", strategy, num_gpus=1, model_overrides=shape,
                                               training_config=megallama.TrainingConfig(
                                                   batch_size=2, micro_batch_size=2, sequence_length=16))
    m = build_model(orch.model_config.replace(num_experts=0, moe_layers=None), dtype=torch.float32)
    apply_strategy([m], strategy)
    assert orch.plan["estimate"]["num_params"] == sum(p.numel() for p in m.parameters())


def test_training_flags_estimate_counts_what_the_log_says(one_thread):
    """--dry-run's estimate (memory_args) and the start-up model line count alike, the shared expert's gate too."""
    from megallama.arguments import parse_args
    from megallama.memory_args import estimate_for_args
    from megallama.strategies import strategy_from_args
    args = parse_args(["--model", "tiny_llama3_50m", "--num-layers", "4", "--hidden-size", "32", "--ffn-hidden-size",
                       "64", "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "128",
                       "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "1", "--mock-data",
                       "--strategy", "hybrid", "--num-experts", "2", "--lora-target-modules", "all",
                       "--moe-shared-expert-intermediate-size", "48", "--moe-shared-expert-gate", "--dry-run"],
                      world_size=1)
    log = built_param_counts(args.model_config, strategy_from_args(args))["total"]
    assert estimate_for_args(args, 1, 1, recommend=False)["num_params"] == log
