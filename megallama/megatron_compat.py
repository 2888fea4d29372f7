"""Megatron-LM's flags for a Llama run, so that a Megatron launch script runs here unchanged.

Three kinds. Flags that restate what a Llama is here (RMSNorm, SwiGLU, RoPE, no biases, no dropout) or pick an
implementation (fused kernels, flash attention, mcore models, Transformer Engine): accepted when they agree, one
error line when they ask for another model. Aliases: ``--rotary-base`` is ``--rope-theta``, sample counts are
iteration counts at the (constant) global batch. And flags with their own behaviour, read where it happens:
``--make-vocab-size-divisible-by`` (build_data), ``--use-rope-scaling`` (the model config), ``--no-load-optim``,
``--no-load-rng``, ``--no-save-optim``, ``--exit-on-missing-checkpoint`` (checkpointing),
``--distributed-timeout-minutes`` and ``--disable-gloo-process-groups`` (initialize), ``--log-throughput`` (the
training log line), ``--local-rank`` (torch.distributed.launch's; the device follows LOCAL_RANK),
``--reset-position-ids``, ``--reset-attention-mask``, ``--eod-mask-loss`` and ``--calculate-per-token-loss``
(data/document_masks.py), ``--dataloader-type`` (data/cyclic.py),
``--account-for-embedding/loss-in-pipeline-split`` (pipeline/megatron_flags.py); ``--decoupled-lr`` and
``--grad-reduce-in-bf16`` live in optimizer_args.py. Flags whose Megatron behaviour megallama does not have
(``--use-torch-fsdp2``, a non-``torch_dist`` ``--ckpt-format`` ...) are one error line saying what megallama does
instead.
"""
from __future__ import annotations

import argparse

from megallama.errors import ConfigError

# store_true flags that only say "this is a Llama" or pick an implementation: nothing to do.
# --no-create-attention-mask-in-dataloader: the model masks causally itself (no mask tensor is loaded either way);
# --cross-entropy-loss-fusion: the head fuses logits and cross-entropy; --accumulate-allreduce-grads-in-fp32: main_grad
# is fp32, accumulated and reduced so; --no-query-key-layer-scaling: Llama here has no such scaling; --manual-gc:
# Python's collector is a host-side performance choice; --no-async-tensor-model-parallel-allreduce and the
# --mmap-bin-files pair pick implementations; batch-size is always on TensorBoard; a non-finite loss or gradient is
# always caught (the step is skipped, and --max-skipped-iters in a row stop the run); weights are initialised
# from the seed the same way on any device and layout (--use-cpu-initialization, --no-initialization: a loaded
# checkpoint replaces them either way); --no-persist-layer-norm picks Apex's kernel; --use-legacy-models picks
# Megatron's older model code (the same Llama); --apply-layernorm-1p stores the norm weight as 1 + w, a
# reparametrisation that trains the same (norm weights start at 1 and, as in Megatron, are not weight-decayed);
# --no-save-rng leaves out RNG states a Llama here never draws from while training (no dropout); --no-bias-gelu-fusion
# opts out of a GeLU a Llama does not have (SwiGLU; Megatron's checkpoint converters pass it with the other opt-outs).
_RESTATED = ("--swiglu", "--disable-bias-linear", "--use-rotary-position-embeddings", "--no-position-embedding",
             "--use-mcore-models", "--no-masked-softmax-fusion", "--attention-softmax-in-fp32", "--use-flash-attn",
             "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion", "--moe-grouped-gemm",
             "--no-create-attention-mask-in-dataloader", "--cross-entropy-loss-fusion",
             "--accumulate-allreduce-grads-in-fp32", "--no-query-key-layer-scaling", "--manual-gc",
             "--no-manual-gc-eval", "--no-async-tensor-model-parallel-allreduce", "--mmap-bin-files",
             "--no-mmap-bin-files", "--log-batch-size-to-tensorboard", "--check-for-nan-in-loss-and-grad",
             "--no-check-for-nan-in-loss-and-grad", "--use-cpu-initialization", "--no-persist-layer-norm",
             "--no-initialization", "--use-legacy-models", "--apply-layernorm-1p", "--no-save-rng",
             "--no-bias-gelu-fusion")
