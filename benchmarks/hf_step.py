"""One benchmark worker for the HF baseline: ``LlamaForCausalLM`` (transformers), fp32 params + bf16 autocast,
fused AdamW, SDPA attention, optionally torch.compile or Liger kernels. Prints one JSON line.

Same shape, data policy and timing as ``benchmarks/megallama_step.py`` so ``tools/benchmark.py`` can take ratios.
"""
import argparse
import json
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config-json", required=True)
    p.add_argument("--micro-batch-size", type=int, required=True)
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--mode", choices=["eager", "compile", "liger"], default="compile")
    a = p.parse_args()
    import transformers
    cfg = json.loads(a.config_json)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_query_groups"], max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg["norm_eps"], tie_word_embeddings=cfg["tie_word_embeddings"], rope_theta=cfg["rope_theta"])
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    if a.mode == "liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()
    model = transformers.LlamaForCausalLM(hf_cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if a.mode == "compile":
        model = torch.compile(model)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (a.micro_batch_size, a.seq_length), device="cuda", generator=g)
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
        losses.append(float(out.loss))
    step = sorted(times)[len(times) // 2]
    print(json.dumps({"impl": f"hf+{a.mode}", "step_time_s": step,
                      "tokens_per_s": a.micro_batch_size * a.seq_length / step,
                      "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "final_loss": losses[-1]}))


if __name__ == "__main__":
    main()
