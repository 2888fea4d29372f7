"""Megatron's --deallocate-pipeline-outputs, which the runner always does: a stage's output sent to another stage
keeps only its autograd graph, its storage dies once the send is over (before the microbatch's backward), and
the losses and gradients are exactly those of a run that keeps every output whole (pp 2, gloo)."""
import weakref

import pytest
import torch

from dist_utils import run_distributed
from megallama.mpu import parallel_state as ps
from megallama.pipeline import allreduce_embedding_gradients, build_model_chunks, get_forward_backward_func
from megallama.pipeline.deallocate import backward_from, deallocate_output
from megallama.pipeline.model_chunks import unwrap_model
from pp_harness import MBS, SEED, SEQ, check_against_reference, forward_step, make_batches, reference, tiny_config

M = 4
# (schedule, layers per virtual stage, ZeRO stage, --compile): ZB-H1 under ZeRO-3 runs its backward on the output
# twice (input grads with inputs=[x] and the graph retained, then weight grads with inputs=params); --compile
# compiles each layer (training_setup), so a stage's output comes out of a compiled graph
CASES = [("1f1b", None, None, False), ("interleaved", 1, None, False), ("zb-h1", None, None, False),
         ("zb-h1", None, 3, False), ("gpipe", None, None, False), ("chimera", None, None, False),
         ("1f1b", None, None, True)]


def _case_id(case):
    schedule, _, zero, compiled = case
    return schedule + (f"-zero{zero}" if zero is not None else "") + ("-compile" if compiled else "")


def _one_run(world, schedule, per_virtual, zero, compiled, deallocate):
    chunks = build_model_chunks(tiny_config(4), seed=SEED, schedule=schedule, num_layers_per_virtual_stage=per_virtual)
    if compiled:
        for c in chunks:
            for layer in unwrap_model(c).model.layers.values():
                layer.forward = torch.compile(layer.forward)
    model = chunks
    if zero is not None:
        from megallama.optimizer import DistributedDataParallel
        model = [DistributedDataParallel(c, zero_stage=zero, bucket_size=3000) for c in chunks]
    refs, alive_at_backward = [], []

    def step(data_iterator, chunk):
        out, loss_func = forward_step(data_iterator, chunk)
        if not unwrap_model(chunk).post_process:  # an output this stage sends: watch its storage
            refs.append(weakref.ref(out.untyped_storage()))
            # while its backward runs: how many sent outputs' storages are still alive (this one included)
            out.register_hook(lambda g: alive_at_backward.append(sum(r() is not None for r in refs)))
        return out, loss_func

    fb = get_forward_backward_func(world, schedule, deallocate_outputs=deallocate)
    losses = fb(step, iter(make_batches(M)), model, M, SEQ, MBS)
    if zero is not None:
        for d in model:
            d.finish_grad_sync()
        allreduce_embedding_gradients(model)
        grads = [(pc.name, pc.grad_view.detach().clone()) for d in model for pc in d.optimizer_pieces()]
    else:
        allreduce_embedding_gradients(chunks)
        grads = [(n, p.grad.detach().clone()) for c in chunks for n, p in c.named_parameters()]
    return {"losses": [float(d["lm loss"]) for d in losses], "grads": grads, "stats": fb.stats,
            "sent": len(refs), "alive_at_backward": alive_at_backward,
            "alive_at_end": sum(r() is not None for r in refs)}


def _worker(rank, world, cases):
    ps.initialize_model_parallel(1, world)
    out = {}
    for case in cases:
        on, off = (_one_run(world, *case, d) for d in (True, False))
        # what the equivalence tests compare against one process, in numpy (tensors die with the rank)
        out[_case_id(case)] = {"on": dict(on, grads=[(n, g.numpy()) for n, g in on["grads"]]),
                    "off": dict(off, grads=[(n, g.numpy()) for n, g in off["grads"]]),
                    "pp": ps.get_pipeline_model_parallel_rank()}
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, 2, CASES)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_outputs_freed_after_send_and_results_unchanged(results, case):
    key = _case_id(case)
    for rank, r in results.items():
        on, off = r[key]["on"], r[key]["off"]
        # exactly the same numbers with and without deallocating
        assert on["losses"] == off["losses"]
        assert [n for n, _ in on["grads"]] == [n for n, _ in off["grads"]]
        for (name, a), (_, b) in zip(on["grads"], off["grads"]):
            assert (a == b).all(), f"rank {rank} {key}: {name} differs"
        if on["sent"] == 0:  # a stage that sends no outputs (1F1B's last): nothing to free
            continue
        # the runner holds 1-element stand-ins (4 bytes, fp32) for what it keeps until the backwards ...
        peak = on["stats"]["peak_in_flight"]
        assert on["stats"]["peak_output_bytes"] <= 4 * peak < off["stats"]["peak_output_bytes"], (rank, key)
        # ... and every sent output's storage is gone before any backward runs: the send has let go of it
        assert on["alive_at_backward"] and max(on["alive_at_backward"]) == 0, (rank, key, on["alive_at_backward"])
        assert min(off["alive_at_backward"]) >= 1 and on["alive_at_end"] == off["alive_at_end"] == 0
    # and both agree with one process (losses on the last stage)
    if case[2] is None and not case[3]:
        ref_losses, ref_grads = reference(tiny_config(4), M)
        per_rank = {rank: {"pp": r[key]["pp"], "tp": 0, "dp": 0, "tp_size": 1, "losses": r[key]["on"]["losses"],
                           "grads": r[key]["on"]["grads"]} for rank, r in results.items()}
        check_against_reference(per_rank, ref_losses, ref_grads, M, 2)


def test_backward_from_a_deallocated_output():
    """What the runner does with a sent output: torch.autograd.backward refuses the grad of a freed output
    (shape check), backward_from runs it with the same grads, also with inputs= and a retained graph."""
    torch.manual_seed(0)
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    grad = torch.randn(4, 8)

    def graph():
        return torch.tanh(x @ w) + x  # the last op (an add) saves nothing: its output's storage is the output's

    out = graph()
    torch.autograd.backward(out, grad)
    want_w, want_x = w.grad.clone(), x.grad.clone()
    w.grad = x.grad = None
    out = graph()
    storage = weakref.ref(out.untyped_storage())
    assert deallocate_output(out) and out.numel() == 1 and storage() is None
    with pytest.raises(RuntimeError, match="shape"):
        torch.autograd.backward(out, grad, retain_graph=True)
    backward_from(out, grad, inputs=[x], retain_graph=True)  # ZB-H1 under ZeRO-3: input grads first ...
    assert w.grad is None and torch.equal(x.grad, want_x)
    backward_from(out, grad, inputs=[w])  # ... then the weight grads from the same graph
    assert torch.equal(w.grad, want_w)
    assert not deallocate_output(x) and x.numel() == 32  # a leaf (a chunk passing its input on): kept
    view = graph()[1:]
    assert not deallocate_output(view) and view.shape == (3, 8)  # a view: its base holds the storage anyway
