"""``megallama.mpu`` used as a library, the way one uses megatron.core: the flat namespace, Megatron's extra
parallel_state getters (2 x 2 grids of 4 gloo ranks), layers refusing a tp size other than the one they were built
under, constructor initialisation, and vocab-parallel CE with Megatron's signature (label smoothing vs torch at
tp 1 and 2, non-contiguous logits, out-of-range targets, the documented single backward)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import rel_err, run_distributed
from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from megallama.mpu.cross_entropy import vocab_parallel_cross_entropy
from megallama.mpu.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from tp_helpers import gather_tp

V = 16


# ---------------- G: the flat namespace ----------------
def test_flat_namespace_like_megatron_core():
    import megallama.mpu as mpu
    from megallama.mpu import ColumnParallelLinear as C, get_tensor_model_parallel_rank  # noqa: F401
    names = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
             "copy_to_tensor_model_parallel_region", "reduce_from_tensor_model_parallel_region",
             "scatter_to_tensor_model_parallel_region", "gather_from_tensor_model_parallel_region",
             "scatter_to_sequence_parallel_region", "gather_from_sequence_parallel_region",
             "reduce_scatter_to_sequence_parallel_region", "get_cuda_rng_tracker", "model_parallel_cuda_manual_seed",
             "initialize_model_parallel", "destroy_model_parallel", "model_parallel_is_initialized",
             "get_tensor_model_parallel_world_size", "get_data_parallel_group", "get_pipeline_model_parallel_rank",
             "get_data_parallel_src_rank", "get_pipeline_model_parallel_first_rank",
             "get_pipeline_model_parallel_last_rank", "is_rank_in_embedding_group",
             "get_tensor_and_data_parallel_group", "set_tensor_model_parallel_attributes"]
    assert [n for n in names if not hasattr(mpu, n)] == []
    assert C is ColumnParallelLinear and get_tensor_model_parallel_rank() == 0
    import types
    from megallama.mpu import linear_cross_entropy, random  # submodules, not shadowed by a re-exported name
    assert isinstance(linear_cross_entropy, types.ModuleType) and isinstance(random, types.ModuleType)


# ---------------- H: Megatron's getters on 2 x 2 grids ----------------
def _getters():
    return dict(dp_src=ps.get_data_parallel_src_rank(), dpcp_src=ps.get_data_parallel_src_rank(True),
                pp_first=ps.get_pipeline_model_parallel_first_rank(),
                pp_last=ps.get_pipeline_model_parallel_last_rank(), in_embd=ps.is_rank_in_embedding_group(),
                in_embd_iv=ps.is_rank_in_embedding_group(ignore_virtual=True),
                tp_dp=dist.get_process_group_ranks(ps.get_tensor_and_data_parallel_group()),
                tp_dp_cp=dist.get_process_group_ranks(ps.get_tensor_and_data_parallel_group(with_context_parallel=True)))


def _grid_job(rank, world):
    out = {}
    for name, kw in (("tp2pp2", dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)),
                     ("tp2dp2", dict(tensor_model_parallel_size=2)),
                     ("tp2cp2", dict(tensor_model_parallel_size=2, context_parallel_size=2))):
        ps.initialize_model_parallel(**kw)
        out[name] = _getters()
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 2, virtual_pipeline_model_parallel_size=2)  # pp 2 x dp 2, two chunks each
    vpp = []
    for chunk in (0, 1):
        ps.set_virtual_pipeline_model_parallel_rank(chunk)
        vpp.append((ps.is_rank_in_embedding_group(), ps.is_rank_in_embedding_group(ignore_virtual=True)))
    out["vpp"] = vpp
    return out


def test_megatron_getters_on_2x2_grids():
    out = run_distributed(_grid_job, 4)
    # tp2 x pp2: ranks 0,1 stage 0; 2,3 stage 1; pipelines {0,2} {1,3}; no dp
    g = {r: out[r]["tp2pp2"] for r in range(4)}
    assert [g[r]["pp_first"] for r in range(4)] == [0, 1, 0, 1]
    assert [g[r]["pp_last"] for r in range(4)] == [2, 3, 2, 3]
    assert [g[r]["dp_src"] for r in range(4)] == [0, 1, 2, 3]
    assert all(g[r]["in_embd"] and g[r]["in_embd_iv"] for r in range(4))  # first and last stage: all of them
    assert g[0]["tp_dp"] == [0, 1] and g[2]["tp_dp"] == [2, 3] and g[3]["tp_dp_cp"] == [2, 3]
    # tp2 x dp2: dp groups {0,2} {1,3}; one stage
    g = {r: out[r]["tp2dp2"] for r in range(4)}
    assert [g[r]["dp_src"] for r in range(4)] == [0, 1, 0, 1]
    assert [g[r]["pp_first"] for r in range(4)] == [0, 1, 2, 3] == [g[r]["pp_last"] for r in range(4)]
    assert all(g[r]["tp_dp"] == [0, 1, 2, 3] == g[r]["tp_dp_cp"] for r in range(4))
    # tp2 x cp2: the tensor-and-data group excludes cp unless asked
    g = {r: out[r]["tp2cp2"] for r in range(4)}
    assert g[0]["tp_dp"] == [0, 1] and g[3]["tp_dp"] == [2, 3] and g[1]["tp_dp_cp"] == [0, 1, 2, 3]
    assert [g[r]["dp_src"] for r in range(4)] == [0, 1, 2, 3] and g[3]["dpcp_src"] == 1
    # pp2 x dp2 with two virtual chunks: stage 0 holds the embedding in chunk 0, stage 1 the head in chunk 1
    assert out[0]["vpp"] == [(True, True), (False, True)]
    assert out[2]["vpp"] == [(False, True), (True, True)]


def test_getters_before_initialize():
    assert ps.get_data_parallel_src_rank() == 0 and ps.get_pipeline_model_parallel_last_rank() == 0
    assert ps.is_rank_in_embedding_group() and ps.get_tensor_and_data_parallel_group() is None


# ---------------- F: constructor initialisation ----------------
def test_constructors_initialise_and_can_skip():
    torch.manual_seed(0)
    for layer in (ColumnParallelLinear(64, 96, init_std=0.02), RowParallelLinear(96, 64, init_std=0.05),
                  VocabParallelEmbedding(128, 64, init_std=0.03)):
        w = layer.weight.detach()
        assert torch.isfinite(w).all() and abs(w.std().item() - layer.init_std) < 0.15 * layer.init_std
    state = torch.get_rng_state()
    ColumnParallelLinear(64, 96, perform_initialization=False)
    with torch.device("meta"):  # build_model's path: nothing drawn, nothing allocated
        ColumnParallelLinear(64, 96), VocabParallelEmbedding(128, 64)
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(1)
    bf16 = ColumnParallelLinear(8, 6, dtype=torch.bfloat16).weight
    torch.manual_seed(1)
    assert torch.equal(bf16, ColumnParallelLinear(8, 6).weight.to(torch.bfloat16))


def _init_job(rank, world):
    ps.initialize_model_parallel(2)
    torch.manual_seed(3)
    layers = [ColumnParallelLinear(8, 6), RowParallelLinear(6, 8), VocabParallelEmbedding(V, 4)]
    return [gather_tp(layer.weight, layer.weight.partition_dim) for layer in layers]


def test_cpu_init_is_tp_independent():
    """Megatron's CPU master-weight init: same seed, same full weights at tp 2 as at tp 1."""
    out = run_distributed(_init_job, 2)
    torch.manual_seed(3)
    want = [ColumnParallelLinear(8, 6).weight, RowParallelLinear(6, 8).weight, VocabParallelEmbedding(V, 4).weight]
    for got, ref in zip(out[0], want):
        assert torch.equal(got, ref.detach())


