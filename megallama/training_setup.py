"""Building what the loop runs: tokenizer and datasets, model chunks for this rank, DDP/ZeRO wrappers and the
optimizer, the forward/backward schedule, and the post-backward gradient finalisation."""
from __future__ import annotations

import math
from typing import Optional

import torch

from megallama import compile_disable
from megallama.errors import ConfigError
from megallama.megatron_defaults import model_label
from megallama.initialize import print_rank_0
from megallama.ops import fused_kernels_enabled, load_fused_kernels
from megallama.startup_lines import holds_line, human as _human, model_size_text


def build_tokenizer_from_args(args):
    """--tokenizer-type / --tokenizer-model; neither: the tokenizer of the checkpoint --load resumes or fine-tunes,
    else the bundled one; a model file alone: sentencepiece."""
    from megallama.data.tokenizer import build_tokenizer
    if args.tokenizer_type is None and args.tokenizer_model is None:
        _use_loaded_checkpoint_tokenizer(args)
    tok_type = args.tokenizer_type or ("bundled" if args.tokenizer_model is None else "sentencepiece")
    if tok_type.lower() in ("null", "nulltokenizer"):  # Megatron's: --vocab-size V is the tokenizer's (eod = V),
        tokenizer = build_tokenizer(tok_type, None, vocab_size=args.vocab_size)  # the model's V + 1, padded
        args.vocab_size = None
        return tokenizer
    return build_tokenizer(tok_type, args.tokenizer_model)


def _use_loaded_checkpoint_tokenizer(args) -> None:
    """A resume or --finetune that names no tokenizer takes the checkpoint's (Megatron's --use-checkpoint-args
    takes the tokenizer flags from the checkpoint too); finetune_llama.py's --pretrained-checkpoint did already."""
    from megallama.checkpointing.files import holds_checkpoint
    load = getattr(args, "load", None)
    if not load or getattr(args, "pretrained_checkpoint", None) or not holds_checkpoint(load):
        return
    from megallama.checkpointing.full import saved_args
    adopt_checkpoint_tokenizer(args, saved_args(load), "the --load checkpoint's")


def adopt_checkpoint_tokenizer(args, saved: dict, whose: str) -> None:
    """No tokenizer named: the one a checkpoint's saved arguments record (an imported HF model: its folder's), not
    the bundled one, whose ids would mean other words to the model; said in one line."""
    from megallama.data.tokenizer import checkpoint_tokenizer
    args.tokenizer_type, args.tokenizer_model = checkpoint_tokenizer(saved)
    if args.tokenizer_type or args.tokenizer_model:
        print_rank_0(f"tokenizer: {args.tokenizer_type} {args.tokenizer_model or ''} ({whose}; "
                     "--tokenizer-type/--tokenizer-model override it)")


