"""Shared pieces of the pipeline equivalence tests: a tiny model, data, a forward step, the single-process
oracle, and the check that compares a distributed run against it."""
import torch
import torch.distributed as dist

from dist_utils import rel_err
from megallama.config import ModelConfig
from megallama.model import build_model
from megallama.mpu import parallel_state as ps
from megallama.pipeline.no_pipelining import forward_backward_no_pipelining

SEQ, MBS, SEED = 16, 2, 1234


def tiny_config(num_layers=4, tied=False) -> ModelConfig:
    return ModelConfig(num_layers=num_layers, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                       num_query_groups=2, vocab_size=256, max_position_embeddings=64,
                       tie_word_embeddings=tied)


def make_batches(n, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, MBS, SEQ + 1), generator=g)
    return [{"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()} for x in ids]


def forward_step(data_iterator, model):
    """The training loop's contract: per-token losses on the last stage, hidden states elsewhere."""
    batch = next(data_iterator)
    out = model(batch["input_ids"], labels=batch["labels"])

    def loss_func(o):
        loss = o.float().mean()
        return loss, {"lm loss": loss.detach()}
    return out, loss_func


def fused_forward_step(data_iterator, model):
    """The training loop's own step: masked loss sum through the fused head + cross-entropy."""
    batch = next(data_iterator)
    mask = (batch["labels"] % 5 != 0).float()  # some tokens masked out
    out = model(batch["input_ids"], labels=batch["labels"], loss_mask=mask)

    def loss_func(loss_sum):
        loss = loss_sum / mask.sum().clamp_min(1.0)
        return loss, {"lm loss": loss.detach()}
    return out, loss_func


STEPS = {"per_token": forward_step, "fused": fused_forward_step}


def reference(cfg, num_microbatches, step="per_token"):
    """Single process, whole model: per-microbatch losses and every parameter's grad by HF name."""
    model = build_model(cfg, seed=SEED)
    losses = forward_backward_no_pipelining(STEPS[step], iter(make_batches(num_microbatches, cfg.vocab_size)),
                                            [model], num_microbatches, SEQ, MBS)
    return [float(d["lm loss"]) for d in losses], {n: p.grad.clone() for n, p in model.named_parameters()}


def finish_grads(chunks, sequence_parallel):
    """What the loop's DDP / SP hooks would do, done by hand: SP norm grads summed over tp, grads averaged
    over dp. (The pipeline's own sums come after, in allreduce_embedding_gradients.)"""
    params = [(n, p) for c in chunks for n, p in c.named_parameters()]
    if sequence_parallel and ps.get_tensor_model_parallel_world_size() > 1:
        for n, p in params:
            if n.endswith("norm.weight"):
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    dp = ps.get_data_parallel_world_size()
    if dp > 1:
        for _, p in params:
            dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
            p.grad /= dp


def collect(chunks, losses, runner):
    return {"pp": ps.get_pipeline_model_parallel_rank(), "tp": ps.get_tensor_model_parallel_rank(),
            "dp": ps.get_data_parallel_rank(), "tp_size": ps.get_tensor_model_parallel_world_size(),
            "losses": [float(d["lm loss"]) for d in losses],
            # numpy, not tensors: torch shares tensors across processes by fd, which dies with the rank
            "grads": [(n, p.grad.detach().cpu().numpy()) for c in chunks for n, p in c.named_parameters()
                      if p.grad is not None],
            "peak": getattr(runner, "stats", {}).get("peak_in_flight")}


def collect_pieces(ddps, losses, runner):
    """Grads as a DDP/ZeRO wrapper holds them: this rank's (dp-reduced, maybe sharded) piece of each param."""
    out = collect([], losses, runner)
    out["pieces"] = [(pc.name, tuple(pc.shape), pc.param_start, pc.param_end, pc.grad_view.detach().cpu().numpy())
                     for d in ddps for pc in d.optimizer_pieces()]
    return out


def shard_of(full, local, tp_rank, tp_size):
    if full.shape == local.shape:
        return full
    dim = next(d for d in range(full.dim()) if full.shape[d] != local.shape[d])
    return full.chunk(tp_size, dim=dim)[tp_rank]


def check_against_reference(results, ref_losses, ref_grads, num_microbatches, pp, tol=1e-5):
    """Losses of the last stage (per dp rank) and every local grad, against the oracle."""
    n_loss_ranks = 0
    for r in results.values():
        if r["pp"] == pp - 1:
            n_loss_ranks += 1
            want = ref_losses[r["dp"] * num_microbatches:(r["dp"] + 1) * num_microbatches]
            assert len(r["losses"]) == num_microbatches
            for got, exp in zip(r["losses"], want):
                assert abs(got - exp) <= tol * abs(exp), (got, exp)
        else:
            assert r["losses"] == []
        for name, g in r["grads"]:
            g = torch.from_numpy(g)
            key = "model.embed_tokens.weight" if name == "output_weight" else name
            ref = shard_of(ref_grads[key], g, r["tp"], r["tp_size"])
            err = rel_err(g, ref)
            assert err <= tol, f"pp rank {r['pp']} tp {r['tp']}: {name} grad rel err {err:.2e}"
        for name, shape, lo, hi, g in r.get("pieces", []):
            key = "model.embed_tokens.weight" if name == "output_weight" else name
            ref = shard_of(ref_grads[key], torch.empty(shape), r["tp"], r["tp_size"]).reshape(-1)[lo:hi]
            err = rel_err(torch.from_numpy(g), ref)
            assert err <= tol, f"pp rank {r['pp']} dp {r['dp']}: {name}[{lo}:{hi}] grad rel err {err:.2e}"
    assert n_loss_ranks >= 1