# ---------------- B, C, D, E: vocab-parallel cross-entropy ----------------
def _ce_data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, V, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, V, (3, 5), generator=g)
    target[0, 1] = target[2, 4] = -100
    target[1, 0] = V - 1
    return logits, target, torch.rand(3, 5, generator=g, dtype=torch.float64)


def _smoothing_errors():
    """B: Megatron's positional label_smoothing, torch's definition over the full vocabulary."""
    n, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    logits, target, up = _ce_data()
    errors = []
    for eps in (0.0, 0.1, 1.0):
        ref_x = logits.clone().requires_grad_()
        ref = F.cross_entropy(ref_x.view(-1, V), target.view(-1), reduction="none", label_smoothing=eps).view(3, 5)
        (ref * up).sum().backward()
        x = logits.chunk(n, -1)[r].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, target, eps)  # Megatron's positional label_smoothing
        (loss * up).sum().backward()
        if rel_err(loss, ref) > 1e-12 or rel_err(x.grad, ref_x.grad.chunk(n, -1)[r]) > 1e-12:
            errors.append(f"tp={n} label_smoothing={eps}: loss {rel_err(loss, ref):.1e}")
    # ignore_index is keyword-only; a custom one works with smoothing
    t0 = target.masked_fill(target < 0, 0)
    ref = F.cross_entropy(logits.view(-1, V), t0.view(-1), reduction="none", ignore_index=0,
                          label_smoothing=0.2).view(3, 5)
    loss = vocab_parallel_cross_entropy(logits.chunk(n, -1)[r], t0, 0.2, ignore_index=0)
    if rel_err(loss, ref) > 1e-12:
        errors.append(f"tp={n}: ignore_index=0")
    return errors