def build_data(args):
    """Tokenizer -> vocabulary -> datasets. The embedding follows the tokenizer unless --vocab-size is given."""
    from megallama.data import get_bundled_corpus_path
    # Mock data needs no tokenizer: the vocabulary is the model's (or --vocab-size).
    tokenizer = None if args.mock_data else build_tokenizer_from_args(args)
    if tokenizer is not None:  # saved with the checkpoint: generation refuses another tokenizer
        args.tokenizer_fingerprint = tokenizer.fingerprint
    cfg = args.model_config
    if tokenizer is None:
        pass
    elif args.vocab_size is None:  # the tokenizer's, padded to tp x the divisor
        from megallama.autoconfig import vocab_config
        args.model_config = cfg = vocab_config(cfg, args.tensor_model_parallel_size, tokenizer.vocab_size,
                                               getattr(args, "make_vocab_size_divisible_by", None) or 1)
    elif tokenizer.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer '{tokenizer.name}' has {tokenizer.vocab_size} tokens but --vocab-size is "
                          f"{cfg.vocab_size}; raise --vocab-size or drop it to follow the tokenizer")
    print_rank_0(f"model: {model_label(args, cfg)} with vocabulary {cfg.vocab_size} "
                 f"({tokenizer.name + ' tokenizer' if tokenizer else 'mock data'}): "
                 f"{model_size_text(args, cfg)}, {cfg.num_layers} layers, hidden {cfg.hidden_size}")
    if tokenizer is not None and args.vocab_size is None:  # a named model shrunk to the bundled tokenizer: said
        from megallama.autoconfig_args import vocabulary_warning
        warning = vocabulary_warning(args, tokenizer.vocab_size)
        if warning:
            print_rank_0(warning)
    if args.train_iters is None and args.epochs is None:
        args.train_iters = 100
    if args.mock_data:
        if _per_split_paths(args):
            raise ConfigError("--mock-data makes random tokens; drop it to use --train/--valid/--test-data-path")
        from megallama.data.mock_dataset import MockGPTDataset
        n = (args.train_iters or 1) * args.global_batch_size
        train = MockGPTDataset(cfg.vocab_size, args.seq_length, max(n, 1), args.seed)
        return tokenizer, train, MockGPTDataset(cfg.vocab_size, args.seq_length, 64, args.seed + 1)
    from megallama.data.data_args import resolve_data_args
    resolve_data_args(args)  # --data-args-path, the per-split blends, and Megatron's rules on mixing them
    if _per_split_paths(args):
        return (tokenizer,) + _per_split_data(args, tokenizer)
    blend = getattr(args, "data_blend", None)
    if blend and getattr(args, "chat_template", False):
        raise ConfigError("--data-path blends are for pretraining corpora; fine-tuning takes one chat jsonl")
    if getattr(args, "chat_template", False):  # *_instruct models and finetune_llama.py: chat SFT data
        from megallama.data.sft_dataset import build_sft_datasets
        train, valid = build_sft_datasets(args.data_path, tokenizer, args.seq_length, args.seed, args.split,
                                          packing=getattr(args, "sft_packing", False),
                                          chat_format=getattr(args, "chat_format", "auto"))
        args.chat_format = train.chat_format  # the one used, saved with the checkpoint
        if args.train_iters is None:
            args.train_iters = iters_for_epochs(args, len(train))
        # sized for the run: each epoch past the first in its own order (the sampler would wrap to the first)
        train.num_samples = max(len(train), args.train_iters * args.global_batch_size)
        return tokenizer, train, valid
    from megallama.data.blended_dataset import build_blended_datasets
    from megallama.data.gpt_dataset import build_pretraining_datasets
    data = args.data_path or get_bundled_corpus_path()

    def build(n_train=None, n_valid=None):
        if blend:
            return build_blended_datasets(blend, tokenizer, args.seq_length, args.seed, args.split,
                                          args.data_cache_dir, n_train, n_valid)
        return build_pretraining_datasets(data, tokenizer, args.seq_length, args.seed, args.split, args.data_cache_dir,
                                          num_train_samples=n_train, num_valid_samples=n_valid)
    if args.train_iters is None:  # --epochs: size one epoch first
        args.train_iters = iters_for_epochs(args, len(build()[0]))
    train, valid = build(args.train_iters * args.global_batch_size, _num_valid_samples(args))
    return tokenizer, train, valid


def _per_split_paths(args) -> bool:
    return bool(getattr(args, "per_split_data_args_path", None)) or \
        any(getattr(args, f"{k}_data_path", None) for k in ("train", "valid", "test"))


