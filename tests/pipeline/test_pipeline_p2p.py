"""Batched point-to-point between stages on gloo: batch_isend_irecv and the ordered isend/irecv fallback."""
import pytest
import torch

from dist_utils import run_distributed
from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from megallama.pipeline.p2p import P2POp, batch_send_recv, stage_rank, tensor_shape


def _exchange(rank, world):
    ps.initialize_model_parallel(1, world)
    peer = stage_rank(1 - ps.get_pipeline_model_parallel_rank())
    out = {}
    for use_batch in (True, False):
        # several messages each way in one batch, different shapes, mixed send/recv order
        mine = [torch.full((2, 3), 10.0 * rank + i) for i in range(3)]
        bufs = [torch.empty(2, 3) for _ in range(3)]
        ops = []
        for i in range(3):
            ops.append(P2POp(True, mine[i], peer, tag=1 + 2 * i + rank))
            ops.append(P2POp(False, bufs[i], peer, tag=1 + 2 * i + (1 - rank)))
        works = batch_send_recv(ops, ps.get_pipeline_model_parallel_group(), use_batch=use_batch)
        assert len(works) == len(ops)
        for w in works:
            w.wait()
        out[use_batch] = [b[0, 0].item() for b in bufs]
    return out


def test_batched_and_fallback_p2p_on_gloo():
    res = run_distributed(_exchange, 2)
    for rank in (0, 1):
        other = 1 - rank
        for use_batch in (True, False):
            assert res[rank][use_batch] == [10.0 * other + i for i in range(3)]


def test_tensor_shape():
    assert tensor_shape(16, 2, 32) == (2, 16, 32)
    with pytest.raises(ConfigError, match="seq_length and micro_batch_size"):
        tensor_shape(None, 2, 32)