# flag -> (the one value a Llama here has, why)
_FIXED = {"normalization": ("RMSNorm", "Llama normalises with RMSNorm here"),
          "position_embedding_type": ("rope", "Llama's positions are rotary here"),
          "rotary_percent": (1.0, "Llama rotates every head dimension here"),
          "attention_dropout": (0.0, "Llama trains without dropout here"),
          "hidden_dropout": (0.0, "Llama trains without dropout here"),
          "ckpt_format": ("torch_dist", "megallama saves one sharded checkpoint format that any layout loads (as "
                                        "Megatron's torch_dist)")}
# Megatron behaviour megallama does not have: flag -> what it does instead
_REFUSED = {"use_torch_fsdp2": "megallama shards parameters, gradients and optimizer states natively: pass "
                               "--zero-stage 3 instead",
            "tp_comm_overlap": "it needs Transformer Engine's userbuffers; megallama overlaps tensor-parallel "
                               "communication with --sequence-parallel's collectives only",
            "deterministic_mode": "megallama's attention backward kernels accumulate with atomics; run fp32 on CPU "
                                  "for bit-exact comparisons",
            "optimizer": "megallama trains with adam (AdamW) or sgd (with --sgd-momentum); pass one of them",
            "num_distributed_optimizer_instances": "megallama's distributed optimizer is one instance over all dp x "
                                                   "cp ranks; pass 1",
            "rerun_mode": "megallama skips an iteration whose loss or gradient is not finite (--max-skipped-iters "
                          "in a row stop the run) instead of rerunning it; pass --rerun-mode disabled"}
_ACCEPTED = {"optimizer": ("adam", "sgd"), "rerun_mode": ("disabled",),  # the values of these megallama has
             "num_distributed_optimizer_instances": (1,)}
_SAMPLE_FLAGS = (("train_samples", "train_iters"), ("lr_decay_samples", "lr_decay_iters"),
                 ("lr_warmup_samples", "lr_warmup_iters"), ("lr_wsd_decay_samples", "lr_wsd_decay_iters"))


