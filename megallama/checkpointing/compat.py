"""Is a checkpoint this run's model? Checked before any tensor is read, so a mismatch is one error line instead of a
silently different model: the shape and behaviour fields of the model config, the strategy's settings (a resume
that changed LoRA's alpha or MoE's top-k would train another function with the same tensors), and afterwards the
tensor names both ways (``unused_message``: a checkpoint tensor the model has no place for — LoRA adapters,
experts — would be dropped without a word).
"""
from __future__ import annotations

import argparse
from typing import List, Optional

from megallama.errors import ConfigError
from megallama.initialize import warn_rank_0 as _warn

SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size",
              "tie_word_embeddings", "num_experts")
BEHAVIOUR_KEYS = ("rope_theta", "rope_scaling", "norm_eps")
# (config field, flag): a resume that changes one computes another function of the same tensors -> refused
_LORA_MODEL = (("rank", "--lora-rank"), ("alpha", "--lora-alpha"), ("target_modules", "--lora-target-modules"))
_MOE_MODEL = (("num_experts", "--num-experts"), ("topk", "--moe-router-topk"), ("layers", "--moe-layers"),
              ("ffn_hidden_size", "--moe-ffn-hidden-size"), ("capacity_factor", "--moe-capacity-factor"),
              ("drop_policy", "--moe-token-drop-policy"),
              ("shared_expert_intermediate_size", "--moe-shared-expert-intermediate-size"),
              ("router_pre_softmax", "--moe-router-pre-softmax"), ("score_function", "--moe-router-score-function"),
              ("topk_scaling_factor", "--moe-router-topk-scaling-factor"),
              ("shared_expert_gate", "--moe-shared-expert-gate"), ("num_groups", "--moe-router-num-groups"),
              ("group_topk", "--moe-router-group-topk"), ("enable_expert_bias", "--moe-router-enable-expert-bias"))
# training-only knobs (regularisation, auxiliary loss terms): the model is the same -> a warning, as Megatron allows
_LORA_TRAINING = (("dropout", "--lora-dropout"),)
_MOE_TRAINING = (("aux_loss_coeff", "--moe-aux-loss-coeff"), ("z_loss_coeff", "--moe-z-loss-coeff"),
                 ("load_balancing_type", "--moe-router-load-balancing-type"), ("router_dtype", "--moe-router-dtype"),
                 ("bias_update_rate", "--moe-router-bias-update-rate"))
STRATEGY_MARKERS = (".lora_", ".experts.", ".router.", ".shared_experts.")  # tensors a strategy adds to a dense model


def check_compatible(common: dict, args, ckpt: str, finetune: bool = False) -> None:
    """Refuse a checkpoint of another model; on a resume (not ``finetune``, which may choose new strategy settings)
    also one trained with other LoRA/MoE settings."""
    saved = common.get("args", {}).get("model_config", {})
    now = args.model_config.to_dict()
    for k in SHAPE_KEYS:
        if k in saved and saved.get(k) != now.get(k):
            hint = (" (a vocabulary padded for another tensor-parallel size or --make-vocab-size-divisible-by? pass "
                    f"--vocab-size {saved.get(k)} or the same padding flags)") if k == "vocab_size" else ""
            if k == "num_experts" and saved.get(k) and strategy_flags(common.get("args", {})):
                hint = f" (a mixture-of-experts run: pass its {strategy_flags(common['args'])})"
            if k == "tie_word_embeddings":
                hint = _tie_hint(bool(saved.get(k)), args)
            flag = "--" + k.replace("_", "-")
            fix = "load a checkpoint of the same model" if hint else (
                f"pass --use-checkpoint-args to train the checkpoint's model (or its shape flags: {flag} "
                f"{saved.get(k)} ...), or load a checkpoint of this run's model")
            raise ConfigError(f"checkpoint {ckpt} is for a different model (its {k}={saved.get(k)}, this run has "
                              f"{now.get(k)}){hint}{', or' if hint else ';'} {fix}")
    for k in BEHAVIOUR_KEYS:
        if k in saved and saved.get(k) != now.get(k):
            _warn(f"checkpoint {ckpt} was trained with {k}={saved.get(k)}, this run uses {now.get(k)}")
    if not finetune:
        check_strategy(common.get("args", {}), args, ckpt, now.get("num_layers"))


def _tie_hint(saved_tied: bool, args) -> str:
    """The flag to fix a tied/untied mismatch: it is easy to drop from a launch line rewritten for another layout."""
    if not saved_tied:
        return " (its output layer is a separate tensor: pass --untie-embeddings-and-output-weights)"
    if getattr(args, "untie_embeddings_and_output_weights", None):
        return " (its output layer is the input embedding: drop --untie-embeddings-and-output-weights)"
    return " (its output layer is the input embedding, this --model unties them: pass --use-checkpoint-args)"


def _strategy(args):
    from megallama.strategies import strategy_from_args
    return strategy_from_args(args if not isinstance(args, dict) else argparse.Namespace(**args))


