"""Document-masked attention (--reset-attention-mask, --sft-packing) on one GPU: flash varlen per document (megallama
on CUDA) against the dense [b, s, s] mask through SDPA (the path before it, and the CPU twin), with plain causal
flash attention over the whole sample (no document masking) as the floor. In one run, same inputs:

1. attention alone, fwd+bwd, Llama 3 8B's heads (32 q, 8 kv, head 128), bf16;
2. a whole model's training step (fwd+bwd, bf16 weights): tokens/s and peak memory.

Documents: lengths drawn from an exponential with the given mean, cut at the sample end (as packed web text).

    python benchmarks/bench_document_attention.py [--seq 8192] [--mean-doc 1024] [--model llama3_2_1b]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megallama.model.llama as llama  # noqa: E402
from megallama.config import get_model_config  # noqa: E402
from megallama.model.attention import core_attention  # noqa: E402
from megallama.model.packed_attention import PackedDocuments, document_offsets, varlen_attention  # noqa: E402


def doc_ids(b, s, mean, g):
    ids = torch.zeros(b, s, dtype=torch.long)
    for i in range(b):
        at, d = 0, 0
        while at < s:
            n = max(1, int(torch.empty(1).exponential_(1.0 / mean, generator=g).item()))
            ids[i, at:at + n] = d
            at, d = at + n, d + 1
    return ids


def timed(fn, warmup=3, reps=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def attention_table(b, s, ids, hq=32, hkv=8, d=128):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, generator=g).cuda().bfloat16().requires_grad_() for h in (hq, hkv, hkv))
    dy = torch.randn(b, s, hq, d, generator=g).cuda().bfloat16()
    cu = document_offsets(ids)
    docs = PackedDocuments(ids, cu, int((cu[1:] - cu[:-1]).max()))

    def causal():
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).transpose(1, 2)
    impls = {"varlen (megallama, CUDA)": lambda: varlen_attention(q, k, v, docs),
             "dense mask + SDPA (before)": lambda: core_attention(q, k, v, document_ids=ids),
             "causal flash, no document mask": causal}
    ref = impls["dense mask + SDPA (before)"]().float()
    rows = []
    for name, fn in impls.items():
        out = fn()
        err = (torch.linalg.norm(out.float() - ref) / torch.linalg.norm(ref)).item()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        ms = timed(lambda: torch.autograd.grad(fn(), (q, k, v), dy))
        rows.append((name, ms, (torch.cuda.max_memory_allocated() - base) / 2**20, err))
    return rows


def model_table(name, b, s, ids, steps):
    cfg = get_model_config(name, max_position_embeddings=max(s, 8192))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g).cuda()
    real = llama.pack_documents
    rows = []
    for label, pack, docs in (("varlen (megallama, CUDA)", real, ids), ("dense mask + SDPA (before)",
                              lambda i, *a: i, ids), ("causal flash, no document mask", real, None)):
        llama.pack_documents = pack
        model = llama.build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=2)

        def step():
            loss = model(tokens[:, :-1], labels=tokens[:, 1:], document_ids=docs).float().mean()
            loss.backward()
            return loss.detach()
        torch.cuda.reset_peak_memory_stats()
        ms = timed(step, warmup=2, reps=steps)
        loss = step().item()
        rows.append((label, ms, b * s / ms * 1e3, torch.cuda.max_memory_allocated() / 2**30, loss))
        del model
        torch.cuda.empty_cache()
    llama.pack_documents = real
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mean-doc", type=int, default=1024)
    p.add_argument("--model", default="llama3_2_1b")
    p.add_argument("--model-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    ids = doc_ids(a.batch, a.seq, a.mean_doc, g).cuda()
    n_docs = int(document_offsets(ids).numel() - 1)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; batch {a.batch} x {a.seq} tokens, "
          f"{n_docs} documents (mean length {a.batch * a.seq / n_docs:.0f})")
    print("\nattention fwd+bwd, 32 q heads, 8 kv heads, head 128, bf16")
    print("| implementation | ms | x dense mask | extra MiB | err vs dense |\n| --- | ---: | ---: | ---: | ---: |")
    rows = attention_table(a.batch, a.seq, ids)
    dense = rows[1][1]
    for name, ms, mib, err in rows:
        print(f"| {name} | {ms:.3f} | {dense / ms:.2f}x | {mib:.0f} | {err:.1e} |")
    mids = doc_ids(a.model_batch, a.seq, a.mean_doc, g).cuda()
    print(f"\n{a.model} training step (fwd+bwd, bf16 weights), batch {a.model_batch} x {a.seq}")
    print("| attention | ms | tok/s | x dense mask | peak GiB | loss |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    rows = model_table(a.model, a.model_batch, a.seq, mids, a.steps)
    dense = rows[1][1]
    for name, ms, tps, gib, loss in rows:
        print(f"| {name} | {ms:.1f} | {tps:,.0f} | {dense / ms:.2f}x | {gib:.2f} | {loss:.4f} |")


if __name__ == "__main__":
    main()
