"""Training strategies: standard, moe, lora, hybrid (MoE + LoRA), applied to built model chunks.

``TrainingStrategy(name, parameters)`` is the seed API's object; ``strategy_from_args`` builds one from the
command line. ``apply_strategy`` runs after the dense chunks are built (and, for fine-tuning, after pretrained
weights are loaded) and before DDP/optimizer wrapping: it turns the chosen decoder layers' MLPs into MoE layers
(fresh, layout-independent init, or upcycled copies of the dense MLP), adds LoRA adapters and freezes what the
strategy does not train. Working on built chunks means it composes with any pipeline split.

Trainable parameters per strategy: standard/moe everything; lora the adapters only (a pipeline stage without decoder
layers holds none and trains nothing itself); hybrid the adapters plus the MoE routers and experts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch.nn as nn

from megallama.errors import ConfigError
from megallama.model.lora import LORA_TARGETS, LoRAConfig, apply_lora, no_match_message
from megallama.model.moe import MoEConfig, MoELayer, moe_layer_ids
from megallama.moe_args import STRATEGY_KEYS as _MOE_FLAG_KEYS, check_moe_flags, moe_config_fields, \
    moe_layer_freq_type, strategy_params

STRATEGIES = ("standard", "moe", "lora", "hybrid")
_KNOWN = {"num_experts", "experts_per_token", "moe_router_topk", "moe_layers", "moe_layer_freq", "moe_aux_loss_coeff",
          "moe_z_loss_coeff", "moe_capacity_factor", "moe_ffn_hidden_size", "upcycle", "lora_rank", "lora_alpha",
          "lora_dropout", "target_modules"} | _MOE_FLAG_KEYS


@dataclass
class TrainingStrategy:
    """``TrainingStrategy(name="moe", parameters={"num_experts": 8, "experts_per_token": 2, "moe_layers": [4, 8]})``
    or ``TrainingStrategy(name="lora", parameters={"lora_rank": 16, "lora_alpha": 32, "target_modules": [...]})``."""

    name: str = "standard"
    parameters: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise ConfigError(f"unknown strategy '{self.name}'; choose one of {', '.join(STRATEGIES)}")
        unknown = sorted(set(self.parameters) - _KNOWN)
        if unknown:
            raise ConfigError(f"unknown strategy parameter '{unknown[0]}'; known: {', '.join(sorted(_KNOWN))}")

    @property
    def uses_moe(self) -> bool:
        return self.name in ("moe", "hybrid") or bool(self.parameters.get("num_experts"))

    @property
    def uses_lora(self) -> bool:
        return self.name in ("lora", "hybrid")

    @property
    def memory_kind(self) -> str:
        """What trains, in the memory estimator's terms: ``num_experts`` alone makes a 'moe' model, and LoRA with
        experts trains them as 'hybrid' does (``apply_strategy``)."""
        if self.uses_moe:
            return "hybrid" if self.uses_lora else "moe"
        return "lora" if self.uses_lora else "standard"

    def estimate_kw(self) -> dict:
        """What ``memory.estimate_requirements`` needs to count this strategy's model states."""
        lora = self.lora_config()
        kw = {"strategy": self.memory_kind}
        if lora is not None:
            kw.update(lora_rank=lora.rank, lora_targets=tuple(lora.target_modules))
        if self.uses_moe:  # the expert sizes that change the count (memory_states.param_counts)
            p = self.parameters
            kw.update(moe_ffn_hidden_size=p.get("moe_ffn_hidden_size"),
                      moe_shared_expert_intermediate_size=p.get("moe_shared_expert_intermediate_size"),
                      moe_shared_expert_gate=bool(p.get("moe_shared_expert_gate", False)))
        return kw

    def model_config(self, cfg):
        """``cfg`` with this strategy's experts (count, top-k, sparse layers), as the built model records them."""
        moe = self.moe_config(cfg.num_layers)
        if moe is None:
            return cfg
        return cfg.replace(num_experts=moe.num_experts, moe_router_topk=moe.topk, moe_layers=list(moe.layers))

    def moe_config(self, num_layers: int) -> Optional[MoEConfig]:
        if not self.uses_moe:
            return None
        p = self.parameters
        layers = p.get("moe_layers")
        cfg = MoEConfig(num_experts=int(p.get("num_experts") or 8),
                        topk=int(p.get("experts_per_token", p.get("moe_router_topk", 2))),
                        ffn_hidden_size=p.get("moe_ffn_hidden_size"),
                        aux_loss_coeff=float(p.get("moe_aux_loss_coeff", 1e-2)),
                        z_loss_coeff=float(p.get("moe_z_loss_coeff", 0.0)),
                        layers=moe_layer_ids(num_layers, layers, _freq(p.get("moe_layer_freq", 1))),
                        **moe_config_fields(p))
        return cfg.validate(num_layers)

    def lora_config(self) -> Optional[LoRAConfig]:
        if not self.uses_lora:
            return None
        p = self.parameters
        rank = int(p.get("lora_rank", 8))
        if rank < 1:  # before alpha, whose default (2 x rank) a zero rank also zeroes
            raise ConfigError(f"--lora-rank {rank} gives the adapters no dimension; pass a rank >= 1 (default 8)")
        targets = p.get("target_modules") or ["q_proj", "k_proj", "v_proj", "o_proj"]
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        if targets == ["all"]:
            targets = list(LORA_TARGETS)
        alpha = float(p.get("lora_alpha", 2 * rank))
        if alpha == 0:  # scaling alpha/r = 0: the adapters add nothing and get no gradient, so nothing would train
            raise ConfigError("--lora-alpha 0 scales the adapters' update to zero, so they would never train; pass a "
                              f"positive alpha (default 2 x --lora-rank = {2 * rank})")
        return LoRAConfig(rank=rank, alpha=alpha, dropout=float(p.get("lora_dropout", 0.0)),
                          target_modules=list(dict.fromkeys(targets))).validate()  # q_proj,q_proj: one adapter


