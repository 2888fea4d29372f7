"""Megatron-LM's defaults for a Megatron launch line: what its command line leaves out means what it means there.

megallama's own defaults follow the Llama recipe and take the model's shape from ``--model`` (default
tiny_llama3_50m). A Megatron launch script has no ``--model``: it describes the model with Megatron's flags
(``--swiglu``, ``--normalization``, ``--position-embedding-type``, ``--group-query-attention`` ...), and every flag it
leaves out has Megatron's default there. Run unchanged, it must train what Megatron would train, so such a line
(Megatron's model flags, no ``--model``) takes Megatron's defaults for what it leaves out: RoPE base 10000, multi-head
attention unless ``--group-query-attention`` (then ``--num-query-groups``, default 1), the SwiGLU FFN size
int(8h/3/64)*64, tied embeddings, norm epsilon 1e-5, init std 0.02, and in training no warmup, linear decay to
``--min-lr`` 0, Adam beta2 0.999, weight decay 0.01, fp16 initial loss scale 2^32, the vocabulary padded to a
multiple of 128 x tp, evaluation of ``--eval-iters`` 100 batches every ``--eval-interval`` 1000 iterations, a log
line every 100 and ``--split 969,30,1`` over a ``--data-path``. Megatron defaults that ask for another model than a
Llama (LayerNorm, GeLU, biases, dropout 0.1, learned positions) are named in one warning line: a Llama here has
RMSNorm, SwiGLU, no biases, no dropout and RoPE. With ``--use-checkpoint-args`` the model is the checkpoint's (as
Megatron reads it from there): the line needs no shape flags and only the training defaults apply.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from megallama.errors import ConfigError
from megallama.initialize import warn_rank_0 as _warn

# dests of Megatron's model-description flags: any of them, without --model, makes a Megatron launch line
MODEL_FLAGS = ("swiglu", "disable_bias_linear", "normalization", "position_embedding_type",
               "use_rotary_position_embeddings", "no_position_embedding", "use_mcore_models", "group_query_attention",
               "apply_layernorm_1p", "transformer_impl")
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")  # Megatron asserts these
# dest -> Megatron's default, for the flags given a value only when the line leaves them out
TRAINING = {"adam_beta2": 0.999, "weight_decay": 0.01, "lr_decay_style": "linear", "min_lr": 0.0,
            "initial_loss_scale": 2.0 ** 32, "make_vocab_size_divisible_by": 128, "eval_iters": 100,
            "log_interval": 100, "norm_epsilon": 1e-5, "init_method_std": 0.02, "rope_theta": 10000.0,
            "moe_aux_loss_coeff": 0.0}
WARMUP = ("lr_warmup_iters", "lr_warmup_fraction", "lr_warmup_samples")


def given_dests(argv: Optional[Sequence[str]]) -> list:
    """The dests the command line sets itself, so that a default can be told from a value: the same parse with
    every default hidden."""
    from megallama.arguments import build_parser
    parser = build_parser()
    for a in parser._actions:
        a.default = argparse.SUPPRESS
    return sorted(vars(parser.parse_known_args(argv)[0]))


def is_megatron_line(args) -> bool:
    given = getattr(args, "given_flags", None)
    return given is not None and "model" not in given and any(f in given for f in MODEL_FLAGS)


def apply_megatron_defaults(args) -> None:
    """Before the model config is built: a Megatron launch line's left-out flags get Megatron's defaults."""
    if not is_megatron_line(args):
        return
    given = args.given_flags
    # --use-checkpoint-args: the checkpoint's (or HF folder's) config is the model, as Megatron reads its args from it
    from_checkpoint = bool(getattr(args, "use_checkpoint_args", False))
    missing = [] if from_checkpoint else [f for f in REQUIRED if f not in given]
    if missing:
        flags = ", ".join("--" + f.replace("_", "-") for f in missing)
        raise ConfigError(f"this Megatron command line (Megatron's model flags, no --model) does not give {flags}, "
                          "which Megatron requires; add them, or pick a shape with --model")
    heads, groups = args.num_attention_heads, args.num_query_groups
    if not args.group_query_attention and groups is not None and groups != heads:
        raise ConfigError(f"--num-query-groups {groups} without --group-query-attention: Megatron ignores it and "
                          f"trains multi-head attention ({heads} groups); add --group-query-attention for "
                          "grouped-query attention, or drop --num-query-groups")
    if not from_checkpoint:
        args.num_query_groups = (groups or 1) if args.group_query_attention else heads
        if "ffn_hidden_size" not in given:  # Megatron's --swiglu size, a multiple of 64
            args.ffn_hidden_size = int((4 * args.hidden_size * 2 / 3) / 64) * 64
        if "untie_embeddings_and_output_weights" not in given:
            args.untie_embeddings_and_output_weights = False  # tied, as Megatron's default
    for dest, value in TRAINING.items():
        if dest not in given:
            setattr(args, dest, value)
    if not any(f in given for f in WARMUP):
        args.lr_warmup_iters = 0
    if args.data_path is not None and "split" not in given:
        args.split = "969,30,1"
    if "eval_interval" not in given and _has_validation(args):
        args.eval_interval = 1000
    _warn_other_model(args, given, from_checkpoint)


def _has_validation(args) -> bool:
    """Megatron validates every --eval-interval when there is validation data; without any it does not."""
    if args.mock_data:
        return True
    from megallama.data.data_args import data_blend_per_split
    per_split = data_blend_per_split(args)  # --train/--valid/--test-data-path or --per-split-data-args-path
    if per_split is not None:
        return per_split["valid"] is not None
    from megallama.data.gpt_dataset import parse_split
    return parse_split(args.split)[1] > 0


def _warn_other_model(args, given, from_checkpoint: bool = False) -> None:
    """Megatron's defaults that build another model than a Llama, which the line leaves in place: one line. With
    --use-checkpoint-args Megatron takes the normalization, MLP, biases and positions from the checkpoint (only
    the dropouts keep its defaults), so only those are named."""
    rope = args.position_embedding_type == "rope" or args.use_rotary_position_embeddings
    other = [f"--{flag} (Megatron's default: {what})" for flag, what, left in (
        ("normalization RMSNorm", "LayerNorm", "normalization" not in given and not from_checkpoint),
        ("swiglu", "a GeLU MLP", not args.swiglu and not from_checkpoint),
        ("disable-bias-linear", "biases", not args.disable_bias_linear and not from_checkpoint),
        ("attention-dropout 0.0", "0.1", "attention_dropout" not in given),
        ("hidden-dropout 0.0", "0.1", "hidden_dropout" not in given),
        ("position-embedding-type rope", "learned absolute positions", not rope and not from_checkpoint)) if left]
    if other:
        _warn("this Megatron command line leaves out " + ", ".join(other) + "; megallama trains a Llama (RMSNorm, "
              "SwiGLU, no biases, no dropout, RoPE) as if they were given: add them to say so")


def model_label(args, cfg) -> str:
    """The model line's name. A Megatron launch line (its model flags, no --model) gives the whole shape itself:
    naming the default --model there would claim a model that was never asked for. With --use-checkpoint-args the
    model is the checkpoint's, under its own name."""
    if is_megatron_line(args) and not getattr(args, "use_checkpoint_args", False):
        return "Llama architecture from the Megatron flags"
    return f"{cfg.name or args.model} architecture"
