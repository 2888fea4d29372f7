"""The pipeline as a library, on stage modules written for Megatron-core (not built by build_model_chunks).

Such a module has ``set_input_tensor(input_tensor)`` taking a one-element list, ``pre_process`` and a
``config`` with ``hidden_size``, nothing else of megallama's. One spawn of 2 gloo ranks runs every case; grads
are compared to the whole chain run in one process.
"""
import types

import pytest
import torch
import torch.nn as nn

from dist_utils import rel_err, run_distributed
from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from megallama.pipeline import allreduce_embedding_gradients, get_forward_backward_func
from megallama.pipeline.no_pipelining import forward_backward_no_pipelining
from megallama.pipeline.schedules import chunk_parts

B, S, H, M = 2, 3, 4, 4  # micro batch, sequence, hidden, microbatches


def _weights(num_parts):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(H, H, generator=g) * 0.5, torch.randn(H, generator=g) * 0.1) for _ in range(num_parts)]


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(B, S, H, generator=g), torch.randn(B, S, H, generator=g)) for _ in range(M)]


class MegatronStylePart(nn.Module):
    """A Megatron-core-style stage: ``input_tensor[0]`` of the list the schedule sets, no ``sequence_parallel``,
    no ``tie_word_embeddings``; ``config=False`` leaves the config out, ``set_input=False`` the method."""

    def __init__(self, w, b, pre_process, config=True):
        super().__init__()
        self.lin = nn.Linear(H, H)
        self.lin.weight.data.copy_(w)
        self.lin.bias.data.copy_(b)
        self.pre_process = pre_process
        self.input_tensor = None
        if config:
            self.config = types.SimpleNamespace(hidden_size=H)

    def set_input_tensor(self, input_tensor):
        self.input_tensor = input_tensor[0]

    def forward(self, x):
        return torch.tanh(self.lin(x if self.pre_process else self.input_tensor))


class NoSetInputPart(MegatronStylePart):
    set_input_tensor = None


class DeclaredPart(MegatronStylePart):
    """Declares every attribute the old runner read and takes a tensor or a list: the Chimera cases then test the
    replica sum alone (it used to need an undocumented ``pipeline_schedule = "chimera"`` on the chunks)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.config.tie_word_embeddings, self.sequence_parallel = False, False

    def set_input_tensor(self, input_tensor):
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor


class TiedPart(MegatronStylePart):
    """Megatron-core's tied pair: the first and last stage's ``lin.weight`` start equal and step with the sum."""
    share_embeddings_and_output_weights = True

    def shared_embedding_or_output_weight(self):
        return self.lin.weight


def _forward_step(data_iterator, model):
    x, y = next(data_iterator)
    out = model(x)

    def loss_func(o, non_loss_data=False):
        if non_loss_data:  # Megatron-core's evaluate(collect_non_loss_data=True): any data, here the output
            return o.detach().clone()
        loss = ((o - y) ** 2).mean()
        return loss, {"loss": loss.detach()}
    return out, loss_func


def _reference(num_parts):
    parts = [MegatronStylePart(w, b, True) for w, b in _weights(num_parts)]
    for x, y in _data():
        h = x
        for p in parts:
            h = p(h)
        (((h - y) ** 2).mean() / M).backward()
    return [(p.lin.weight.grad, p.lin.bias.grad) for p in parts]


def _chunks(schedule, v=1, cls=MegatronStylePart, **kw):
    s, K = ps.get_pipeline_model_parallel_rank(), 2 * v
    W = _weights(K)
    if cls is TiedPart:
        W = [(W[0][0], b) for _, b in W]
    parts = chunk_parts(schedule, 2, s, v)
    return parts, [cls(*W[k], pre_process=k == 0, **kw) for k in parts]


def _run(fb, schedule, v=1, ddp=False, cls=MegatronStylePart):
    """Run one step; grads by part (after allreduce_embedding_gradients), the optimizer's grad norm with ``ddp``."""
    parts, chunks = _chunks(schedule, v, cls)
    norm = None
    if ddp:
        from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
        chunks = [DistributedDataParallel(c, zero_stage=1) for c in chunks]
        opt = get_megatron_optimizer(OptimizerConfig(lr=1e-3, clip_grad=1e9), chunks)
        opt.zero_grad()
    data = [iter(_data()) for _ in range(v)] if v > 1 else iter(_data())
    fb(_forward_step, data, chunks, num_microbatches=M, seq_length=S, micro_batch_size=B)
    if ddp:
        for c in chunks:
            c.finish_grad_sync()
    allreduce_embedding_gradients(chunks)
    if ddp:
        norm = opt.step()[1]
        return {"norm": norm}
    return {"grads": {k: (c.lin.weight.grad.clone(), c.lin.bias.grad.clone()) for k, c in zip(parts, chunks)}}


