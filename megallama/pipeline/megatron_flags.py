"""Megatron-LM's remaining pipeline flags, and the layer split checked while parsing.

``arguments._derive_pipeline`` calls ``apply_pipeline_layout`` first (a ``--pipeline-model-parallel-layout``
becomes the flags megallama's partitioner reads) and ``check_pipeline_split`` last: the split of the layers over
the (virtual) stages is computed there, so a layout that cannot be built is one error line before any data is
read or any process group made, not a failure inside model building. The other flags restate what the pipeline
runner does (it posts every send and receive ahead in all phases, and starts every chunk's parameter all-gather
at the end of the optimizer step) or are refused in one line naming what megallama does instead.
"""
from __future__ import annotations

import argparse

from megallama.errors import ConfigError
from megallama.pipeline.layout import FLAG as LAYOUT_FLAG
from megallama.pipeline.layout import parse_layout


def add_pipeline_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pipeline (Megatron's flags)")
    g.add_argument(LAYOUT_FLAG, default=None, help="what each (virtual) stage holds, e.g. 'Ett|tt|tt|ttL' "
                   "(E embedding, t decoder layer, L loss, | between stages, X*n / (...)*n repeat); stages beyond "
                   "pp are virtual stages (interleaved, equal chunks here)")
    g.add_argument("--microbatch-group-size-per-virtual-pipeline-stage", dest="microbatch_group_size_per_vp_stage",
                   type=int, default=None, help="the pipeline size (Megatron's default): the interleaved schedule "
                   "here runs groups of pp microbatches per virtual stage; another value is refused")
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
    g.add_argument("--deallocate-pipeline-outputs", action="store_true", help=argparse.SUPPRESS)


def apply_pipeline_layout(args) -> None:
    """Before the virtual-stage flags are read: a layout becomes --num-layers-per-virtual-pipeline-stage
    (equal virtual stages) or --decoder-first/last-pipeline-num-layers (one stage per rank), checked below to
    rebuild exactly the layout asked for."""
    layout = getattr(args, "pipeline_model_parallel_layout", None)
    if layout is None:
        return
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
        return
    if v > 1:
        if len(set(counts)) > 1:
            raise ConfigError(f"{LAYOUT_FLAG} '{layout}' gives virtual stages {counts} decoder layers, but "
                              "megallama's interleaved schedule cuts equal chunks; give every stage the same number "
                              "of t, or one stage per rank (uneven stages)")
        if args.pipeline_schedule not in (None, "interleaved"):
            raise ConfigError(f"{LAYOUT_FLAG} '{layout}' lists {v} virtual stages per rank, which only "
                              f"--pipeline-schedule interleaved runs (not {args.pipeline_schedule}); drop one of them")
        args.num_layers_per_virtual_pipeline_stage = counts[0]  # _derive_pipeline picks the interleaved schedule
        return
    if args.pipeline_schedule == "interleaved":
        raise ConfigError(f"{LAYOUT_FLAG} '{layout}' gives one stage per rank, but --pipeline-schedule interleaved "
                          f"needs virtual stages; list {2 * pp} or more stages, or pick another schedule")
    args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers = counts[0], counts[-1]


def check_pipeline_split(args) -> None:
    """Last: the other pipeline flags, then the split itself, so that a bad layout stops here."""
    pp, schedule = args.pipeline_model_parallel_size, args.pipeline_schedule
    group = getattr(args, "microbatch_group_size_per_vp_stage", None)
    if group is not None and group != pp:
        raise ConfigError(f"--microbatch-group-size-per-virtual-pipeline-stage {group} is not supported: megallama's "
                          f"interleaved schedule runs groups of pp = {pp} microbatches per virtual stage (Megatron's "
                          f"default); drop it or pass {pp}")
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
    if getattr(args, "deallocate_pipeline_outputs", False):
        raise ConfigError("--deallocate-pipeline-outputs is not supported: a stage keeps each microbatch's output "
                          "until its backward; lower activation memory with --recompute-granularity instead")
    if pp == 1:
        return
    from megallama.pipeline.model_chunks import model_parts
    parts = model_parts(args.model_config, pp, schedule, args.num_layers_per_virtual_pipeline_stage,
                        args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers)
    want = getattr(args, "pipeline_layer_counts", None)
    got = [len(part) for part in parts]
    if want is not None and got != want:
        raise ConfigError(f"{LAYOUT_FLAG} '{args.pipeline_model_parallel_layout}' asks for {want} decoder layers per "
                          f"stage, but megallama's partitioner balances the middle stages by cost ({got}); pin only "
                          "the first and last stages (--decoder-first/last-pipeline-num-layers)")
