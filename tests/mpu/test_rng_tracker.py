"""The RNG tracker: dropout inside the TP region draws from a per-tp-rank stream (different masks on the
shards of different tp ranks, as Megatron), while the default stream is the same on all tp ranks of a stage (so
replicated work agrees), data-parallel replicas share both, and forking leaves the default stream untouched."""
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from megallama.mpu import parallel_state as ps
from megallama.mpu.random import get_cuda_rng_tracker, get_rng_tracker, model_parallel_seed


def _draw(tp, pp):
    ps.initialize_model_parallel(tp, pp)
    model_parallel_seed(1234)
    tracker = get_rng_tracker()
    default_1 = torch.rand(8)
    with tracker.fork():
        tp_mask = F.dropout(torch.ones(64), p=0.5, training=True)
    default_2 = torch.rand(8)
    with tracker.fork():  # the forked stream advances: a second draw differs from the first
        tp_mask_2 = F.dropout(torch.ones(64), p=0.5, training=True)
    model_parallel_seed(1234)
    torch.rand(8)
    default_2_without_fork = torch.rand(8)
    out = dict(tp=ps.get_tensor_model_parallel_rank(), dp=ps.get_data_parallel_rank(),
               pp=ps.get_pipeline_model_parallel_rank(), default=torch.cat([default_1, default_2]), tp_mask=tp_mask,
               fork_is_transparent=torch.equal(default_2, default_2_without_fork),
               stream_advances=not torch.equal(tp_mask, tp_mask_2))
    ps.destroy_model_parallel()
    return out


def _job(rank, world):
    return {"tp2dp2": _draw(2, 1), "tp2pp2": _draw(2, 2)}


def test_tp_rank_dropout_streams_differ_default_streams_agree():
    assert get_cuda_rng_tracker() is get_rng_tracker()
    out = run_distributed(_job, 4)
    for layout in ("tp2dp2", "tp2pp2"):
        res = [out[r][layout] for r in range(4)]
        assert all(x["fork_is_transparent"] and x["stream_advances"] for x in res)
        for a in res:
            for b in res:
                same_stage = a["pp"] == b["pp"]
                assert torch.equal(a["default"], b["default"]) == same_stage, (layout, a["tp"], b["tp"])
                if same_stage:
                    assert torch.equal(a["tp_mask"], b["tp_mask"]) == (a["tp"] == b["tp"]), (layout, a, b)