def _freq(v):
    """--moe-layer-freq: an int, or Megatron's per-layer 0/1 pattern (a list; a TrainingStrategy's parameters may
    spell it as the flag's text)."""
    if isinstance(v, str):
        v = moe_layer_freq_type(v)
    return list(v) if isinstance(v, (list, tuple)) else int(v)


def _parse_layers(v) -> Optional[List[int]]:
    if v is None or isinstance(v, (list, tuple)):
        return v
    try:
        return [int(x) for x in str(v).replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--moe-layers '{v}' is not a list of layer indices; write e.g. --moe-layers 0,2,4") from None


def strategy_from_args(args) -> TrainingStrategy:
    """The strategy of a parsed command line (Megatron's ``--num-experts`` alone also makes a MoE model)."""
    g = lambda k, d=None: getattr(args, k, d) if getattr(args, k, None) is not None else d  # noqa: E731
    p = {}
    name = g("strategy", "standard")
    if name in ("moe", "hybrid") or g("num_experts"):
        p.update(num_experts=g("num_experts", 8), experts_per_token=g("moe_router_topk", 2),
                 moe_aux_loss_coeff=g("moe_aux_loss_coeff", 1e-2), moe_z_loss_coeff=g("moe_z_loss_coeff", 0.0),
                 moe_capacity_factor=g("moe_capacity_factor"), moe_ffn_hidden_size=g("moe_ffn_hidden_size"),
                 moe_layers=_parse_layers(g("moe_layers")), moe_layer_freq=g("moe_layer_freq", 1),
                 upcycle=bool(g("moe_upcycle", False)), **strategy_params(args))
    if name in ("lora", "hybrid"):
        p.update(lora_rank=g("lora_rank", 8), lora_dropout=g("lora_dropout", 0.0),
                 target_modules=g("lora_target_modules"))
        if g("lora_alpha") is not None:
            p["lora_alpha"] = g("lora_alpha")
    return TrainingStrategy(name, {k: v for k, v in p.items() if v is not None})


def derive_strategy_flags(args) -> TrainingStrategy:
    """arguments.parse_args's strategy flags: defaults (--strategy moe means 8 experts) and one-line errors for
    contradictions; returns the run's strategy, every parameter validated."""
    check_moe_flags(args)
    if args.strategy in ("moe", "hybrid") and not args.num_experts:
        args.num_experts = 8
    if args.lora_rank is not None and args.strategy not in ("lora", "hybrid"):
        raise ConfigError(f"--lora-rank {args.lora_rank} needs --strategy lora or hybrid (got {args.strategy})")
    if args.expert_model_parallel_size > 1 and not args.num_experts:
        raise ConfigError(f"--expert-model-parallel-size {args.expert_model_parallel_size} needs a MoE model; add "
                          "--strategy moe or --num-experts N")
    if args.num_experts and args.num_experts % args.expert_model_parallel_size:
        raise ConfigError(f"--num-experts {args.num_experts} is not divisible by --expert-model-parallel-size "
                          f"{args.expert_model_parallel_size}; pick an expert-parallel size dividing it")
    if getattr(args, "load_adapter", None):  # unset LoRA flags take the adapter's values; others must match it
        from megallama.adapter_args import adopt_adapter_flags
        adopt_adapter_flags(args)
    strategy = strategy_from_args(args)  # validates every strategy parameter (ConfigError on bad values)
    if args.save_adapter and not strategy.uses_lora:  # written after the last step: refused now, not after the run
        raise ConfigError(f"--save-adapter {args.save_adapter} needs --strategy lora or hybrid (--strategy "
                          f"{args.strategy or 'standard'} trains no adapters); add --strategy lora or drop "
                          "--save-adapter")
    if strategy.uses_lora:
        strategy.lora_config()
    args.chat_template = getattr(args, "chat_template", False) or args.model.endswith("_instruct")
    return strategy


def convert_to_moe(model: nn.Module, cfg: MoEConfig, seed: int, upcycle: bool = False) -> List[int]:
    """Replace the MLP of this chunk's sparse layers by ``MoELayer``; returns the converted global layer ids."""
    inner = model.model
    mcfg = model.config
    done = []
    for key, layer in inner.layers.items():
        i = int(key)
        if cfg.layers is not None and i not in cfg.layers:
            continue
        dense = layer.mlp
        w = dense.gate_proj.weight if hasattr(dense, "gate_proj") else next(dense.parameters())
        moe = MoELayer(mcfg, cfg, i, model.sequence_parallel, device=w.device, dtype=w.dtype)
        moe.init_weights(f"model.layers.{i}.mlp", seed)
        if upcycle:
            moe.upcycle_from(dense)
        moe.train(dense.training)
        layer.mlp = moe
        done.append(i)
    return done


def apply_strategy(model_chunks: Sequence[nn.Module], strategy: TrainingStrategy, seed: int = 1234,
                   upcycle: Optional[bool] = None) -> Sequence[nn.Module]:
    """Apply ``strategy`` in place to every chunk (each a ``LlamaForCausalLM`` or a pipeline stage of one)."""
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if not chunks:
        return model_chunks
    moe_cfg = strategy.moe_config(chunks[0].config.num_layers)
    lora_cfg = strategy.lora_config()
    up = bool(strategy.parameters.get("upcycle", False)) if upcycle is None else upcycle
    adapted = 0
    for m in chunks:
        if moe_cfg is not None:
            m.config.num_experts, m.config.moe_router_topk = moe_cfg.num_experts, moe_cfg.topk
            m.config.moe_layers = list(moe_cfg.layers)
            convert_to_moe(m, moe_cfg, seed, upcycle=up)
        if lora_cfg is not None:  # a stage without decoder layers (E or L alone, or empty) gets no adapters
            adapted += len(apply_lora(m, lora_cfg, seed, freeze_base=True, require_match=False))
            if moe_cfg is not None:  # hybrid: routers and experts train fully
                for layer in m.model.layers.values():
                    if isinstance(layer.mlp, MoELayer):
                        layer.mlp.requires_grad_(True)
    if lora_cfg is not None and not _over_pipeline(adapted):
        raise ConfigError(no_match_message(lora_cfg))
    return model_chunks


def _over_pipeline(n: int) -> int:
    """``n`` summed over the pipeline stages: a stage may hold no LoRA target, the model must hold one, and every
    rank stops with the same line when none does (a typo'd --lora-target-modules). Collective over pp."""
    from megallama.mpu import parallel_state as ps
    if not ps.model_parallel_is_initialized() or ps.get_pipeline_model_parallel_world_size() == 1:
        return n
    import torch.distributed as dist
    counts = [0] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(counts, n, group=ps.get_pipeline_model_parallel_group())  # any backend, once per run
    return sum(counts)


def trainable_parameter_count(model_chunks) -> int:
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return sum(p.numel() for m in chunks for p in m.parameters() if p.requires_grad)


# ---------------------------------------------------------------- adapter-only checkpoints (PEFT layout)
PEFT_PREFIX = "base_model.model."


def save_adapter(path: str, model_chunks, args=None, lora_cfg: Optional[LoRAConfig] = None,
                 overwrite: Optional[bool] = None) -> Optional[str]:
    """Write the LoRA adapters as full tensors in PEFT's layout (``adapter_config.json`` +
    ``adapter_model.safetensors``, names ``base_model.model.<param>``): a few MB instead of the whole model.
    Collective over tp and pp (every rank calls it); global rank 0 writes. Returns the weights file on rank 0.

    Written into a temporary folder renamed into place, so a crash leaves the old adapter (or none), never half of
    one. An existing adapter is replaced only by the run it belongs to (``overwrite``; default: this run resumes its
    checkpoint, as ``--save`` allows): another run's is refused (``files.check_adapter_dir``)."""
    import torch.distributed as dist

    from megallama.checkpointing.files import adapter_overwrite_ok, check_adapter_dir
    if lora_cfg is None:
        lora_cfg = strategy_from_args(args).lora_config()
    if lora_cfg is None:
        raise ConfigError("--save-adapter needs --strategy lora or hybrid (the model has no adapters)")
    tensors = gather_adapters(model_chunks)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    check_adapter_dir(path, adapter_overwrite_ok(args) if overwrite is None else overwrite)
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha,
           "lora_dropout": lora_cfg.dropout, "target_modules": list(lora_cfg.target_modules), "bias": "none",
           "base_model_name_or_path": base_model_name(args)}
    named = {PEFT_PREFIX + k: v.contiguous() for k, v in tensors.items()}
    return _write_adapter(path, cfg, named)