class _RecomputeActivations(argparse.Action):
    """Megatron's ``--recompute-activations`` = ``--recompute-granularity selective``, set while parsing so that the
    recompute checks (which run before the model flags') see it; a contradiction is refused in check_model_flags."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=False, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        if getattr(namespace, "recompute_granularity", None) is None:
            namespace.recompute_granularity = "selective"


def add_megatron_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Megatron-LM flags", "accepted as Megatron defines them: " + " ".join(_RESTATED) +
                             " (nothing to choose here); --attention-backend, --transformer-impl, "
                             "--moe-token-dispatcher-type, --empty-unused-memory-level, --manual-gc-interval "
                             "(megallama's own kernels, dispatcher and memory handling either way); "
                             "--kv-channels hidden/heads, --normalization RMSNorm, --position-embedding-type rope, "
                             "--rotary-percent 1.0, --attention-dropout 0, --hidden-dropout 0, --ckpt-format "
                             "torch_dist or torch (any other value is refused); --recompute-activations = "
                             "--recompute-granularity selective. --data-impl mmap, "
                             "--num-dataset-builder-threads (implementation). Refused: --use-torch-fsdp2 (use "
                             "--zero-stage 3), --tp-comm-overlap, --deterministic-mode")
    for flag in _RESTATED:
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--normalization", default=None, help=argparse.SUPPRESS)
    g.add_argument("--position-embedding-type", default=None, help=argparse.SUPPRESS)
    for flag in ("--rotary-percent", "--attention-dropout", "--hidden-dropout"):
        g.add_argument(flag, type=float, default=None, help=argparse.SUPPRESS)
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help=argparse.SUPPRESS)
    g.add_argument("--moe-token-dispatcher-type", choices=["alltoall", "allgather"], default=None,
                   help=argparse.SUPPRESS)
    g.add_argument("--attention-backend", choices=["flash", "fused", "unfused", "local", "auto"], default=None,
                   help=argparse.SUPPRESS)
    g.add_argument("--empty-unused-memory-level", type=int, choices=[0, 1, 2], default=0, help=argparse.SUPPRESS)
    g.add_argument("--manual-gc-interval", type=int, default=0, help=argparse.SUPPRESS)
    g.add_argument("--kv-channels", type=int, default=None, help="= hidden-size / num-attention-heads (the head "
                   "dimension here; another value is refused)")
    g.add_argument("--ckpt-format", choices=["torch", "torch_dist", "torch_dcp", "zarr", "fsdp_dtensor"],
                   default=None, help="torch_dist or torch (megallama's sharded format either way; the others are "
                   "refused)")
    g.add_argument("--recompute-activations", action=_RecomputeActivations,
                   help="= --recompute-granularity selective")
    for flag in ("--use-torch-fsdp2", "--tp-comm-overlap", "--deterministic-mode"):
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--data-impl", choices=["mmap"], default=None, help=argparse.SUPPRESS)
    g.add_argument("--num-dataset-builder-threads", type=int, default=1, help=argparse.SUPPRESS)
    g.add_argument("--optimizer", choices=["adam", "sgd", "muon", "dist_muon"], default=None,
                   help="adam (AdamW, the default) or sgd (torch's SGD with --sgd-momentum, L2 weight decay)")
    g.add_argument("--rerun-mode", choices=["disabled", "validate_results", "report_stats"], default=None,
                   help="disabled (a non-finite step is skipped here; nothing is rerun)")
    g.add_argument("--tiktoken-pattern", choices=["v1", "v2", "cl100k"], default=None, help=argparse.SUPPRESS)
    g.add_argument("--moe-router-load-balancing-type", default=None,
                   choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "none"],
                   help="aux_loss (default: per micro-batch), seq_aux_loss (per sequence), global_aux_loss (over the "
                   "dp ranks and the step's micro-batches, as Megatron's) or none (--moe-aux-loss-coeff 0)")
    g.add_argument("--rotary-base", dest="rope_theta", type=float, default=None, help="= --rope-theta")
    g.add_argument("--hierarchical-context-parallel-sizes", type=int, nargs="+", default=None,
                   help="A B: a2a over A adjacent cp ranks, p2p across them (--cp-comm-type a2a+p2p; A x B = cp)")
    g.add_argument("--log-throughput", action="store_true", help="the log line's 'throughput per GPU "
                   "(TFLOP/s/GPU)' (Megatron's: model FLOPs per second per GPU, as logging.flops_per_token counts)")
    g.add_argument("--use-rope-scaling", action="store_true", help="Llama 3.1's RoPE frequency scaling")
    g.add_argument("--rope-scaling-factor", type=float, default=None, help="with --use-rope-scaling (default 8)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the tokenizer's vocabulary to a multiple of this x tp (default: of tp)")
    for samples, iters in _SAMPLE_FLAGS:
        g.add_argument("--" + samples.replace("_", "-"), type=int, default=None,
                       help=f"= --{iters.replace('_', '-')} x --global-batch-size")
    g.add_argument("--num-distributed-optimizer-instances", type=int, default=None,
                   help="1 (one distributed optimizer over dp x cp; more instances are refused)")
    g.add_argument("--disable-gloo-process-groups", action="store_true", help="no gloo twins of the data-parallel "
                   "groups (Megatron code's host-side collectives; megallama's own code does not use them)")
    g.add_argument("--no-load-optim", action="store_true", help="resume the weights, iteration and data, with a "
                   "fresh optimizer")
    g.add_argument("--no-load-rng", action="store_true", help="on resume, start the RNG states from --seed")
    g.add_argument("--no-save-optim", action="store_true", help="save weights without optimizer states")
    g.add_argument("--profile", action="store_true", help="profile iterations [--profile-step-start, "
                   "--profile-step-end) on --profile-ranks: an Nsight Systems range, or a torch.profiler trace")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[0])
    g.add_argument("--use-pytorch-profiler", action="store_true", help="with --profile: a torch.profiler trace "
                   "in --tensorboard-dir")
    g.add_argument("--record-memory-history", action="store_true",
                   help="record the CUDA allocator's history and dump it to --memory-snapshot-path each log line")
    g.add_argument("--memory-snapshot-path", default="snapshot.pickle")
    g.add_argument("--account-for-embedding-in-pipeline-split", action="store_true",
                   help="split the layers as if the embedding were one more layer on the first stage")
    g.add_argument("--account-for-loss-in-pipeline-split", action="store_true",
                   help="split the layers as if the output layer and loss were one more layer on the last stage")
    g.add_argument("--rampup-batch-size", type=int, nargs=3, default=None,
                   metavar=("START", "INCREMENT", "SAMPLES"), help="grow the global batch from START by INCREMENT "
                   "over the first SAMPLES samples (with --train-samples)")
    g.add_argument("--ckpt-step", type=int, default=None, help="load this iteration of the --load run instead of "
                   "the newest")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="--load with no checkpoint in it is an error (instead of starting from scratch)")
    g.add_argument("--distributed-timeout-minutes", type=float, default=30.0,
                   help="timeout of the process group's collectives")
    # python -m torch.distributed.launch (Megatron's older launch scripts) appends --local-rank=N; it also sets
    # LOCAL_RANK, which is what picks the device here (as under torchrun)
    g.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                   help="accepted from torch.distributed.launch; the device follows LOCAL_RANK")
    g.add_argument("--data-cache-path", dest="data_cache_dir", default=None, help="= --data-cache-dir")
    g.add_argument("--ddp-bucket-size", dest="bucket_size", type=int, default=argparse.SUPPRESS,
                   help="= --bucket-size (elements per gradient bucket)")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="model chunks per pipeline stage: --num-layers-per-virtual-pipeline-stage layers/(pp x this)")
    g.add_argument("--weight-decay-incr-style", choices=["constant", "linear", "cosine"], default="constant",
                   help="weight decay from --start-weight-decay to --end-weight-decay over --train-iters")
    g.add_argument("--start-weight-decay", type=float, default=None)
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument("--dataloader-type", choices=["single", "cyclic"], default="single",
                   help="single: the training samples in order (default); cyclic: every pass in a fresh order")
    g.add_argument("--reset-position-ids", action="store_true", help="positions restart after each eod")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="attention stays within each document of a packed sample (Llama 3's document masking)")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss where the input token is the eod")
    g.add_argument("--calculate-per-token-loss", action="store_true", help="normalise the loss by the global "
                   "batch's loss-token count instead of per microbatch (chat data always does)")


def check_model_flags(args) -> None:
    """Before the model config is built: refuse a flag asking for another model than a Llama."""
    if args.ckpt_format == "torch":  # Megatron's per-rank files or its sharded ones: megallama writes its own format,
        args.ckpt_format = "torch_dist"  # which any layout loads, for either
    for name, (value, why) in _FIXED.items():
        given = getattr(args, name, None)
        if given is not None and given != value:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} {given:g} is not supported: {why}; pass {flag} {value:g} or drop it"
                              if isinstance(value, float) else
                              f"{flag} {given} is not supported: {why}; pass {flag} {value} or drop it")
    for name, instead in _REFUSED.items():
        given = getattr(args, name, None)
        if given is not None and given is not False and given not in _ACCEPTED.get(name, ()):
            value = f" {given}" if name in _ACCEPTED else ""
            raise ConfigError(f"--{name.replace('_', '-')}{value} is not supported: {instead}"
                              + ("" if name in _ACCEPTED else "; drop it"))
    from megallama.optimizer_args import check_optimizer_flags
    check_optimizer_flags(args)
    if args.tiktoken_pattern is not None and (args.tokenizer_type or "").lower() == "tiktokenizer":
        raise ConfigError("--tokenizer-type TikTokenizer with --tiktoken-pattern is Megatron's own JSON-vocabulary "
                          "tokenizer, which megallama does not read; for Llama 3's tokenizer.model pass "
                          "--tokenizer-type Llama3Tokenizer and drop --tiktoken-pattern")

    if args.recompute_activations and (args.activation_checkpointing or args.recompute_granularity != "selective"):
        other = "--activation-checkpointing" if args.activation_checkpointing else \
            f"--recompute-granularity {args.recompute_granularity}"
        raise ConfigError(f"--recompute-activations (= --recompute-granularity selective) contradicts {other}; "
                          "pass one")
    if args.manual_gc_interval < 0:
        raise ConfigError(f"--manual-gc-interval must be >= 0, got {args.manual_gc_interval}")
    if args.rope_scaling_factor is not None and not args.use_rope_scaling:
        raise ConfigError("--rope-scaling-factor needs --use-rope-scaling")
    if args.make_vocab_size_divisible_by is not None and args.make_vocab_size_divisible_by < 1:
        raise ConfigError(f"--make-vocab-size-divisible-by must be >= 1, got {args.make_vocab_size_divisible_by}")
    if args.distributed_timeout_minutes <= 0:
        raise ConfigError(f"--distributed-timeout-minutes must be positive, got {args.distributed_timeout_minutes}")
    if args.ckpt_step is not None and not args.load:
        raise ConfigError(f"--ckpt-step {args.ckpt_step} picks an iteration of the --load run; give --load")
    from megallama.megatron_profiler import check_profile_flags
    check_profile_flags(args)
    if args.moe_router_load_balancing_type == "none":
        args.moe_aux_loss_coeff = 0.0


def check_kv_channels(args, cfg) -> None:
    """Megatron's --kv-channels is the head dimension, which is hidden / heads here: only that value restates the
    model (``cfg``, the resolved shape)."""
    kv = getattr(args, "kv_channels", None)
    if kv is not None and kv != cfg.head_dim:
        raise ConfigError(f"--kv-channels {kv} is not supported: megallama's head dimension is --hidden-size / "
                          f"--num-attention-heads = {cfg.hidden_size}/{cfg.num_attention_heads} = {cfg.head_dim}; "
                          f"pass --kv-channels {cfg.head_dim} or drop it")


def apply_shape_flags(args, cfg, checkpoint_config: bool = False):
    """The resolved model config under Megatron's shape flags (arguments._derive calls this as soon as the shape
    is known): --kv-channels checked against it, then --use-rope-scaling, Llama 3.1's scaling on a model that has
    none (or another factor). Under --use-checkpoint-args the flags' config is about to be replaced by the
    checkpoint's: they apply to that one (``checkpoint_config``, from checkpoint_args.check_checkpoint_flags)."""
    if getattr(args, "use_checkpoint_args", False) and not checkpoint_config:
        return cfg
    check_kv_channels(args, cfg)
    if not args.use_rope_scaling:
        return cfg
    import dataclasses

    from megallama.config import RopeScaling
    base = cfg.rope_scaling or RopeScaling()
    factor = args.rope_scaling_factor if args.rope_scaling_factor is not None else base.factor
    return cfg.replace(rope_scaling=dataclasses.replace(base, factor=factor))


