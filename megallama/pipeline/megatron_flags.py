"""Megatron-LM's pipeline flags, and the layer split checked while parsing.

``derive_pipeline`` (called by ``arguments``) reads the split flags as Megatron does: a
``--pipeline-model-parallel-layout``, --num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank,
--decoder-first/last-pipeline-num-layers (with virtual stages too) and --account-for-embedding/loss-in-pipeline-split,
and resolves them to one list, the decoder layers of every (virtual) stage, so that a split that cannot be built
is one error line before any data is read or any process group made, not a failure inside model building. The
other flags restate what the pipeline runner does (it posts every send and receive ahead in all phases, and
starts every chunk's parameter all-gather at the end of the optimizer step) or are refused in one line naming what
megallama does instead.
"""
from __future__ import annotations

import argparse

from megallama.errors import ConfigError
from megallama.pipeline.layout import FLAG as LAYOUT_FLAG
from megallama.pipeline.layout import parse_layout
from megallama.pipeline.partition import megatron_split, parts_of
from megallama.pipeline.schedules import check_microbatch_group, check_schedule_args


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline (Megatron's flags)")
    g.add_argument(LAYOUT_FLAG, default=None, help="what each (virtual) stage holds, e.g. 'Ett|tt|tt|ttL' "
                   "(E embedding, t decoder layer, L loss, | between stages, X*n / (...)*n repeat); stages beyond "
                   "pp are virtual stages (interleaved); any counts, E or L alone on the first or last stage, and "
                   "empty stages between them ('Et||tL'), which pass the hidden state on unchanged")
    g.add_argument("--microbatch-group-size-per-virtual-pipeline-stage", dest="microbatch_group_size_per_vp_stage",
                   type=int, default=None, help="the interleaved schedule runs groups of N microbatches through "
                   "each virtual stage (Megatron's knob: pp <= N <= microbatches, their count a multiple of N or "
                   "its remainder >= pp); default pp. More in flight (the warm-up), fewer chunk switches")
    g.add_argument("--overlap-p2p-communication-warmup-flush", dest="overlap_p2p_comm_warmup_flush",
                   action="store_true", help="what megallama does: sends and receives are posted ahead in the "
                   "warm-up and flush phases too")
    g.add_argument("--no-align-param-gather", dest="align_param_gather", action="store_false",
                   help="accepted: every chunk's parameter all-gather starts at the end of the optimizer step here, "
                   "before any chunk's forward, so aligning them changes nothing")
    g.add_argument("--pipeline-model-parallel-comm-backend", choices=["nccl", "ucc"], default=None,
                   help="nccl: the pipeline's sends go through the run's process group (gloo on CPU); ucc is refused")
    g.add_argument("--variable-seq-lengths", action="store_true", help="accepted at pp 1; refused with pipeline "
                   "parallelism: stage-to-stage buffers are [micro batch, --seq-length, hidden]")
    g.add_argument("--defer-embedding-wgrad-compute", action="store_true",
                   help="refused: use --pipeline-schedule zb-h1, which defers weight-gradient GEMMs into the bubbles")
    g.add_argument("--wgrad-deferral-limit", type=int, default=0, help="only 0 (see --defer-embedding-wgrad-compute)")
    g.add_argument("--deallocate-pipeline-outputs", action="store_true",
                   help="what megallama does: a stage's output sent to the next stage keeps only its autograd "
                   "graph, its storage freed once the send is over (Megatron's deallocate_output_tensor)")


def derive_pipeline(args) -> None:
    """The pipeline flags as Megatron reads them, resolved to ``args.pipeline_layer_counts`` (decoder layers of each
    model part, part k = virtual stage k // pp of rank k % pp) and ``args.virtual_pipeline_model_parallel_size``
    (Megatron's name; None without interleaving), which model building, the schedule and the memory estimate
    read. --num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-rank imply the interleaved
    schedule (as in Megatron); a split that cannot be built is one error line here."""
    pp, layers = args.pipeline_model_parallel_size, args.model_config.num_layers
    if getattr(args, "pipeline_model_parallel_layout", None) is not None:  # nothing else places layers then
        v = len(apply_pipeline_layout(args)) // pp
        args.pipeline_schedule = args.pipeline_schedule or ("interleaved" if v > 1 else "1f1b")
        args.virtual_pipeline_model_parallel_size = v if v > 1 else None
        check_pipeline_split(args)
        return
    v = getattr(args, "num_virtual_stages_per_pipeline_rank", None)
    n = args.num_layers_per_virtual_pipeline_stage
    e, last = (bool(getattr(args, f"account_for_{x}_in_pipeline_split", False)) for x in ("embedding", "loss"))
    uneven = e or last or args.decoder_first_pipeline_num_layers is not None or \
        args.decoder_last_pipeline_num_layers is not None
    if v is not None and n is not None:
        raise ConfigError(f"--num-virtual-stages-per-pipeline-rank {v} and --num-layers-per-virtual-pipeline-stage "
                          "both set the interleaving; pass one")
    flag = f"--num-virtual-stages-per-pipeline-rank {v}" if v is not None else \
        f"--num-layers-per-virtual-pipeline-stage {n}"
    if (v or 1) > 1 or n is not None:
        if args.pipeline_schedule not in (None, "interleaved"):
            raise ConfigError(f"{flag} needs the interleaved schedule, but --pipeline-schedule "
                              f"{args.pipeline_schedule} was given; drop one of the two")
        if pp < 2:
            raise ConfigError(f"{flag} needs --pipeline-model-parallel-size > 1 (got {pp}); drop it or raise the "
                              "pipeline size")
        args.pipeline_schedule = "interleaved"
    if v is not None and (v < 1 or (not uneven and layers % (pp * v))):
        raise ConfigError(f"{flag} does not split {layers} layers into {pp} stages x {v} chunks; pick a value "
                          "that divides the layers per stage")
    if v is not None and v > 1 and not uneven:
        args.num_layers_per_virtual_pipeline_stage = layers // (pp * v)
    if n is not None:
        if uneven and not (e or last):
            raise ConfigError(f"{flag} with --decoder-first/last-pipeline-num-layers: pass the chunks per rank as "
                              "--num-virtual-stages-per-pipeline-rank instead (Megatron's rule)")
        total = layers + e + last
        if n < 1 or total % pp or (total // pp) % n:
            raise ConfigError(f"{flag} does not split {total} layers over {pp} pipeline stages ({total / pp:g} per "
                              "stage); pick a value dividing the layers per stage")
        v = total // (pp * n)
    args.pipeline_schedule = args.pipeline_schedule or "1f1b"
    args.virtual_pipeline_model_parallel_size = v if (v or 1) > 1 else None
    check_pipeline_split(args)


def check_pipeline_microbatches(args) -> None:
    """The schedule's check of the number of microbatches (the interleaved schedule needs at least pp of them), run
    once the batch sizes are known (``args.num_microbatches``) so that it stops the run before any model is built,
    with the message building the schedule would give."""
    pp = args.pipeline_model_parallel_size
    if pp > 1:
        check_schedule_args(args.pipeline_schedule, pp, args.num_microbatches,
                            args.virtual_pipeline_model_parallel_size or 1)


def apply_pipeline_layout(args) -> list:
    """A layout is its decoder-layer counts per part, taken as given (``args.pipeline_layer_counts``); more parts
    than ranks are virtual stages, which only the interleaved schedule runs."""
    layout = args.pipeline_model_parallel_layout
    others = [f for f, on in (("--num-layers-per-virtual-pipeline-stage", args.num_layers_per_virtual_pipeline_stage),
                              ("--num-virtual-stages-per-pipeline-rank", args.num_virtual_stages_per_pipeline_rank),
                              ("--decoder-first-pipeline-num-layers", args.decoder_first_pipeline_num_layers),
                              ("--decoder-last-pipeline-num-layers", args.decoder_last_pipeline_num_layers),
                              ("--account-for-embedding-in-pipeline-split",
                               args.account_for_embedding_in_pipeline_split or None),
                              ("--account-for-loss-in-pipeline-split", args.account_for_loss_in_pipeline_split or None))
              if on is not None]
    if others:
        raise ConfigError(f"{LAYOUT_FLAG} and {others[0]} both place the layers (as in Megatron); pass one")
    pp = args.pipeline_model_parallel_size
    counts = parse_layout(layout, pp, args.model_config.num_layers)
    v = len(counts) // pp
    args.pipeline_layer_counts = counts
    if pp == 1:
        if v > 1:
            raise ConfigError(f"{LAYOUT_FLAG} '{layout}' has {v} stages but --pipeline-model-parallel-size is 1; "
                              f"pass --pipeline-model-parallel-size {v} (or a divisor of it) or drop the layout")
    elif v > 1 and args.pipeline_schedule not in (None, "interleaved"):
        raise ConfigError(f"{LAYOUT_FLAG} '{layout}' lists {v} virtual stages per rank, which only "
                          f"--pipeline-schedule interleaved runs (not {args.pipeline_schedule}); drop one of them")
    elif v == 1 and args.pipeline_schedule == "interleaved":
        raise ConfigError(f"{LAYOUT_FLAG} '{layout}' gives one stage per rank, but --pipeline-schedule interleaved "
                          f"needs virtual stages; list {2 * pp} or more stages, or pick another schedule")
    return counts


def check_pipeline_split(args) -> None:
    """Last: the other pipeline flags, then the split itself, so that a bad layout stops here."""
    pp, schedule = args.pipeline_model_parallel_size, args.pipeline_schedule
    # the checks that need the number of microbatches run when the schedule is built (as in Megatron)
    check_microbatch_group(schedule, pp, None, getattr(args, "microbatch_group_size_per_vp_stage", None))
    if getattr(args, "pipeline_model_parallel_comm_backend", None) == "ucc":
        raise ConfigError("--pipeline-model-parallel-comm-backend ucc is not supported: megallama's pipeline sends "
                          "through the run's process group (NCCL on GPUs); drop it or pass nccl")
    if getattr(args, "variable_seq_lengths", False) and pp > 1:
        raise ConfigError("--variable-seq-lengths is not supported with pipeline parallelism: stage-to-stage buffers "
                          "are [micro batch, --seq-length, hidden] and batches are padded to --seq-length; drop it")
    if getattr(args, "defer_embedding_wgrad_compute", False):
        raise ConfigError("--defer-embedding-wgrad-compute is not supported: the output layer's weight gradient is "
                          "computed in its backward; --pipeline-schedule zb-h1 defers weight-gradient GEMMs into the "
                          "pipeline bubbles instead")
    if getattr(args, "wgrad_deferral_limit", 0):
        raise ConfigError(f"--wgrad-deferral-limit {args.wgrad_deferral_limit} limits "
                          "--defer-embedding-wgrad-compute, which megallama does not have; drop it")
    if pp == 1:
        for name in ("first", "last"):
            if getattr(args, f"decoder_{name}_pipeline_num_layers", None) is not None:
                raise ConfigError(f"--decoder-{name}-pipeline-num-layers needs --pipeline-model-parallel-size > 1; "
                                  "drop it or raise the pipeline size")
        return
    # a stage without decoder layers holds no LoRA adapters (strategies.apply_strategy): it trains nothing itself
    args.pipeline_layer_counts = _layer_counts(args)


def _layer_counts(args) -> list:
    """Decoder layers per model part: the layout's, Megatron's split with virtual stages or the embedding / loss
    counted as layers or the first/last rank pinned (``megatron_split``), else megallama's cost-balanced split."""
    pp, layers = args.pipeline_model_parallel_size, args.model_config.num_layers
    if getattr(args, "pipeline_model_parallel_layout", None) is not None:
        parts_of(args.pipeline_layer_counts, layers, pp)
        return list(args.pipeline_layer_counts)
    e, last = (bool(getattr(args, f"account_for_{x}_in_pipeline_split", False)) for x in ("embedding", "loss"))
    v = args.virtual_pipeline_model_parallel_size or 1
    if e or last:
        return megatron_split(layers, pp, v, first=args.decoder_first_pipeline_num_layers,
                              last=args.decoder_last_pipeline_num_layers, embedding=e, loss=last)
    from megallama.pipeline.model_chunks import model_parts
    parts = model_parts(args.model_config, pp, args.pipeline_schedule, args.num_layers_per_virtual_pipeline_stage,
                        args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers,
                        num_virtual_stages=v if v > 1 else None)
    return [len(part) for part in parts]