def _show(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def check_strategy(saved_args: dict, args, ckpt: str, num_layers: Optional[int]) -> None:
    """A resume keeps the saved run's LoRA/MoE settings: one that changes the model is refused in one line naming
    the flag and its saved value; a training-only knob (dropout, auxiliary loss coefficients) is a warning.
    Checkpoints that record no strategy (HF conversions, older runs) and a change of strategy itself (left to the
    tensor check, which names the tensors) are not judged here."""
    if "strategy" not in saved_args:
        return
    try:
        old, new = _strategy(saved_args), _strategy(args)
        pairs = []
        if old.uses_lora and new.uses_lora:
            pairs.append((old.lora_config(), new.lora_config(), _LORA_MODEL, _LORA_TRAINING))
        if old.uses_moe and new.uses_moe:
            pairs.append((old.moe_config(num_layers), new.moe_config(num_layers), _MOE_MODEL, _MOE_TRAINING))
    except ConfigError:  # settings this version cannot resolve: the tensor check still guards the model
        return
    for was, now, model_keys, training_keys in pairs:
        for key, flag in model_keys + training_keys:
            a, b = getattr(was, key), getattr(now, key)
            if key == "target_modules":
                a, b = sorted(a), sorted(b)
            if a == b:
                continue
            if isinstance(a, bool) or isinstance(b, bool):  # a switch: on or off, no value to spell
                said = f"checkpoint {ckpt} was trained {'with' if a else 'without'} {flag}, this run " \
                       f"{'has it' if b else 'does not'}"
                keep = f"{'pass' if a else 'drop'} {flag}"
            else:
                said = f"checkpoint {ckpt} was trained with {flag} {_show(a) if a is not None else '(unset)'}, " \
                       f"this run has {_show(b) if b is not None else '(unset)'}"
                keep = f"pass {flag} {_show(a)}" if a is not None else f"drop {flag}"
            if (key, flag) in training_keys:
                _warn(said)
                continue
            raise ConfigError(f"{said}: resuming would change the model; {keep} to resume it, or --finetune to "
                              "start a new run from its weights with the new setting")


def strategy_flags(saved_args: dict) -> str:
    """The strategy flags a checkpoint's run was launched with, as a command line would spell them."""
    name = saved_args.get("strategy") or "standard"
    out = [f"--strategy {name}"] if name != "standard" else []
    for key, flag in (("lora_rank", "--lora-rank"), ("lora_alpha", "--lora-alpha"),
                      ("lora_target_modules", "--lora-target-modules"), ("num_experts", "--num-experts"),
                      ("moe_router_topk", "--moe-router-topk"), ("moe_layers", "--moe-layers"),
                      ("moe_layer_freq", "--moe-layer-freq"), ("moe_ffn_hidden_size", "--moe-ffn-hidden-size"),
                      ("moe_shared_expert_intermediate_size", "--moe-shared-expert-intermediate-size"),
                      ("moe_shared_expert_gate", "--moe-shared-expert-gate")):
        v = saved_args.get(key)
        if v is None or (key.startswith("moe_") and not saved_args.get("num_experts")) or \
                (key.startswith("lora_") and name not in ("lora", "hybrid")):
            continue
        if (key, v) in (("moe_router_topk", 2), ("moe_layer_freq", 1)) or v is False:  # defaults: nothing to say
            continue
        out.append(flag if v is True else f"{flag} {_show(v)}")
    return " ".join(out)


def unused_message(ckpt: str, unused: List[str], saved_args: dict, pretrained: bool) -> str:
    """Why a checkpoint holds model tensors this model has no place for, and the fix."""
    some = ", ".join(unused[:3]) + (", ..." if len(unused) > 3 else "")
    head = f"checkpoint {ckpt} holds {len(unused)} model tensors this model has no place for ({some})"
    flags = strategy_flags(saved_args)
    lora = any(".lora_" in n for n in unused)
    if pretrained and lora:  # training_setup loads --pretrained-checkpoint into the dense model, then adds adapters
        return (f"{head}: --pretrained-checkpoint starts from base weights and would drop its LoRA adapters; merge "
                f"them first (tools/convert_checkpoint.py megallama-to-hf --load {ckpt} --output DIR) and fine-tune "
                "from DIR (finetune_llama.py --pretrained-checkpoint DIR)")
    if any(m in n for n in unused for m in STRATEGY_MARKERS):
        run = f"it was trained with {flags}" if flags else "it was trained with another --strategy"
        return (f"{head}: {run}; pass the same strategy flags to resume or fine-tune it (loading it without them "
                "would drop those tensors)")
    return f"{head}: it is of another model or strategy; pass the flags it was trained with"


def layout_change(common: dict, now: dict, model_chunks) -> str:
    """'saved -> now' of a resume whose layout changed, the ZeRO stage included (this run's: its chunks' wrappers;
    no optimizer loaded: unwrapped chunks, stage 0): a ZeRO-1 -> 0 change reshards the optimizer states too."""
    stage = max((getattr(m, "zero_stage", 0) for m in model_chunks), default=0)
    return f"{dict(common.get('layout') or {}, zero_stage=common.get('zero_stage', 0))} -> " \
        f"{dict(now, zero_stage=stage)}"
