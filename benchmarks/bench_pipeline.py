"""Pipeline schedules on real devices: equivalence with one device (fp32), then the measured bubble.

    torchrun --nproc_per_node 4 benchmarks/bench_pipeline.py                 # NCCL on 4 GPUs
    torchrun --nproc_per_node 4 benchmarks/bench_pipeline.py --device cpu --hidden 128 --seq 64 --layers 8
    torchrun --nproc_per_node 2 benchmarks/bench_pipeline.py --schedules interleaved --num-layers 6 \
        --pipeline-model-parallel-layout 'Et|ttt|t|tL' --microbatch-group-size-per-virtual-pipeline-stage 4

Check: every schedule's losses and local grads against the whole model run on one device (max relative error
over ranks). Bubble: each op timed with the device synchronised around it (``time_ops``); bubble = 1 - busy /
(p x makespan) over all ranks, next to the theory and to the simulator replaying the schedule with the
measured mean op times of each model part (an uneven layout's parts differ); "from untimed step" divides by the
step time of a run without the per-op syncs. The training script's --pipeline-model-parallel-layout (runs the
schedules whose stages per rank it fits) and --microbatch-group-size-per-virtual-pipeline-stage (interleaved; the
check then runs 2 N microbatches) apply to both parts.
The per-op syncs wait for the compute stream only (a receive posted ahead is waited for where its op needs it).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megallama.config import ModelConfig  # noqa: E402
from megallama.errors import ConfigError  # noqa: E402
from megallama.initialize import initialize_distributed  # noqa: E402
from megallama.model import build_model  # noqa: E402
from megallama.mpu import parallel_state as ps  # noqa: E402
from megallama.pipeline import allreduce_embedding_gradients, build_model_chunks, get_forward_backward_func  # noqa
from megallama.pipeline.no_pipelining import forward_backward_no_pipelining  # noqa: E402
from megallama.pipeline.layout import FLAG as LAYOUT_FLAG  # noqa: E402
from megallama.pipeline.layout import parse_layout  # noqa: E402
from megallama.pipeline.schedules import build_schedule, normalize_schedule_name  # noqa: E402
from megallama.pipeline.simulate import simulate, theoretical_bubble_fraction  # noqa: E402


def make_batches(n, vocab, mbs, seq, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, mbs, seq + 1), generator=g)
    return [{"input_ids": x[:, :-1].to(device), "labels": x[:, 1:].to(device)} for x in ids]


def step(data_iterator, model):
    b = next(data_iterator)
    out = model(b["input_ids"], labels=b["labels"])

    def loss_func(o):
        loss = o.float().mean()
        return loss, {"lm loss": loss.detach()}
    return out, loss_func


def layout_split(args, p, schedules):
    """(decoder layers per part or None, the schedules the layout's stages per rank fit)."""
    if args.layout is None:
        return None, schedules
    counts = parse_layout(args.layout, p, args.layers)
    v = len(counts) // p
    fit = [n for n in schedules if (normalize_schedule_name(n) == "interleaved") == (v > 1)]
    if dist.get_rank() == 0:
        print(f"layout {args.layout}: parts {counts}; runs {', '.join(fit) or 'none of ' + ','.join(schedules)}",
              flush=True)
    return counts, fit


def group(args, name):
    return args.group_size if normalize_schedule_name(name) == "interleaved" else None


def rel(x, ref):
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def check(args, device, p, schedules, counts=None):
    cfg = ModelConfig(num_layers=args.layers if counts else 2 * p, hidden_size=128, ffn_hidden_size=344,
                      num_attention_heads=8, num_query_groups=4, vocab_size=512, max_position_embeddings=256,
                      tie_word_embeddings=True)
    M, mbs, seq = 2 * (args.group_size or p), 2, 64
    data = make_batches(M, cfg.vocab_size, mbs, seq, device)
    ref = build_model(cfg, device=device, seed=7)
    ref_losses = [float(d["lm loss"]) for d in forward_backward_no_pipelining(step, iter(data), [ref], M, seq, mbs)]
    ref_grads = {n: q.grad for n, q in ref.named_parameters()}
    for name in schedules:
        chunks = build_model_chunks(cfg, device=device, seed=7, schedule=name, num_layers_per_virtual_stage=1,
                                    layer_counts=counts)
        fb = get_forward_backward_func(p, name, microbatch_group_size=group(args, name))
        losses = fb(step, iter(data), chunks, M, seq, mbs)
        allreduce_embedding_gradients(chunks)
        g_err = max(rel(q.grad, ref_grads["model.embed_tokens.weight" if n == "output_weight" else n])
                    for c in chunks for n, q in c.named_parameters())
        l_err = max((abs(float(d["lm loss"]) - r) / abs(r) for d, r in zip(losses, ref_losses)), default=0.0)
        t = torch.tensor([g_err, l_err, float(len(losses))], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0:
            ok = t[0] <= 1e-5 and t[1] <= 1e-5 and int(t[2]) == M
            print(f"check {name:12s} max grad rel err {t[0]:.2e}  max loss rel err {t[1]:.2e}  "
                  f"{'OK' if ok else 'FAIL'}", flush=True)


def bubble(args, device, p, schedules, counts=None):
    L = args.layers
    cfg = ModelConfig(num_layers=L, hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_attention_heads=args.heads,
                      num_query_groups=args.kv_heads, vocab_size=args.vocab, max_position_embeddings=args.seq)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    M, mbs, seq = args.microbatches, args.mbs, args.seq
    data = make_batches(M, cfg.vocab_size, mbs, seq, device, seed=1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name in schedules:
        chunks = build_model_chunks(cfg, device=device, dtype=dtype, seed=1, schedule=name,
                                    num_layers_per_virtual_stage=L // (2 * p), layer_counts=counts)
        v = len(chunks) if name == "interleaved" else 1
        timed = get_forward_backward_func(p, name, time_ops=True, microbatch_group_size=group(args, name))
        if dist.get_rank() == 0:
            print(f"running {name}", flush=True)
        plain = get_forward_backward_func(p, name, microbatch_group_size=group(args, name))
        sched = build_schedule(name, p, M, v, group(args, name))
        fracs, costs, part_costs, steps, busy = [], [], [], [], []
        for it in range(args.iters + 1):
            for c in chunks:
                for q in c.parameters():
                    q.grad = None
            dist.barrier()
            sync()
            timed(step, iter(data), chunks, M, seq, mbs)
            ivs = [None] * dist.get_world_size()
            dist.all_gather_object(ivs, timed.stats["intervals"])
            if it == 0:
                continue  # warm-up
            ops = [iv for r in ivs for iv in r]
            makespan = max(iv[4] for iv in ops) - min(iv[3] for iv in ops)
            busy.append(sum(iv[4] - iv[3] for iv in ops) / len(ivs))  # per stage
            fracs.append(1 - busy[-1] / makespan)
            costs.append({k: statistics.mean([iv[4] - iv[3] for iv in ops if iv[0] == k] or [0.0]) for k in "FBW"})
            by_part = [[(iv[0], iv[4] - iv[3]) for r, rank_ivs in enumerate(ivs) for iv in rank_ivs
                        if sched.part_of(r, iv[2]) == k] for k in range(sched.num_parts)]
            part_costs.append([{k: statistics.mean([d for kind, d in part if kind == k] or [0.0]) for k in "FBW"}
                               for part in by_part])
            dist.barrier()
            sync()
            t0 = time.perf_counter()
            plain(step, iter(data), chunks, M, seq, mbs)
            sync()
            dist.barrier()
            steps.append(time.perf_counter() - t0)
        if dist.get_rank() == 0:
            c = {k: statistics.mean(x[k] for x in costs) for k in "FBW"}
            per_part = [{k: statistics.mean(run[j][k] for run in part_costs) for k in "FBW"}
                        for j in range(sched.num_parts)]  # each part's mean op times over the timed runs
            sim = simulate(sched, part_costs=[{"F": q["F"], "B": q["B"] + q["W"], "W": q["W"]}
                                              for q in per_part]).bubble_fraction()
            theory = theoretical_bubble_fraction(name, p, M, v)
            tok = M * mbs * seq / min(steps)
            from_step = 1 - statistics.mean(busy) / min(steps)
            print(f"bubble {name:12s} measured {min(fracs):.4f} (median {statistics.median(fracs):.4f}, "
                  f"from untimed step {from_step:.4f})  theory {theory:.4f}  replay-with-measured-op-times {sim:.4f}  "
                  f"op ms F {c['F'] * 1e3:.2f} B {c['B'] * 1e3:.2f} W {c['W'] * 1e3:.2f}  "
                  f"step {min(steps) * 1e3:.1f} ms  {tok:,.0f} tok/s", flush=True)
        del chunks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--schedules", default="1f1b,gpipe,interleaved,chimera,zb-h1")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--layers", "--num-layers", dest="layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048, help="small, so the head does not unbalance the last stage")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument(LAYOUT_FLAG, dest="layout", default=None,
                    help="the training script's layout, e.g. 'Ett|t|tt|tttL' (its layers = --layers)")
    ap.add_argument("--microbatch-group-size-per-virtual-pipeline-stage", dest="group_size", type=int, default=None,
                    help="interleaved: N microbatches per virtual stage group (default: the stages)")
    ap.add_argument("--skip-check", action="store_true", help="time only, without the fp32 check against one device")
    ap.add_argument("--hang-dump", type=float, default=0, help="dump every thread's stack after this many seconds")
    args = ap.parse_args()
    if args.hang_dump:
        import faulthandler
        faulthandler.dump_traceback_later(args.hang_dump, exit=True)
    device = initialize_distributed(device=args.device)
    p = dist.get_world_size()
    ps.initialize_model_parallel(1, p)
    try:
        counts, schedules = layout_split(args, p, args.schedules.split(","))
    except ConfigError as e:
        if dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        dist.destroy_process_group()
        sys.exit(2)
    if dist.get_rank() == 0:
        print(f"{p} stages on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} "
              f"({dist.get_backend()}), torch {torch.__version__}", flush=True)
    if not args.skip_check:
        check(args, device, p, schedules, counts)
    bubble(args, device, p, schedules, counts)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
