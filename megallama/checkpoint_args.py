"""Megatron-LM's flags for how checkpoints are saved: ``--async-save`` (checkpointing/async_save.py) and the
companions Megatron scripts pass with it, accepted because megallama does what they ask for either way."""
from __future__ import annotations

import argparse

from megallama.errors import ConfigError

# Megatron flag -> why it needs nothing here (megallama has one sharded format, Megatron's torch_dist in spirit)
_ACCEPTED = {"--ckpt-fully-parallel-save": "every rank writes the pieces it owns, once, in parallel",
             "--no-ckpt-fully-parallel-save": "the pieces are written by the ranks that own them either way (and "
                                              "stay reshardable)",
             "--ckpt-fully-parallel-load": "every rank reads only its own slices",
             "--ckpt-assume-constant-structure": "async saves reuse their pinned host buffers whenever a tensor's "
                                                 "name, shape and dtype repeat",
             "--use-persistent-ckpt-worker": "the writer is a thread; starting one costs microseconds",
             "--use-dist-ckpt": "the one format is sharded (torch_dist)",
             "--auto-detect-ckpt-format": "there is one format to detect"}


def add_async_save_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoint saving (Megatron's flags)", "accepted as no-ops: " + "; ".join(
        f"{flag} ({why})" for flag, why in _ACCEPTED.items()))
    g.add_argument("--async-save", action="store_true", help="write checkpoints in the background: training waits "
                   "only for the copy to host memory; a save becomes the latest once every rank has written it "
                   "(at the latest at the next save, the end of training or an exit)")
    for flag in _ACCEPTED:
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--dist-ckpt-format", choices=["torch_dist"], default=None, help=argparse.SUPPRESS)


# --use-checkpoint-args: shape flag (dest) -> the ModelConfig field the checkpoint gives it
_SHAPE_FIELDS = {"num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
                 "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
                 "max_position_embeddings": "max_position_embeddings", "rope_theta": "rope_theta",
                 "norm_epsilon": "norm_eps"}


def check_checkpoint_flags(args) -> None:
    """Flags that write into --save do nothing without it: one error line rather than a silently ignored flag.
    Then the shape flags a --use-checkpoint-args line also gives, against the checkpoint's model."""
    for flag, on in (("--async-save", getattr(args, "async_save", False)),
                     ("--log-progress", getattr(args, "log_progress", False))):
        if on and not getattr(args, "save", None):
            raise ConfigError(f"{flag} writes into the --save directory, but no --save was given; add --save DIR "
                              f"or drop {flag}")
    if getattr(args, "use_checkpoint_args", False):
        apply_checkpoint_model_flags(args)


def apply_checkpoint_model_flags(args) -> None:
    """--use-checkpoint-args: the model is the checkpoint's (``args.model_config`` by now). A shape flag the line
    gives as well must agree with it: Megatron's command-line value would win and the load then fail, so a
    contradiction is one line here rather than a flag silently dropped. --kv-channels is checked and
    --use-rope-scaling applied against the checkpoint's model, not the one the flags alone describe."""
    cfg, given = args.model_config, set(getattr(args, "given_flags", None) or ())
    typed = [(dest, getattr(args, dest), getattr(cfg, field)) for dest, field in _SHAPE_FIELDS.items()
             if dest in given and getattr(args, dest, None) is not None]
    if "untie_embeddings_and_output_weights" in given and args.untie_embeddings_and_output_weights:
        typed.append(("untie_embeddings_and_output_weights", True, not cfg.tie_word_embeddings))
    for dest, value, saved in typed:
        if value != saved:
            flag = "--" + dest.replace("_", "-")
            has = "tied embeddings" if dest == "untie_embeddings_and_output_weights" else flag[2:] + _shown(saved)
            raise ConfigError(f"{flag}{_shown(value)} contradicts the checkpoint's model ({has}), which "
                              f"--use-checkpoint-args trains; drop {flag}, or drop --use-checkpoint-args")
    from megallama.megatron_compat import apply_shape_flags
    args.model_config = apply_shape_flags(args, cfg, checkpoint_config=True)


def _shown(value) -> str:
    return "" if value is True else f" {value:g}" if isinstance(value, float) else f" {value}"


def checkpoint_seq_length(source: str):
    """--use-checkpoint-args without --seq-length: the sequence length the checkpoint was trained at (Megatron's
    load_args_from_checkpoint sets it unless typed; a typed one may differ, e.g. to fine-tune at a longer context
    within max_position_embeddings). None for an HF model folder, which records none."""
    from megallama.checkpointing.files import holds_checkpoint
    if not holds_checkpoint(source):
        return None
    from megallama.checkpointing.full import saved_args
    return saved_args(source).get("seq_length")
