"""The loop-equivalence harness: ``pretrain`` under a parallel layout against the single-process run of the same
arguments, the losses of every rank within ``rtol`` of the reference at every step.

The single-process reference runs in a spawned process like the ranks (pytest's own process may differ in
threads and state) and is computed once per base argument list.
"""
from dist_utils import run_distributed
from megallama.arguments import parse_args
from megallama.training import pretrain

_REFERENCE = {}


def train_losses(rank, world, argv):
    """One rank's ``{step: loss}`` of ``pretrain`` with these arguments."""
    return pretrain(parse_args(list(argv), world_size=world))["losses"]


def pretrain_here(argv, finetune: bool = False) -> dict:
    """``pretrain`` in this process on one intra-op thread (tiny models on a busy 2-core box), through
    ``finetune_llama``'s preparation with ``finetune``; the grid is torn down after, for the next in-process run."""
    import torch

    from megallama.mpu import parallel_state as ps
    args = parse_args(list(argv), world_size=1)
    if finetune:
        import finetune_llama
        args = finetune_llama.prepare_finetune_args(args)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain(args)
    finally:
        ps.destroy_model_parallel()
        torch.set_num_threads(n)


def reference_losses(base):
    key = tuple(base)
    if key not in _REFERENCE:
        _REFERENCE[key] = run_distributed(train_losses, 1, list(base))[0]
    return _REFERENCE[key]


def assert_layout_matches_single_process(base, world, extra, rtol=1e-5, same_steps=True):
    """``base + extra`` on ``world`` ranks against ``base`` on one; ``same_steps`` also requires the same steps."""
    ref = reference_losses(base)
    out = run_distributed(train_losses, world, list(base) + list(extra))
    for rank, losses in out.items():
        if same_steps:
            assert sorted(losses) == sorted(ref)
        for step in ref:
            assert abs(losses[step] - ref[step]) <= rtol * abs(ref[step]), (rank, step, losses[step], ref[step])