def _layout_errors(eps):
    """C: [s, b, v] logits seen as [b, s, v] (non-contiguous)."""
    n, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    logits, target, up = _ce_data()
    sbv = logits.transpose(0, 1).contiguous()
    x = sbv.chunk(n, -1)[r].clone().requires_grad_()
    ref_x = sbv.clone().requires_grad_()
    ref = F.cross_entropy(ref_x.transpose(0, 1).reshape(-1, V), target.view(-1), reduction="none",
                          label_smoothing=eps).view(3, 5)
    (ref * up).sum().backward()
    loss = vocab_parallel_cross_entropy(x.transpose(0, 1), target, **({"label_smoothing": eps} if eps else {}))
    (loss * up).sum().backward()
    if rel_err(loss, ref) > 1e-12 or rel_err(x.grad, ref_x.grad.chunk(n, -1)[r]) > 1e-12:
        return [f"tp={n} label_smoothing={eps}: non-contiguous logits"]
    return []


def _target_errors():
    """D: targets torch refuses are refused on every rank, before any collective."""
    n, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    logits, target, _ = _ce_data()
    errors = []
    for bad in (V, -1, 10 * V):
        t = target.clone()
        t[2, 2] = bad
        try:
            vocab_parallel_cross_entropy(logits.chunk(n, -1)[r], t)
            errors.append(f"tp={n}: target {bad} accepted")
        except ValueError as e:
            if f"[0, {V})" not in str(e) or str(bad) not in str(e):
                errors.append(f"tp={n}: unclear error {e}")
    return errors


def _ce_errors():
    return _smoothing_errors() + _layout_errors(0.0) + _layout_errors(0.1) + _target_errors()


def test_ce_label_smoothing_tp1():
    assert _smoothing_errors() == []


def test_ce_non_contiguous_logits_tp1():
    assert _layout_errors(0.0) == [] and _layout_errors(0.1) == []


def test_ce_out_of_range_targets_tp1():
    assert _target_errors() == []


def test_ce_signature_is_megatrons():
    logits, target, _ = _ce_data()
    with pytest.raises(TypeError):
        vocab_parallel_cross_entropy(logits, target, 0.0, -100)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        vocab_parallel_cross_entropy(logits, target, -100)  # the old positional ignore_index
    with pytest.raises(ValueError, match="need a target of shape"):
        vocab_parallel_cross_entropy(logits, target.view(-1))


def test_ce_single_backward_documented():
    """E: the softmax saved for backward becomes the gradient in place (no second [tokens, vocab/tp] buffer, as
    Megatron-core): a retained graph cannot be backpropagated twice, and says so."""
    logits, target, _ = _ce_data()
    x = logits.clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(x, target).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


# ---------------- A: a layer runs only under the tp size it was built with ----------------
def _tp2_job(rank, world):
    early = [ColumnParallelLinear(8, 4), RowParallelLinear(4, 8), VocabParallelEmbedding(V, 8)]
    ps.initialize_model_parallel(2)  # tp 2 x dp 2
    x, ids = torch.randn(2, 3, 8), torch.randint(0, V, (2, 3))
    errors = []
    for layer, inp in zip(early, (x, x[..., :4], ids)):
        try:
            layer(inp)
            errors.append(f"{type(layer).__name__} built at tp 1 ran at tp 2")
        except ConfigError as e:
            if "built with tensor-model-parallel size 1 but used with 2" not in str(e):
                errors.append(str(e))
    from megallama.mpu.layers import column_parallel_linears
    try:
        column_parallel_linears(x, [early[0]])
        errors.append("column_parallel_linears ran a tp-1 layer at tp 2")
    except ConfigError:
        pass
    late = ColumnParallelLinear(8, 4)
    late(x)  # built under the grid: fine
    errors += _ce_errors()
    ps.destroy_model_parallel()
    with pytest.raises(ConfigError, match="size 2 but used with 1"):
        late(x)
    return errors


def test_tp2_layers_refuse_other_tp_and_ce_matches_torch():
    out = run_distributed(_tp2_job, 4)
    errors = [f"rank {r}: {e}" for r in sorted(out) for e in out[r]]
    assert not errors, "\n".join(errors)
