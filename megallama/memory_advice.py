"""What to change so that a layout fits, and the human-readable memory table.

Every recommendation is re-estimated (``estimate_requirements`` with one change), so the numbers it quotes are the
estimator's own, not rules of thumb.
"""
from __future__ import annotations

from typing import List


# what stays when the layout is re-chosen on more GPUs: the run's model, optimizer and features (not its layout)
_SAME_RUN = ("num_experts", "moe_topk", "lora_rank", "lora_targets", "mixed_precision_mode", "fused_kernels", "head",
             "optimizer", "p_bytes", "g_bytes", "k_bytes", "device", "moe_ffn_hidden_size",
             "moe_shared_expert_intermediate_size", "moe_expert_capacity_factor", "moe_pad_expert_input_to_capacity",
             "fp8_format")


def _try(args: dict, **change) -> dict:
    from megallama.memory import estimate_requirements
    return estimate_requirements(**{**args, **change, "recommend": False})


def _fmt(desc: str, est: dict) -> str:
    state = "fits" if est["fits"] else f"still {-est['headroom_gb']:.1f} GiB over"
    return f"{desc}: {est['memory_per_gpu_gb']:.1f} GiB per GPU ({state})"


def _candidates(res: dict, args: dict, cfg) -> List[tuple]:
    lay = res["layout"]
    tp, pp, cp, world = lay["tp"], lay["pp"], lay["cp"], lay["world_size"]
    out = []
    if lay["recompute"] == "none":
        out.append(("--recompute-granularity selective", {"recompute": "selective"}))
    if lay["recompute"] != "full":
        out.append(("--recompute-granularity full", {"recompute": "full"}))
    b = lay["micro_batch_size"]
    while b > 1:
        b //= 2
        out.append((f"--micro-batch-size {b} (same global batch, more microbatches)",
                    {"batch_size": b, "num_microbatches": lay["num_microbatches"] * lay["micro_batch_size"] // b}))
    if lay["dp"] * cp > 1:
        for z in range(lay["zero_stage"] + 1, 4):
            out.append((f"--zero-stage {z}", {"zero_stage": z}))
    if tp > 1 and not lay["sequence_parallel"]:
        out.append(("--sequence-parallel", {"sequence_parallel": True}))
    t = tp * 2
    while t <= min(8, world // (pp * cp)) and world % (t * pp * cp) == 0:
        if cfg.num_query_groups % t == 0 and cfg.num_attention_heads % t == 0 and cfg.vocab_size % t == 0:
            out.append((f"--tensor-model-parallel-size {t} --sequence-parallel", {"tp": t, "sequence_parallel": True}))
        t *= 2
    p = pp * 2
    while p <= cfg.num_layers and world % (tp * p * cp) == 0:
        out.append((f"--pipeline-model-parallel-size {p}", {"pp": p, "pipeline_layer_counts": None}))
        p *= 2
    if args.get("head") == "unfused":
        out.append(("the fused output layer + cross-entropy (chunked logits)", {"head": "fused"}))
    return out


def recommendations(res: dict, args: dict, cfg) -> List[str]:
    lay = res["layout"]
    notes = []
    if lay["zero_stage"] >= 1 and lay["dp"] * lay["cp"] == 1:
        notes.append(f"ZeRO-{lay['zero_stage']} shards over data-parallel ranks, and dp = 1 here: it saves nothing "
                     "(use fewer tp/pp ranks or more GPUs to get dp > 1)")
    if res["fits"]:
        b, best = lay["micro_batch_size"], None
        for nb in (2 * lay["micro_batch_size"], 4 * lay["micro_batch_size"], 8 * lay["micro_batch_size"]):
            try:
                est = _try(args, batch_size=nb, num_microbatches=max(1, lay["num_microbatches"] * b // nb))
            except ValueError:
                break
            if not est["fits"]:
                break
            best = (nb, est)
        msg = f"fits with {res['headroom_gb']:.1f} GiB to spare on a {res['gpu_memory_gb']:.0f} GiB GPU"
        if best:
            msg += f"; --micro-batch-size {best[0]} would still fit ({best[1]['memory_per_gpu_gb']:.1f} GiB)"
        notes.append(msg)
        if lay["recompute"] != "none":
            lower = "selective" if lay["recompute"] == "full" else "none"
            est = _try(args, recompute=lower)
            if est["fits"]:
                notes.append(_fmt(f"--recompute-granularity {lower} (less recomputation) also fits", est))
        return notes
    over = -res["headroom_gb"]
    notes.append(f"needs {res['memory_per_gpu_gb']:.1f} GiB per GPU, {over:.1f} GiB more than the "
                 f"{res['gpu_memory_gb']:.0f} GiB available")
    tried = []
    for desc, change in _candidates(res, args, cfg):
        try:
            tried.append((desc, _try(args, **change)))
        except ValueError:
            continue
    fitting = [t for t in tried if t[1]["fits"]]
    for desc, est in (fitting or sorted(tried, key=lambda t: t[1]["memory_per_gpu_gb"])[:3]):
        notes.append(_fmt(desc, est))
    if not fitting:
        from megallama.autoconfig import _ep, choose_layout
        world = lay["world_size"]
        for mult in (1, 2, 4, 8, 16):
            model = args["model_variant"] if args.get("model_config") is None else args["model_config"]
            plan = choose_layout(model, world * mult, gpu_memory_gb=res["gpu_memory_gb"],
                                 sequence_length=lay["sequence_length"],
                                 micro_batch_size=lay["micro_batch_size"], precision=lay["precision"],
                                 strategy=lay["strategy"], gpus_per_node=min(8, world * mult), explain=False,
                                 **{k: args[k] for k in _SAME_RUN if args.get(k) is not None})
            if plan is not None:
                desc = (f"{'on these ' if mult == 1 else f'with {world * mult} '}GPUs use tp {plan['tp']} pp "
                        f"{plan['pp']} dp {plan['dp']}{_ep(plan)} ZeRO-{plan['zero_stage']} recompute "
                        f"{plan['recompute']} micro-batch {plan['micro_batch_size']}")
                notes.append(f"{desc}: {plan['estimate']['memory_per_gpu_gb']:.1f} GiB per GPU (fits)")
                break
        else:
            notes.append(f"no layout on up to {16 * world} GPUs fits; shorten the sequence or use a smaller model")
    return notes


def _ep_part(lay: dict) -> str:
    """Expert parallelism splits the experts over ep of the dp x cp ranks: not a factor of the world size."""
    return f", experts over ep {lay['ep']}" if lay.get("ep", 1) > 1 else ""


def format_table(res: dict) -> str:
    """The estimate as a table: one row per category, then the totals and the recommendations."""
    lay = res["layout"]
    head = (f"{res['model_variant']}: {res['num_params'] / 1e9:.2f}B params, {res['params_per_gpu'] / 1e6:.1f}M on the "
            f"busiest GPU (pipeline stage {res['worst_stage']})\n"
            f"layout: {lay['world_size']} GPU{'s' * (lay['world_size'] != 1)} = tp {lay['tp']} x pp {lay['pp']} "
            f"x dp {lay['dp']} x cp {lay['cp']}"
            f"{' (+sp)' if lay['sequence_parallel'] else ''}{_ep_part(lay)}, ZeRO-{lay['zero_stage']}, micro-batch "
            f"{lay['micro_batch_size']} x {lay['num_microbatches']} microbatches (global {lay['global_batch_size']}), "
            f"seq {lay['sequence_length']}, recompute {lay['recompute']}, {lay['precision']} "
            f"({lay['mixed_precision_mode']}{', fp8 ' + lay['fp8_format'] if lay.get('fp8_format') else ''}), "
            f"{lay['strategy']}")
    moe = lay.get("moe")
    if moe:
        head += (f", experts of FFN {moe['ffn_hidden_size']} computing {moe['expert_rows']} rows a micro-batch"
                 + (f" + a shared expert of FFN {moe['shared_expert_intermediate_size']}"
                    if moe["shared_expert_intermediate_size"] else ""))
    if lay["pp"] > 1:
        head += f", {lay['pipeline_schedule']} holding {lay['in_flight']} in flight"
        if lay.get("wgrad_queued"):
            head += f" + {lay['wgrad_queued']} awaiting W"
    rows = [("weights", "parameters on this GPU"),
            ("grads", "gradient buffer or its shard (fp32; bf16 with --grad-reduce-in-bf16)"),
            ("optimizer", "Adam m, v or SGD momentum (+ fp32 master for bf16 params)"),
            ("activations", "saved for backward: layers, embedding, final norm"),
            ("logits", "output layer + cross-entropy working set"),
            ("weight_casts", "autocast's bf16 weight copies held for backward"),
            ("buffers", "ZeRO staging / gathered units, optimizer temporaries, workspaces"),
            ("overhead", "CUDA context, NCCL, allocator fragmentation")]
    bd = res["breakdown_gb"]
    lines = [head, "", f"{'category':14s} {'GiB':>9s}  what"]
    lines += [f"{name:14s} {bd[name]:9.2f}  {what}" for name, what in rows]
    lines.append(f"{'-' * 14} {'-' * 9}")
    lines.append(f"{'total':14s} {res['memory_per_gpu_gb']:9.2f}  per GPU (peak allocated "
                 f"{res['peak_allocated_gb']:.2f} GiB in the {res['peak_phase']} phase)")
    verdict = "fits" if res["fits"] else "does NOT fit"
    lines.append(f"{'GPU memory':14s} {res['gpu_memory_gb']:9.2f}  {verdict}")
    if res.get("host_pinned_gb_per_gpu"):
        lines.append(f"{'host (pinned)':14s} {res['host_pinned_gb_per_gpu']:9.2f}  per GPU process: --async-save's "
                     "page-locked copy of its checkpoint, kept between saves")
    if res["recommendations"]:
        lines.append("")
        lines += [f"* {r}" for r in res["recommendations"]]
    return "\n".join(lines)
