"""Which parameters get weight decay and which the decoupled LR, against Megatron's rule
(``megatron/core/optimizer/__init__.py``, ``get_standard_config_overrides``): no weight decay for 1-D parameters and
for names ending in ``.bias``, decay for everything else (embedding, output layer, router, experts, the shared
expert's gate, LoRA adapters); ``--decoupled-lr`` for the ``is_embedding_or_output_parameter`` ones, whatever their
decay. Checked on every piece of the optimizer at ZeRO stages 0-3, tied and untied embeddings, MoE with a gated
shared expert, and LoRA (frozen base weights are in no group)."""
import pytest

import megallama.training as tr
from megallama.arguments import parse_args
from megallama.model import build_model
from megallama.model.lora import LoRAConfig, apply_lora
from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
from megallama.training import pretrain
from zero_harness import CFG, SEED

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--mock-data", "--vocab-size", "256", "--no-progress-bar", "--device", "cpu",
        "--train-iters", "1"]
MOE = ["--num-experts", "4", "--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-gate"]


def megatron_no_wd(name: str, shape) -> bool:
    return len(shape) == 1 or name.endswith(".bias")


def check_groups(opt, decoupled: bool) -> set:
    """Every piece in exactly one group, with Megatron's weight decay multiplier and LR kind; the names seen."""
    where = {}
    for g in opt.param_groups:
        for p in g["params"]:
            assert id(p) not in where, "a piece sits in two groups"
            where[id(p)] = g
    names = set()
    for pc in opt.pieces:
        g = where[id(pc.master)]
        assert g["wd_mult"] == (0.0 if megatron_no_wd(pc.name, pc.shape) else 1.0), (pc.name, pc.shape)
        assert g["weight_decay"] == (0.0 if megatron_no_wd(pc.name, pc.shape) else opt.config.weight_decay), pc.name
        ends = decoupled and getattr(pc.param, "is_embedding_or_output_parameter", False)
        assert bool(g.get("is_decoupled_lr", False)) == ends, pc.name
        names.add(pc.name)
    assert len(where) == len(opt.pieces)
    return names


@pytest.mark.parametrize("stage,flags", [
    (0, ["--decoupled-lr", "1e-2"]),
    (1, ["--untie-embeddings-and-output-weights"] + MOE),
    (2, ["--untie-embeddings-and-output-weights", "--decoupled-lr", "1e-2"] + MOE),
    (3, ["--decoupled-lr", "1e-2"]),
], ids=["zero0-tied-decoupled", "zero1-untied-moe", "zero2-untied-moe-decoupled", "zero3-tied-decoupled"])
def test_groups_follow_megatrons_rule(monkeypatch, stage, flags):
    setup, seen = tr.setup_model_and_optimizer, []

    def spy(args, device):
        chunks, opt = setup(args, device)
        seen.append(opt)
        return chunks, opt
    monkeypatch.setattr(tr, "setup_model_and_optimizer", spy)
    pretrain(parse_args(TINY + ["--zero-stage", str(stage)] + flags, world_size=1))
    names = check_groups(seen[0], decoupled="--decoupled-lr" in flags)
    assert any(n.endswith("norm.weight") for n in names) and any(n.endswith("embed_tokens.weight") for n in names)
    if MOE[0] in flags:
        for part in ("router", "experts", "shared_experts", "gate_weight"):
            assert any(part in n for n in names), (part, sorted(names))


@pytest.mark.parametrize("stage", [0, 3])
def test_lora_adapters_decay_and_frozen_weights_are_in_no_group(stage):
    model = build_model(CFG, seed=SEED)
    apply_lora(model, LoRAConfig(rank=4))
    ddp = DistributedDataParallel(model, zero_stage=stage)
    opt = get_megatron_optimizer(OptimizerConfig(weight_decay=0.1), [ddp])
    names = check_groups(opt, decoupled=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == trainable and all("lora_" in n for n in names)
