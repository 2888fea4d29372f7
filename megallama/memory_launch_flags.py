"""estimate-memory reads a training launch line: the flags its own parser does not know are parsed by the training
parser (``arguments.build_parser``) into the same namespace, so both take the same line and cannot drift; a flag
neither knows stays one "unrecognized arguments" line.

Most training-only flags leave memory alone (LR and schedule, data, logging, checkpoints, router scoring, group
routing, expert bias, aux/z losses) and are ignored for pricing. Those that change it are priced as training builds
the run: a Megatron model line's shape (``--swiglu`` ... without ``--model``: megatron_defaults' FFN size,
multi-head attention unless ``--group-query-attention``, the base model), ``--untie-embeddings-and-output-weights``
and ``--max-position-embeddings`` (arguments.shape_overrides), a named tokenizer's vocabulary (padded to tp x
``--make-vocab-size-divisible-by``, build_data's rule), ``--recompute-activations``, ``--fp8-hybrid``/``--fp8-e4m3``,
``--ddp-bucket-size``, ``--device cpu``, the MoE/LoRA strategy flags (``--moe-layer-freq``, ``--moe-layers``,
``--moe-capacity-factor``, ``--lora-target-modules`` ...) and ``--load-adapter``'s rank and targets. Refused in one
line: ``--use-checkpoint-args`` (the shape is in a checkpoint not read here), ``--gradient-compression`` (its
error-feedback buffers are not priced), ``--make-vocab-size-divisible-by`` with no tokenizer named. Training's own
refusals of these flags (check_model_flags, check_moe_flags, the fp8 checks) apply as in training.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence, Tuple

from megallama.errors import ConfigError

# training's dest -> the estimator's, for the values both parsers hold under other names
_RENAMED = {"tensor_model_parallel_size": "tp", "pipeline_model_parallel_size": "pp", "context_parallel_size": "cp",
            "expert_model_parallel_size": "ep", "micro_batch_size": "batch_size", "gpu_memory_gb": "gpu_memory",
            "fp8": "fp8_format"}
_TOKENIZER = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
_FP8 = ("fp8", "fp8_recipe", "fp8_margin", "fp8_interval", "fp8_amax_history_len", "fp8_amax_compute_algo",
        "fp8_param_gather")
_MINE = ("model", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
         "max_position_embeddings", "vocab_size")  # estimator dests whose None means "not given"


def read_launch_flags(parser: argparse.ArgumentParser, args, rest: Sequence[str], precision: str) -> frozenset:
    """Parse ``rest`` (what ``parser`` left over) with the training parser into ``args``, apply training's rules
    to it and resolve what prices differently; returns the training-only dests the line gave."""
    from megallama.arguments import build_parser
    from megallama.megatron_compat import check_model_flags
    from megallama.megatron_defaults import apply_megatron_defaults, given_dests, is_megatron_line
    from megallama.moe_args import check_moe_flags
    for dest, mine in _RENAMED.items():
        setattr(args, dest, getattr(args, mine))
    args.bf16, args.fp16 = precision == "bf16", precision == "fp16"
    training = build_parser()
    _, unknown = training.parse_known_args(list(rest), namespace=args)  # fills only what args does not hold
    if unknown:
        parser.error("unrecognized arguments: " + " ".join(unknown))
    given = frozenset(given_dests(list(rest))) if rest else frozenset()
    args.fp8_format = args.fp8
    _refuse(args, given)
    args.given_flags = sorted(given)  # check_moe_flags: a MoE flag of the line on a dense model is refused
    check_moe_flags(args)
    args.given_flags = sorted(given | {d for d in _MINE if getattr(args, d) is not None})
    apply_megatron_defaults(args)  # a Megatron model line: its left-out shape flags mean Megatron's defaults
    if args.model is None:
        args.model = training.get_default("model") if is_megatron_line(args) else "llama3_8b"
    check_model_flags(args)  # training's refusals (another model than a Llama, offload, state dtypes ...)
    if args.load_adapter:  # unset LoRA flags take the adapter's rank and targets, as training does
        from megallama.adapter_args import adopt_adapter_flags
        adopt_adapter_flags(args)
    return given


def _refuse(args, given: frozenset) -> None:
    """The memory-relevant training flags this estimate does not price: one line each."""
    if args.use_checkpoint_args:
        raise ConfigError("--use-checkpoint-args takes the model's shape from a checkpoint, which estimate-memory "
                          "does not read; give the shape (--model, --num-layers ...) instead and drop it")
    if args.gradient_compression not in (None, "none"):
        raise ConfigError(f"--gradient-compression {args.gradient_compression} keeps error-feedback buffers (about "
                          "4 bytes per local parameter) that estimate-memory does not price; drop it to price the "
                          "run without compression")
    if "make_vocab_size_divisible_by" in given and not _follows_tokenizer(args, given) and \
            args.vocab_size is None and not args.mock_data:
        raise ConfigError("--make-vocab-size-divisible-by pads the tokenizer's vocabulary, and no tokenizer was "
                          "named; add --tokenizer-type/--tokenizer-model, or give the padded size as --vocab-size")


def _follows_tokenizer(args, given: frozenset) -> bool:
    """The line names a tokenizer and the embedding follows it (no --vocab-size, not --mock-data): build_data's rule.
    A line naming none keeps --model's vocabulary here (training would follow the bundled tokenizer). NullTokenizer's
    --vocab-size is the tokenizer's (its eod adds one): followed too."""
    from megallama.autoconfig_args import is_null_tokenizer
    return any(d in given for d in _TOKENIZER) and (args.vocab_size is None or is_null_tokenizer(args)) and \
        not args.mock_data


def tokenizer_vocab(args, given: frozenset) -> Tuple[Optional[int], int]:
    """(the named tokenizer's vocabulary or None, the padding multiple): loads the tokenizer, tokenizes nothing."""
    if not _follows_tokenizer(args, given):
        return None, 1
    from megallama.autoconfig_args import tokenizer_vocab as vocab_of
    from megallama.data.gpt2_tokenizer import gpt2_flags_to_model
    args.tokenizer_model = gpt2_flags_to_model(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                                               args.merge_file)
    try:
        vocab = vocab_of(args)
    except ConfigError as e:
        raise ConfigError(f"the tokenizer does not load here ({e}); its vocabulary sizes the embedding: give it as "
                          "--vocab-size N") from None
    return vocab, args.make_vocab_size_divisible_by or 1


def check_priced_model(args, cfg, given: frozenset) -> None:
    """Training's rules on the resolved shape: --kv-channels restates it; fp8 flags of the line, its fp8 checks."""
    from megallama.megatron_compat import check_kv_channels
    check_kv_channels(args, cfg)
    if any(d in given for d in _FP8):
        from megallama.fp8_args import check_fp8_flags
        args.model_config = cfg
        check_fp8_flags(args)


def priced_device_kw(args, given: frozenset) -> dict:
    """--device cpu prices the eager CPU code paths, as training's --dry-run does."""
    if "device" not in given:
        return {}
    from megallama.memory_args import priced_device
    return {"device": priced_device(args, planning=True)}