def gather_adapters(model_chunks) -> dict:
    """``gather_lora_state_dict`` of chunks that may be ZeRO-3 wrappers. Such a wrapper leaves each parameter an
    empty placeholder between uses (its dp shard lives in the wrapper), so the adapters would be written as 0-element
    tensors; their whole tp-local values come from the wrapper's ``state_dict`` (collective over dp) and stand in for
    the placeholders while they are gathered over tp and pp."""
    from megallama.model.lora import gather_lora_state_dict
    from megallama.optimizer.distributed import is_zero3
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    placeholders = []
    try:
        for chunk in chunks:
            if not is_zero3(chunk):
                continue
            whole = chunk.zero3.full_state_dict(keep=lambda p: getattr(p, "lora", False))  # not the base
            for name, p in chunk.module.named_parameters():
                if getattr(p, "lora", False):
                    placeholders.append((p, p.data))
                    p.data = whole[name]
        return gather_lora_state_dict(chunks)
    finally:
        for p, data in placeholders:
            p.data = data


def _write_adapter(path: str, cfg: dict, named: dict) -> str:
    import json
    import os
    import shutil

    import torch

    from megallama.checkpointing.files import publish
    tmp = f"{os.path.normpath(path)}.tmp{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            from safetensors.torch import save_file
            fname = "adapter_model.safetensors"
            save_file(named, os.path.join(tmp, fname))
        except ImportError:
            fname = "adapter_model.bin"
            torch.save(named, os.path.join(tmp, fname))
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        publish(tmp, path)  # the old adapter (if any) is replaced only once the new one is complete
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"could not write the adapter to {path} ({e.strerror or e}); free space or pass another "
                          "--save-adapter directory") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(path, fname)


