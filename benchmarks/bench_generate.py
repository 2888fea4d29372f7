"""Decode speed of ``megallama.generation.generate`` (KV cache) against HF ``generate`` on the same weights.

    python benchmarks/bench_generate.py --model llama3_2_1b --batch-sizes 1,8 --prompt 128 --new 128
    python benchmarks/bench_generate.py --model llama3_2_1b --batch-sizes 8,32 --prompt 128 --new 128 --mixed

megallama runs twice: CUDA-graph decode (the default on one GPU) and eager decode (a ``KVCache`` step from Python).
``--mixed``: prompt lengths drawn from [prompt/2, prompt]; megallama's left-padded batch against the same prompts one
at a time (how prompts of different lengths ran before padding) and HF ``generate`` with left padding.

Random weights (speed does not depend on them), bf16 on one GPU, greedy, no stop token so every run makes exactly
``--new`` tokens; each timing is the median of ``--repeats`` runs after one warm-up. Prints tokens/s (batch x new
tokens over the whole call, prefill included). Token agreement is the CPU tests' job (fp32, equal to HF's greedy
tokens): random weights give near-flat logits whose bf16 argmax flips on rounding."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megallama.config import get_model_config  # noqa: E402
from megallama.generation import SamplingConfig, generate  # noqa: E402
from megallama.model import build_model  # noqa: E402


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3_2_1b")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mixed", action="store_true", help="prompts of different lengths (left-padded batches)")
    a = p.parse_args()
    cfg = get_model_config(a.model)
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16, seed=1).eval()
    hf = None
    try:
        import transformers
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "model"))
        from test_hf_parity import to_hf_config
        hc = to_hf_config(cfg)
        hc._attn_implementation = "sdpa"
        hf = transformers.LlamaForCausalLM(hc).to("cuda", torch.bfloat16).eval()
        hf.load_state_dict(model.state_dict(), strict=False)
        hf.tie_weights()
    except ImportError as e:
        print(f"HF baseline skipped: {e}")
    print(f"{a.model}, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}, prompt {a.prompt}"
          f"{' (mixed lengths)' if a.mixed else ''}, {a.new} new tokens, greedy")
    if a.mixed:
        return mixed(a, cfg, model, hf)
    print("| batch | megallama, CUDA graph tok/s | megallama, eager tok/s | HF generate tok/s | graph x HF | "
          "eager x HF |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for b in map(int, a.batch_sizes.split(",")):
        ids = torch.randint(0, cfg.vocab_size, (b, a.prompt), generator=torch.Generator().manual_seed(b))
        sc = SamplingConfig(max_new_tokens=a.new, temperature=0)
        t_graph, graph = timed(lambda: generate(model, ids.tolist(), sc, decode_mode="graph"), a.repeats)
        t_ours, _ = timed(lambda: generate(model, ids.tolist(), sc, decode_mode="eager"), a.repeats)
        row = f"| {b} | {b * a.new / t_graph:,.0f} | {b * a.new / t_ours:,.0f} |"
        if hf is not None:
            x = ids.cuda()
            with torch.no_grad():
                t_hf, _ = timed(lambda: hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.new,
                                                    min_new_tokens=a.new, do_sample=False, pad_token_id=0), a.repeats)
            row += f" {b * a.new / t_hf:,.0f} | {t_hf / t_graph:.2f} | {t_hf / t_ours:.2f} |"
        print(row, flush=True)


def mixed(a, cfg, model, hf):
    print("| batch | padded batch, graph tok/s | one prompt at a time, graph tok/s | HF generate, left-padded tok/s "
          "| padded x one at a time | padded x HF |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    sc = SamplingConfig(max_new_tokens=a.new, temperature=0)
    for b in map(int, a.batch_sizes.split(",")):
        g = torch.Generator().manual_seed(b)
        lengths = torch.randint(a.prompt // 2, a.prompt + 1, (b,), generator=g).tolist()
        prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
        t_pad, _ = timed(lambda: generate(model, prompts, sc, decode_mode="graph"), a.repeats)
        t_one, _ = timed(lambda: generate(model, prompts, sc, decode_mode="graph", batch_size=1), a.repeats)
        row = f"| {b} | {b * a.new / t_pad:,.0f} | {b * a.new / t_one:,.0f} |"
        if hf is not None:
            top = max(lengths)
            x = torch.tensor([[0] * (top - len(p)) + p for p in prompts], device="cuda")
            mask = (torch.arange(top) >= top - torch.tensor(lengths)[:, None]).long().cuda()
            with torch.no_grad():
                t_hf, _ = timed(lambda: hf.generate(x, attention_mask=mask, max_new_tokens=a.new,
                                                    min_new_tokens=a.new, do_sample=False, pad_token_id=0), a.repeats)
            row += f" {b * a.new / t_hf:,.0f} | {t_one / t_pad:.2f} | {t_hf / t_pad:.2f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