def samples_to_iters(args) -> None:
    """Megatron's sample counts, once the global batch is known: iterations at that batch (train: whole ones, as
    Megatron's ``train_samples // global_batch_size``; the LR schedule's may be fractional, as its sample-based
    schedule is)."""
    gbs = args.global_batch_size
    for samples, iters in _SAMPLE_FLAGS:
        n, flag = getattr(args, samples), "--" + samples.replace("_", "-")
        if n is None:
            continue
        warmup = samples == "lr_warmup_samples"
        if warmup and n == 0:  # Megatron's default: no warmup, unless --lr-warmup-iters/-fraction set one
            if args.lr_warmup_iters is None and args.lr_warmup_fraction is None:
                args.lr_warmup_iters = 0
            continue
        for other in (iters, "lr_warmup_fraction" if warmup else None):
            if other and getattr(args, other) is not None:
                raise ConfigError(f"{flag} and --{other.replace('_', '-')} both set "
                                  f"{'the warmup' if warmup else 'it'}; pass one")
        if n < 1:
            raise ConfigError(f"{flag} must be {'>= 0' if warmup else 'positive'}, got {n}")
        if samples == "train_samples":
            if args.epochs is not None:
                raise ConfigError("--train-samples and --epochs both set the run's length; pass one")
            if n < gbs:
                raise ConfigError(f"--train-samples {n} is less than one global batch ({gbs})")
            args.train_iters = n // gbs
        else:
            setattr(args, iters, n / gbs)