def _case(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - each case reports its own failure
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        ps.destroy_model_parallel()


def _rank_cases(rank, world):
    out = {}

    def grid(vpp=None):
        ps.initialize_model_parallel(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=vpp)

    def noargs():
        grid()
        fb = get_forward_backward_func()
        return {"schedule": getattr(fb, "schedule", None), **_run(fb, "1f1b")}

    def noargs_vpp():
        grid(vpp=2)
        fb = get_forward_backward_func()
        return {"schedule": getattr(fb, "schedule", None), **_run(fb, "interleaved", v=2)}

    def one(schedule, ddp=False, cls=MegatronStylePart):
        grid()
        return _run(get_forward_backward_func(2, schedule), schedule, ddp=ddp, cls=cls)

    def missing(cls, **kw):
        grid()
        if cls is NoSetInputPart and ps.get_pipeline_model_parallel_rank() == 0:
            return {"error": "skipped on stage 0"}  # the check is stage 1's, before any p2p
        _, chunks = _chunks("1f1b", cls=cls, **kw)
        get_forward_backward_func(2, "1f1b")(_forward_step, iter(_data()), chunks, M, S, B)
        return {"error": None}

    out["noargs"] = _case(noargs)
    out["noargs_vpp"] = _case(noargs_vpp)
    out["1f1b"] = _case(lambda: one("1f1b"))
    out["tied"] = _case(lambda: one("1f1b", cls=TiedPart))
    out["chimera"] = _case(lambda: one("chimera", cls=DeclaredPart))
    out["chimera_ddp"] = _case(lambda: one("chimera", ddp=True, cls=DeclaredPart))

    def megatron_keywords(schedule, **kw):
        """Megatron-core's evaluate call: keywords only, forward only, the last stage's non-loss data back."""
        grid()
        _, chunks = _chunks(schedule, cls=DeclaredPart)
        kw = {"forward_only": True, "collect_non_loss_data": True, "decoder_seq_length": None, "first_val_step": True,
              **kw}
        with torch.no_grad():
            out = get_forward_backward_func(2, schedule)(forward_step_func=_forward_step, data_iterator=iter(_data()),
                                                         model=chunks, num_microbatches=M, seq_length=S,
                                                         micro_batch_size=B, **kw)
        return {"data": out}

    out["non_loss_data"] = _case(lambda: megatron_keywords("1f1b"))
    out["non_loss_chimera"] = _case(lambda: megatron_keywords("chimera"))
    out["decoder_seq_length"] = _case(lambda: megatron_keywords("1f1b", decoder_seq_length=S + 1))
    out["no_config"] = _case(lambda: missing(MegatronStylePart, config=False))
    out["no_set_input"] = _case(lambda: missing(NoSetInputPart))
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_rank_cases, 2)


def _check_grads(results, case, num_parts):
    ref = _reference(num_parts)
    for rank in (0, 1):
        r = results[rank][case]
        assert "error" not in r, f"rank {rank}: {r['error']}"
        for k, (gw, gb) in r["grads"].items():
            assert rel_err(gw, ref[k][0]) < 1e-5 and rel_err(gb, ref[k][1]) < 1e-5, (case, rank, k)