def base_model_name(args) -> Optional[str]:
    """PEFT's ``base_model_name_or_path``: the checkpoint the adapters were trained on (the HF folder it was
    converted from, when it was), else the model preset's name."""
    import os
    if args is None:
        return None
    if getattr(args, "adapter_base_model", None):  # a resume whose base is gone (finetune_llama.py) names it
        return args.adapter_base_model
    base = getattr(args, "pretrained_checkpoint", None) or \
        (getattr(args, "load", None) if getattr(args, "finetune", False) else None)
    if not base:
        return getattr(args, "model", None)
    try:
        from megallama.checkpointing.full import saved_args
        return saved_args(base).get("converted_from") or os.path.abspath(base)
    except ConfigError:
        return os.path.abspath(base)


def load_adapter(path: str, model_chunks, strict: bool = True) -> int:
    """Load adapters written by ``save_adapter`` (or PEFT) into LoRA-adapted chunks of any tp/pp layout."""
    import os

    import torch

    from megallama.model.lora import load_lora_state_dict
    st, binf = os.path.join(path, "adapter_model.safetensors"), os.path.join(path, "adapter_model.bin")
    if os.path.isfile(st):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"{st} needs the 'safetensors' package, which is not installed; pip install -e "
                              "\".[hf]\" (megallama's hf extra) or pip install safetensors") from None
        raw = load_file(st)
    elif os.path.isfile(binf):
        raw = torch.load(binf, map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"{path} holds no adapter_model.safetensors or adapter_model.bin; pass the folder "
                          "--save-adapter wrote")
    full = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in raw.items()}
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    from megallama.checkpointing.state import unwrap
    n, taken, adapters, err = 0, set(), set(), None
    for m in chunks:
        m = unwrap(m)
        params = dict(m.named_parameters())
        have = {k: v for k, v in full.items() if k in params}
        try:
            n += load_lora_state_dict(m, have, strict=False)
        except ConfigError as e:  # a shape mismatch: said after the stages compared notes, so none waits alone
            err = err or str(e)
        taken |= set(have)
        adapters |= {k for k, p in params.items() if getattr(p, "lora", False)}
    from megallama.mpu import parallel_state as ps
    if ps.get_pipeline_model_parallel_world_size() > 1:  # each stage holds its own layers: compare the unions
        import torch.distributed as dist
        stages = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, (sorted(taken), sorted(adapters), err),
                               group=ps.get_pipeline_model_parallel_group())
        taken, adapters = (set().union(*(set(s[i]) for s in stages)) for i in (0, 1))
        err = next((s[2] for s in stages if s[2]), None)
    if err:
        raise ConfigError(err)
    if strict and not (len(taken) == len(full) == len(adapters)):
        raise ConfigError(f"{path} holds {len(full)} adapter tensors, this model has {len(adapters)} and took "
                          f"{len(taken)} of them; use the same --lora-target-modules and model")
    return n
