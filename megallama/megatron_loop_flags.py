"""Megatron-LM's flags for the training loop and its communication overlap, checked once the layout is known
(``arguments._derive`` calls ``check_loop_flags`` last).

``--skip-train`` is Megatron's evaluation-only run (training.pretrain). The overlap flags map onto what megallama
does, which is fixed: its pipeline runner posts every stage's sends and receives ahead and waits for a receive only
when a compute needs it (Megatron's overlapped p2p, for every schedule), each stage launches its gradient reduction
as its own last backward makes buckets ready (Megatron's ``--no-align-grad-reduce``), and ``--overlap-param-gather``
launches every bucket's all-gather at the end of the optimizer step (what Megatron's
``--overlap-param-gather-with-optimizer-step`` asks for); like Megatron's, it needs the distributed optimizer. A flag
that asks for something else is one error line.
"""
from __future__ import annotations

import argparse

from megallama.errors import ConfigError


def add_loop_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training loop and overlap (Megatron's flags)")
    g.add_argument("--skip-train", action="store_true", help="no training: evaluate the --load checkpoint (or "
                   "the initial model) on the validation and test data, and exit")
    g.add_argument("--no-overlap-p2p-communication", dest="overlap_p2p_comm", action="store_false",
                   help="refused with pipeline parallelism: megallama always overlaps the stages' sends/receives")
    g.add_argument("--overlap-param-gather-with-optimizer-step", action="store_true",
                   help="with --overlap-param-gather (ZeRO 1/2): the all-gathers start at the end of the optimizer "
                   "step, which is when megallama starts them")
    g.add_argument("--no-align-grad-reduce", dest="align_grad_reduce", action="store_false",
                   help="each pipeline stage reduces its gradients as its last backward makes them ready (what "
                   "megallama does)")


def check_loop_flags(args) -> None:
    """After the layout is derived: the run's length, --skip-train and the overlap flags."""
    if args.train_iters is not None and args.epochs is not None:
        raise ConfigError(f"--train-iters {args.train_iters} and --epochs {args.epochs:g} both set the run's length; "
                          "pass one")
    if not args.overlap_p2p_comm and args.pipeline_model_parallel_size > 1:
        raise ConfigError("--no-overlap-p2p-communication is not supported: megallama's pipeline always posts the "
                          "stages' sends and receives ahead and waits for one only when a compute needs it (the "
                          "results are the same either way); drop it")
    if args.overlap_param_gather_with_optimizer_step:
        flag = "--overlap-param-gather-with-optimizer-step"
        if args.zero_stage not in (1, 2):
            raise ConfigError(f"{flag} needs the distributed optimizer's parameter all-gather: pass "
                              f"--use-distributed-optimizer (or --zero-stage 1/2; got {args.zero_stage})")
        if not args.overlap_param_gather:
            raise ConfigError(f"{flag} needs --overlap-param-gather (as in Megatron); add it")
    if args.overlap_param_gather and args.zero_stage == 0:  # Megatron asserts it; it did nothing here
        raise ConfigError("--overlap-param-gather needs the distributed optimizer (ZeRO stage 0 has no parameter "
                          "all-gather to overlap): add --use-distributed-optimizer or --zero-stage 1-3, or drop it")
    from megallama.timers import check_timing_flags
    check_timing_flags(args)