def test_set_input_tensor_gets_a_list_and_no_sp_or_tie_attributes_are_needed(results):
    _check_grads(results, "1f1b", 2)


def test_megatron_core_tied_weights_are_summed(results):
    W = _weights(2)  # both stages start from weight 0: the tied pair's grad is the sum of both uses
    parts = [MegatronStylePart(W[0][0], b, True) for _, b in W]
    for x, y in _data():
        (((parts[1](parts[0](x)) - y) ** 2).mean() / M).backward()
    total = parts[0].lin.weight.grad + parts[1].lin.weight.grad
    for rank in (0, 1):
        r = results[rank]["tied"]
        assert "error" not in r, r["error"]
        assert rel_err(r["grads"][rank][0], total) < 1e-5
        assert rel_err(r["grads"][rank][1], parts[rank].lin.bias.grad) < 1e-5


def test_chimera_sums_replica_grads_on_unmarked_user_chunks(results):
    _check_grads(results, "chimera", 2)


def test_chimera_optimizer_norm_counts_the_replica_once(results):
    ref = torch.sqrt(sum((g.double() ** 2).sum() for pair in _reference(2) for g in pair))
    for rank in (0, 1):
        r = results[rank]["chimera_ddp"]
        assert "error" not in r, r["error"]
        assert abs(r["norm"] - float(ref)) / float(ref) < 1e-5


def test_no_arg_get_forward_backward_func_reads_parallel_state(results):
    assert all(results[r]["noargs"].get("schedule") == "1f1b" for r in (0, 1)), results[0]["noargs"]
    assert all(results[r]["noargs_vpp"].get("schedule") == "interleaved" for r in (0, 1)), results[0]["noargs_vpp"]
    _check_grads(results, "noargs", 2)
    _check_grads(results, "noargs_vpp", 4)
    assert get_forward_backward_func() is forward_backward_no_pipelining  # no grid here: pp = 1


def _chain_model():
    return nn.Sequential(*[MegatronStylePart(w, b, True) for w, b in _weights(2)])


def test_megatron_core_evaluate_keywords_collect_non_loss_data(results):
    """Megatron's ``evaluate`` passes decoder_seq_length, collect_non_loss_data and first_val_step by keyword: the
    last stage gets ``loss_func(output, non_loss_data=True)`` per microbatch in order, the first nothing."""
    with torch.no_grad():
        ref = [_chain_model()(x) for x, _ in _data()]
    assert results[0]["non_loss_data"] == {"data": []}
    got = results[1]["non_loss_data"]
    assert "error" not in got, got["error"]
    assert len(got["data"]) == M and all(rel_err(g, r) < 1e-6 for g, r in zip(got["data"], ref))
    with torch.no_grad():
        plain = forward_backward_no_pipelining(_forward_step, iter(_data()), [_chain_model()], M, S, B,
                                               forward_only=True, collect_non_loss_data=True,
                                               decoder_seq_length=S, first_val_step=False)
    assert len(plain) == M and all(rel_err(g, r) < 1e-6 for g, r in zip(plain, ref))


def test_megatron_core_keywords_this_pipeline_cannot_honour_are_one_clear_error(results):
    for rank in (0, 1):
        assert "ConfigError" in results[rank]["non_loss_chimera"]["error"]
        assert "1f1b" in results[rank]["non_loss_chimera"]["error"]
        assert "encoder-decoder" in results[rank]["decoder_seq_length"]["error"]
    with pytest.raises(ConfigError, match="forward_only=True"):
        forward_backward_no_pipelining(_forward_step, iter(_data()), [_chain_model()], M, S, B,
                                       collect_non_loss_data=True)


def test_missing_stage_attributes_raise_one_clear_error(results):
    for rank in (0, 1):
        assert "ConfigError" in results[rank]["no_config"]["error"]
        assert "config.hidden_size" in results[rank]["no_config"]["error"]
    assert "ConfigError" in results[1]["no_set_input"]["error"]
    assert "set_input_tensor" in results[1]["no_set_input"]["error"]