def _num_valid_samples(args):
    """Every evaluation's samples (each --eval-interval, and once more at the end); None: no evaluation asked."""
    if not args.eval_interval:
        return None
    return (args.train_iters // args.eval_interval + 1) * args.eval_iters * args.global_batch_size


def _per_split_data(args, tokenizer):
    """(train, valid) from the per-split blends (--train-data-path / --valid-data-path, or
    --per-split-data-args-path): whole corpora, no --split (Megatron's per-split paths), each split a blend as
    --data-path's is. The test blend is built by ``build_test_data``."""
    from megallama.data.blended_dataset import build_corpora_blend
    if getattr(args, "chat_template", False):
        raise ConfigError("chat fine-tuning takes its data from --data-path (split by --split)")
    blends = args.data_blend_per_split

    def build(split, n, salt):
        return build_corpora_blend(blends[split], tokenizer, args.seq_length, args.seed, args.data_cache_dir, n,
                                   split, salt)
    if args.train_iters is None:  # --epochs: size one epoch first
        args.train_iters = iters_for_epochs(args, len(build("train", None, 0)))
    train = build("train", args.train_iters * args.global_batch_size, 0)
    valid = build("valid", _num_valid_samples(args), 1) if blends["valid"] else None
    return train, valid


def build_test_data(args, tokenizer):
    """The test set, evaluated once at the end of training (Megatron's): the --test-data-path blend, or the third
    --split share of the pretraining corpus (of each corpus of a blend); None when there is none (chat data keeps no
    test share)."""
    from megallama.data.gpt_dataset import build_test_split, parse_split
    n = args.eval_iters * args.global_batch_size
    if n == 0:  # --eval-iters 0: Megatron evaluates nothing, the test data neither
        return None
    per_split = getattr(args, "data_blend_per_split", None)
    if per_split is not None:
        from megallama.data.blended_dataset import build_corpora_blend
        return build_corpora_blend(per_split["test"], tokenizer, args.seq_length, args.seed, args.data_cache_dir, n,
                                   "test", 2) if per_split["test"] else None
    if args.mock_data or getattr(args, "chat_template", False) or parse_split(args.split)[2] == 0:
        return None
    if getattr(args, "data_blend", None):
        from megallama.data.blended_dataset import build_blended_test_dataset
        return build_blended_test_dataset(args.data_blend, tokenizer, args.seq_length, args.seed, args.split,
                                          args.data_cache_dir, n)
    from megallama.data import get_bundled_corpus_path
    return build_test_split(args.data_path or get_bundled_corpus_path(), tokenizer, args.seq_length, args.seed,
                            args.split, args.data_cache_dir, n)


def iters_for_epochs(args, num_samples: int, epochs: Optional[float] = None) -> int:
    """Optimizer steps for ``epochs`` (default --epochs) passes over ``num_samples`` sequences."""
    return max(1, math.ceil((epochs or args.epochs) * num_samples / args.global_batch_size))


def given_data(args, datasets):
    """``pretrain(args, datasets=(train, valid))``: the caller's map-style datasets (the Python API's user data)
    instead of the ones ``build_data`` makes from the flags; valid may be None. Without --train-iters the run is
    --epochs (default one) passes over train."""
    train, valid = datasets
    if train is None or len(train) == 0:
        raise ConfigError("pretrain(args, datasets=(train, valid)) got no training samples; pass a non-empty dataset")
    if args.train_iters is None:
        args.train_iters = iters_for_epochs(args, len(train), args.epochs or 1.0)
    return train, valid


def _params_dtype(args):
    """Megatron's policy: params in the compute dtype, fp32 master weights and states in the optimizer."""
    choice = args.params_dtype
    if choice == "auto":
        choice = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def build_model_chunks(args, device):
    from megallama.model.context_parallel import set_context_parallel_comm_type
    from megallama.mpu.grad_accum_fusion import set_gradient_accumulation_fusion
    from megallama.ops import set_fused_kernels
    set_fused_kernels(not args.no_fused_kernels)  # MEGALLAMA_FUSED_KERNELS=0 keeps them off
    if fused_kernels_enabled():  # a first run's JIT build (minutes) here, not in iteration 1's time; loaded inside
        load_fused_kernels()     # the first compiled call (--compile), they would also break its graph
    set_gradient_accumulation_fusion(not getattr(args, "no_gradient_accumulation_fusion", False))
    set_context_parallel_comm_type(args.cp_comm_type, getattr(args, "hierarchical_context_parallel_sizes", None))
    cfg = args.model_config
    if args.pipeline_model_parallel_size > 1:
        from megallama.pipeline import build_model_chunks as build_pp
        chunks = build_pp(cfg, device=device, dtype=_params_dtype(args), seed=args.seed,
                          sequence_parallel=args.sequence_parallel, schedule=args.pipeline_schedule,
                          num_layers_per_virtual_stage=args.num_layers_per_virtual_pipeline_stage,
                          first_stage_num_layers=args.decoder_first_pipeline_num_layers,
                          last_stage_num_layers=args.decoder_last_pipeline_num_layers,
                          layer_counts=getattr(args, "pipeline_layer_counts", None))
    else:
        from megallama.model import build_model
        chunks = [build_model(cfg, device=device, dtype=_params_dtype(args), seed=args.seed,
                              sequence_parallel=args.sequence_parallel)]
    apply_training_strategy(chunks, args)
    from megallama.fp8_args import apply_fp8
    apply_fp8(chunks, args)  # --fp8-format: the decoder's linears
    for m in chunks:
        if args.recompute_granularity:
            configure_recompute(m, args)
        if args.compile:  # regional: one compiled graph per layer keeps compile time flat in depth
            compile_disable.resolve()
            for layer in m.model.layers.values():  # forward only: module hooks (ZeRO-3's gather / free) stay eager
                layer.forward = torch.compile(layer.forward)
    return chunks


def resumes_run(args) -> bool:
    """--load names a checkpoint of this run to resume (not a --finetune start)."""
    from megallama.checkpointing.files import holds_checkpoint
    load = getattr(args, "load", None)
    return bool(load) and not getattr(args, "finetune", False) and holds_checkpoint(load)


def _inherit_lineage(args) -> dict:
    """A model fine-tuned from a converted HF one keeps its prompt convention (bos) and HF's token ids (the export
    writes them back): taken from --pretrained-checkpoint, from Megatron's --load X --finetune, or, on a resume whose
    launch names neither, from the run's own checkpoint. Returns the source's saved arguments ({}: none)."""
    from megallama.checkpointing.files import holds_checkpoint
    from megallama.checkpointing.full import saved_args
    from megallama.data.tokenizer_export import auto_prompt_prefix
    pretrained, load = getattr(args, "pretrained_checkpoint", None), getattr(args, "load", None)
    source = pretrained or (load if load and holds_checkpoint(load) else None)
    if not source:
        return {}
    saved = saved_args(source)
    if pretrained or getattr(args, "finetune", False) or "inherited_prompt_prefix" in saved:
        args.inherited_prompt_prefix = auto_prompt_prefix(saved)
    if saved.get("hf_token_ids"):
        args.hf_token_ids = dict(saved["hf_token_ids"])
    return saved


def apply_training_strategy(chunks, args) -> None:
    """Fine-tuning weights first (--pretrained-checkpoint, any layout), then the strategy (MoE layers, LoRA
    adapters, frozen base): adapters and upcycled experts start from the pretrained weights."""
    from megallama.strategies import apply_strategy, strategy_from_args, trainable_parameter_count
    strategy = strategy_from_args(args)
    active = strategy.name != "standard" or strategy.uses_moe
    pretrained = getattr(args, "pretrained_checkpoint", None)
    saved_moe = False
    saved_args = _inherit_lineage(args)
    if pretrained and resumes_run(args):  # the run's own checkpoint replaces every weight: don't read them twice
        pretrained = None
    if pretrained:
        import argparse
        from megallama.checkpointing import load_checkpoint
        saved = saved_args.get("model_config", {})
        saved_moe = bool(saved.get("num_experts"))
        if active and saved_moe:  # a MoE checkpoint: build the experts first, then load them
            apply_strategy(chunks, strategy, seed=args.seed)
        as_saved = argparse.Namespace(**vars(args))
        as_saved.model_config = args.model_config.replace(num_experts=saved.get("num_experts", 0) or 0)
        load_checkpoint(pretrained, chunks, None, as_saved, finetune=True)
    upcycle = bool(getattr(args, "moe_upcycle", False) or pretrained)  # experts start as copies of the dense MLP
    if active and not (pretrained and saved_moe):
        apply_strategy(chunks, strategy, seed=args.seed, upcycle=upcycle)
    from megallama.adapter_args import load_adapter_from_args
    load_adapter_from_args(chunks, args)  # --load-adapter: the adapters start from a saved folder's tensors
    if active:
        n, total = trainable_parameter_count(chunks), sum(p.numel() for m in chunks for p in m.parameters())
        shown = dict(strategy.parameters)
        if "upcycle" in shown:  # what was done, not the flag's default
            shown["upcycle"] = upcycle and not (pretrained and saved_moe)
        lora = strategy.lora_config()
        if lora is not None and "lora_alpha" not in shown:  # the default (2 x rank), as the run uses it
            shown["lora_alpha"] = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
        print_rank_0(f"strategy {strategy.memory_kind}: this process (global rank 0) trains {_human(n)} of its "
                     f"{_human(total)} parameters ({shown})")


def configure_recompute(model, args) -> None:
    """full: checkpoint whole layers (uniform chunks or the first N, Megatron's methods); selective: recompute
    what --recompute-modules names (default: the norms and the SwiGLU activation; the matmul outputs are kept,
    flash attention stores no score matrix)."""
    inner = model.model
    if args.recompute_granularity == "full":
        inner.recompute_granularity = "full"
        inner.recompute_method = args.recompute_method
        inner.recompute_num_layers = args.recompute_num_layers
    else:  # --recompute-modules, or megallama's default (the norms and the dense SwiGLU)
        from megallama.model.recompute import apply_selective_recompute
        apply_selective_recompute(model, getattr(args, "recompute_modules", None))


def setup_model_and_optimizer(args, device):
    from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
    from megallama.optimizer.compression import attach_gradient_compression, config_from_args
    compression = config_from_args(args)  # bad compression flags fail before anything is built
    chunks = build_model_chunks(args, device)
    print_rank_0(holds_line(args, chunks))
    if args.dry_run:
        print_rank_0(dry_run_report(args))
        return chunks, None
    wrapped = [DistributedDataParallel(m, zero_stage=args.zero_stage, bucket_size=args.bucket_size,
                                       overlap_grad_reduce=args.overlap_grad_reduce,
                                       overlap_param_gather=args.overlap_param_gather,
                                       grad_reduce_in_fp32=not getattr(args, "grad_reduce_in_bf16", False))
               for m in chunks]
    cfg = OptimizerConfig(lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
                          adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
                          optimizer=getattr(args, "optimizer", None) or "adam",
                          sgd_momentum=0.9 if getattr(args, "sgd_momentum", None) is None else args.sgd_momentum,
                          bf16=args.bf16, fp16=args.fp16, params_dtype=_params_dtype(args),
                          loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
                          min_loss_scale=args.min_loss_scale, loss_scale_window=args.loss_scale_window,
                          hysteresis=args.hysteresis,
                          log_num_zeros_in_grad=getattr(args, "log_num_zeros_in_grad", False),
                          decoupled_lr=getattr(args, "decoupled_lr", None),
                          decoupled_min_lr=getattr(args, "decoupled_min_lr", None))
    optimizer = get_megatron_optimizer(cfg, wrapped)
    if not attach_gradient_compression(wrapped, optimizer, compression) and compression.method != "none":
        from megallama.initialize import warn_rank_0
        warn_rank_0(f"--gradient-compression {compression.method} has nothing to compress at data-parallel size 1 "
                    "(no data-parallel gradient reduction); it is ignored")
    return wrapped, optimizer


def dry_run_report(args) -> str:
    lines = ["resolved configuration:"]
    for k in sorted(vars(args)):
        if k != "model_config":
            lines.append(f"  {k:40s} {getattr(args, k)}")
    lines.append(f"  model_config {args.model_config.to_dict()}")
    from megallama.memory_args import estimate_for_args
    est = estimate_for_args(args, args.world_size, recommend=False)
    lines.append(f"estimated memory per GPU: {est['memory_per_gpu_gb']:.2f} GiB")
    return "\n".join(lines)


def get_forward_backward(args):
    if args.pipeline_model_parallel_size > 1:
        from megallama.pipeline import get_forward_backward_func
        return get_forward_backward_func(args.pipeline_model_parallel_size, args.pipeline_schedule,
                                         microbatch_group_size=getattr(args, "microbatch_group_size_per_vp_stage",
                                                                       None))
    from megallama.pipeline.no_pipelining import forward_backward_no_pipelining
    return forward_backward_no_pipelining
