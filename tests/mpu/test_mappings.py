"""Each TP/SP mapping's forward and backward against the collective it stands for, on real gloo groups.

Every rank can build every rank's tensors (seeded by (dp rank, tp rank)), so the expected values are computed
locally. Runs tp=4 and tp=2 x dp=2 (groups must not mix across data-parallel replicas) in one 4-process job,
with batch 2 so the sequence dim (1) is not the outermost one.
"""
import torch

from dist_utils import run_distributed
from megallama.mpu import mappings as M
from megallama.mpu import parallel_state as ps


def _t(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check(tp):
    ps.initialize_model_parallel(tp)
    n, r, d = tp, ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()
    B, S, H = 2, 2 * n, 2 * n
    full, seq_shard, hid_shard = (B, S, H), (B, S // n, H), (B, S, H // n)

    def per_rank(shape, salt):  # rank j of my tp group's tensor
        return [_t(shape, 1000 * salt + 100 * d + j) for j in range(n)]

    def same(shape, salt):  # replicated over my tp group (differs across dp replicas)
        return _t(shape, 1000 * salt + 100 * d + 99)

    cases = {
        # name: (fn, all ranks' inputs, all ranks' upstream grads, expected out, expected input grad)
        "copy": (M.copy_to_tensor_model_parallel_region, [same(full, 1)] * n, per_rank(full, 2),
                 lambda xs: xs[r], lambda gs: sum(gs)),
        "reduce": (M.reduce_from_tensor_model_parallel_region, per_rank(full, 3), [same(full, 4)] * n,
                   lambda xs: sum(xs), lambda gs: gs[r]),
        "scatter_tp": (M.scatter_to_tensor_model_parallel_region, [same(full, 5)] * n, per_rank(hid_shard, 6),
                       lambda xs: xs[r].chunk(n, -1)[r], lambda gs: torch.cat(gs, -1)),
        "gather_tp": (M.gather_from_tensor_model_parallel_region, per_rank(hid_shard, 7), [same(full, 8)] * n,
                      lambda xs: torch.cat(xs, -1), lambda gs: gs[r].chunk(n, -1)[r]),
        "scatter_sp": (M.scatter_to_sequence_parallel_region, [same(full, 9)] * n, per_rank(seq_shard, 10),
                       lambda xs: xs[r].chunk(n, 1)[r], lambda gs: torch.cat(gs, 1)),
        "gather_sp_to_tp": (M.gather_from_sequence_parallel_region, per_rank(seq_shard, 11), per_rank(full, 12),
                            lambda xs: torch.cat(xs, 1), lambda gs: sum(gs).chunk(n, 1)[r]),
        "gather_sp_replicated": (lambda x: M.gather_from_sequence_parallel_region(x, False), per_rank(seq_shard, 13),
                                 [same(full, 14)] * n, lambda xs: torch.cat(xs, 1), lambda gs: gs[r].chunk(n, 1)[r]),
        "reduce_scatter_sp": (M.reduce_scatter_to_sequence_parallel_region, per_rank(full, 15),
                              per_rank(seq_shard, 16), lambda xs: sum(xs).chunk(n, 1)[r], lambda gs: torch.cat(gs, 1)),
    }
    errors = []
    for name, (fn, xs, gs, want_y, want_g) in cases.items():
        x = xs[r].clone().requires_grad_()
        y = fn(x)
        y.backward(gs[r])
        if not torch.allclose(y, want_y(xs), rtol=1e-12, atol=1e-12):
            errors.append(f"tp={tp} {name}: forward")
        if not torch.allclose(x.grad, want_g(gs), rtol=1e-12, atol=1e-12):
            errors.append(f"tp={tp} {name}: backward")
    # The raw async helpers used by the fused column linears.
    x = per_rank(seq_shard, 17)
    pending = M.all_gather_along_dim(x[r], 1, async_op=True)
    if not torch.equal(pending.wait(), torch.cat(x, 1)):
        errors.append(f"tp={tp} async all_gather_along_dim")
    xs = per_rank(full, 18)
    out, work = M.reduce_scatter_along_dim(xs[r], 1, async_op=True)
    work.wait()
    if not torch.allclose(out, sum(xs).chunk(n, 1)[r], rtol=1e-12, atol=1e-12):
        errors.append(f"tp={tp} async reduce_scatter_along_dim")
    ps.destroy_model_parallel()
    return errors


def _job(rank, world):
    return _check(4) + _check(2)


def test_mappings_forward_backward_tp4_and_tp2_dp2():
    out = run_distributed(_job, 4)
    errors = [e for r in sorted(out) for e in out[r]]
    assert not errors, errors


def test_mappings_are_identity_without_tp():
    x = torch.randn(2, 4, 6, requires_grad=True)
    for fn in (M.copy_to_tensor_model_parallel_region, M.reduce_from_tensor_model_parallel_region,
               M.scatter_to_tensor_model_parallel_region, M.gather_from_tensor_model_parallel_region,
               M.scatter_to_sequence_parallel_region, M.gather_from_sequence_parallel_region,
               M.reduce_scatter_to_sequence_parallel_region):
        y = fn(x)
        assert torch.equal(y, x)
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert torch.equal(g, torch.ones_like(x))
