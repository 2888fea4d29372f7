"""Layout-independent initialisation and per-rank parameter memory.

The same seed gives the same full weights at tp=1, 2 and 4 (the sharded ones gathered back), also when the
row-block drawing is forced to split tensors into many blocks; and each rank's parameter storage holds exactly
1/tp of every sharded weight plus the replicated norms."""
import numpy as np
import torch

from dist_utils import run_distributed
from megallama.model import build_model
from megallama.mpu import parallel_state as ps
from megallama.mpu import random as mpu_random
from tp_helpers import GQA_TIED, MHA, full_state

SEED = 11


def _storage_bytes(model):
    """Bytes of distinct storages behind the parameters: what this rank really allocated for them."""
    seen, sharded, replicated = set(), 0, 0
    for p in model.parameters():
        st = p.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        if getattr(p, "tensor_model_parallel", False):
            sharded += st.nbytes()
        else:
            replicated += st.nbytes()
    return sharded, replicated


def _layouts(cfg, tp, small_blocks):
    ps.initialize_model_parallel(tp)
    if small_blocks:
        mpu_random._BLOCK_NUMEL = 100  # a [256, 64] table becomes 256 one-row blocks; [64, 128] 64 blocks
    model = build_model(cfg, seed=SEED)
    mpu_random._BLOCK_NUMEL = 1 << 24
    attrs_ok = all(hasattr(p, "init_std") for p in model.parameters()) and (
        tp == 1 or all(getattr(p, "tensor_model_parallel", False) for n, p in model.named_parameters()
                       if "norm" not in n))
    out = dict(state=full_state(model), bytes=_storage_bytes(model), attrs_ok=attrs_ok)
    ps.destroy_model_parallel()
    return out


def _job(rank, world):
    return {(cfg.num_query_groups, tp, small): _layouts(cfg, tp, small)
            for small in (False, True) for cfg, tp in ((MHA, 4), (MHA, 2), (GQA_TIED, 2))}


def _single(cfg, small_blocks):
    if small_blocks:
        mpu_random._BLOCK_NUMEL = 100
    try:
        model = build_model(cfg, seed=SEED)
    finally:
        mpu_random._BLOCK_NUMEL = 1 << 24
    state = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    sharded = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" not in n)
    replicated = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    return state, (sharded, replicated)


def test_init_is_layout_independent_and_memory_is_one_over_tp():
    """Also with the row-block drawing forced to split every tensor into many blocks (small=True)."""
    out = run_distributed(_job, 4)
    refs = {(kv, small): _single(cfg, small) for small in (False, True) for kv, cfg in ((4, MHA), (2, GQA_TIED))}
    for rank, res in out.items():
        for (kv, tp, small), got in res.items():
            ref_state, (ref_sharded, ref_replicated) = refs[(kv, small)]
            assert got["attrs_ok"], "parameter attributes were lost in build_model"
            assert set(got["state"]) == set(ref_state)
            for name, full in got["state"].items():
                assert np.array_equal(full, ref_state[name]), f"rank {rank} tp={tp} kv={kv}: {name} differs"
            sharded, replicated = got["bytes"]
            assert sharded * tp == ref_sharded, (rank, tp, sharded, ref_sharded)
            assert replicated == ref_replicated, (rank, tp, replicated, ref_replicated)


def test_init_draws_differ_per_parameter_and_seed():
    a, b = build_model(MHA, seed=1), build_model(MHA, seed=2)
    qa, ka = a.model.layers["0"].self_attn.q_proj.weight, a.model.layers["0"].self_attn.k_proj.weight
    assert not torch.equal(qa, ka)
    assert not torch.equal(qa, b.model.layers["0"].self_attn.q_proj.weight)
    assert abs(qa.std().item() - MHA.init_method_std) < 0.1 * MHA.init_method_std
