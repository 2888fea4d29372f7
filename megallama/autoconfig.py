"""Choose tp / pp / dp, the ZeRO stage, recompute and the micro-batch for a model, a GPU count and GPU memory.

Every candidate layout is priced by ``memory.estimate_requirements``; among those that fit, the one with the best
modelled throughput wins (deterministically: ties go to less parallelism). The throughput model is deliberately
simple and stated: pipeline bubble (p-1)/(m+p-1) and stage balance (the slowest stage, the output layer counted
by its matmul size, sets the pace), recompute costs 1/3 of a step (full) or 3% (selective),
tensor parallelism loses 4% per doubling and may not leave a node, ZeRO-3 loses 10% to its extra all-gathers,
micro-batches under 4096 tokens lose GPU efficiency. The context-parallel size is the user's (fixed, not
searched). MoE models also search expert parallelism (ep dividing the experts and dp x cp, as the grid requires:
expert groups are carved out of dp x cp, so ep may exceed dp at cp > 1): the estimate shards the experts and their
states over it, and its all-to-all (``A2A_COST``) is charged per MoE layer share. ``choose_layout`` returns None
when nothing fits, and ``explain`` says why (model states alone: 18 bytes per trained parameter with bf16 params,
fp32 grads, masters and Adam; a frozen LoRA base keeps its 2 bytes of weights only).
"""
from __future__ import annotations

import math
from typing import List, Optional, Union

from megallama.config import ModelConfig, get_model_config
from megallama.errors import ConfigError
from megallama.memory import GiB, estimate_requirements, model_split, precision_bytes, stage_layers
from megallama.memory_states import num_moe_layers
from megallama.pipeline.partition import costs_from_config
from megallama.pipeline.simulate import theoretical_bubble_fraction

RECOMPUTE_COST = {"none": 0.0, "selective": 0.03, "full": 1 / 3}
MOE_SIZES = ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_shared_expert_gate")  # change Ψ
STATE_BYTES = ("p_bytes", "g_bytes", "k_bytes")  # estimator overrides of (p, g, K): --optimizer sgd, bf16 grads
ZERO_EFF = {0: 1.0, 1: 1.0, 2: 0.99, 3: 0.90}
# Expert parallelism's all-to-all (dispatch + combine, forward and backward): the share (ep-1)/ep of the routed
# tokens that leave the rank costs this fraction of a step (all layers MoE), over NVLink / across nodes.
A2A_COST = {"node": 0.10, "network": 0.30}
TP_SIZES = (1, 2, 4, 8)


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def stage_balance(cfg: ModelConfig, pp: int) -> float:
    """Mean over slowest stage work, with the pipeline partitioner's per-token costs (embedding on the first stage,
    output layer and softmax on the last, in decoder-layer units)."""
    if pp == 1:
        return 1.0
    c = costs_from_config(cfg)
    work = [n * c.layer for n in stage_layers(cfg, pp)]
    work[0] += c.embedding
    work[-1] += c.head
    return sum(work) / pp / max(work)


def a2a_cost(ep: int, moe_share: float, span_gpus: int, gpus_per_node: int) -> float:
    """Fraction of a step added by ep's all-to-all: ``A2A_COST`` x (ep-1)/ep x the share of MoE layers; the
    network rate once the expert group's ``span_gpus`` (tp x ep consecutive ranks) leave a node."""
    if ep <= 1:
        return 0.0
    return A2A_COST["node" if span_gpus <= gpus_per_node else "network"] * (ep - 1) / ep * moe_share


def throughput_score(tp: int, pp: int, dp: int, zero: int, recompute: str, micro_batch: int, seq: int,
                     num_microbatches: int, balance: float = 1.0, schedule: str = "1f1b",
                     a2a: float = 0.0) -> float:
    """Relative tokens/s per GPU of a layout (1.0 = ideal); only comparisons between layouts mean anything.
    ``a2a``: expert parallelism's all-to-all as a fraction of a step (``a2a_cost``)."""
    bubble = theoretical_bubble_fraction(schedule, pp, num_microbatches) if pp > 1 else 0.0
    tp_eff = 1.0 - 0.04 * math.log2(tp)
    tokens = micro_batch * seq
    mb_eff = min(1.0, 0.85 + 0.05 * math.log2(max(tokens, 256) / 512)) if tokens < 4096 else 1.0
    return (1 - bubble) * balance * tp_eff * ZERO_EFF[zero if dp > 1 else 0] * mb_eff / \
        (1 + RECOMPUTE_COST[recompute] + a2a)


def vocab_config(cfg: ModelConfig, tp: int, tokenizer_vocab: Optional[int], multiple: int = 1) -> ModelConfig:
    """The model as the run builds it at this tp: with ``tokenizer_vocab`` the embedding follows the tokenizer,
    padded to a multiple of tp x ``multiple`` (--make-vocab-size-divisible-by): build_data resizes the model by it.
    Padded even when the model's own vocabulary is the tokenizer's, as Megatron pads every tokenizer's."""
    if not tokenizer_vocab:
        return cfg
    step = tp * max(1, multiple)
    padded = -(-tokenizer_vocab // step) * step
    return cfg if padded == cfg.vocab_size else cfg.replace(vocab_size=padded)


def _expert_sizes(cfg: ModelConfig, strategy: str, dp_cp: int) -> List[int]:
    """ep values to try: 1 for a dense model (or a strategy that builds no experts); else every ep dividing both
    the experts and ``dp_cp`` = dp x cp, the ranks expert groups are carved from (parallel_state.validate_grid;
    strategies.derive_strategy_flags)."""
    if not cfg.num_experts or strategy not in ("moe", "hybrid"):
        return [1]
    return [ep for ep in _divisors(dp_cp) if cfg.num_experts % ep == 0]


def context_parallel_tps(cfg: ModelConfig, cp: int, seq: int, cp_comm_type: str = "p2p",
                         hierarchical_sizes=None) -> tuple:
    """The tp values training's context-parallel check (argument_checks.check_context_parallel: the zig-zag split,
    the a2a heads per tp rank, the a2a+p2p sizes) accepts at this cp, so no plan is printed that the run refuses;
    when it accepts none, its error at tp 1 (the user's cp or flags are at fault, not the search)."""
    if cp == 1:
        return TP_SIZES
    from types import SimpleNamespace
    from megallama.argument_checks import check_context_parallel
    ok, first = [], None
    for tp in TP_SIZES:
        try:
            check_context_parallel(SimpleNamespace(context_parallel_size=cp, tensor_model_parallel_size=tp,
                                                   seq_length=seq, cp_comm_type=cp_comm_type, model_config=cfg,
                                                   hierarchical_context_parallel_sizes=hierarchical_sizes))
            ok.append(tp)
        except ConfigError as e:
            first = first or e
    if not ok:
        raise first
    return tuple(ok)


def _candidates(cfg: ModelConfig, world: int, gpus_per_node: int, micro_batches, zero_stages, recomputes,
                vocab=vocab_config, strategy: str = "standard", cp: int = 1, tps=TP_SIZES):
    """(tp, pp, dp, ep, zero, recompute, micro-batch) to price at the fixed ``cp``; ``tps``: the tp values cp's
    rules allow (``context_parallel_tps``)."""
    for tp in tps:
        if tp > gpus_per_node or world % (tp * cp) or any(n % tp for n in (
                cfg.num_attention_heads, cfg.num_query_groups, vocab(tp).vocab_size, cfg.ffn_hidden_size)):
            continue
        for pp in _divisors(world // (tp * cp)):
            if pp > cfg.num_layers:
                break
            dp = world // (tp * pp * cp)
            for ep in _expert_sizes(cfg, strategy, dp * cp):
                for zero in zero_stages:
                    if zero > 0 and dp * cp == 1:  # ZeRO shards over dp x cp
                        continue
                    for rec in recomputes:
                        for mb in micro_batches:
                            yield tp, pp, dp, ep, zero, rec, mb


def choose_layout(model: Union[str, ModelConfig], num_gpus: int, gpu_memory_gb: float = 80.0,
                  sequence_length: Optional[int] = None, micro_batch_size: Optional[int] = None,
                  global_batch_size: Optional[int] = None, precision: str = "bf16", strategy: str = "standard",
                  gpus_per_node: int = 8, zero_stages=(0, 1, 2, 3), safety_margin: float = 0.05,
                  explain: bool = True, recomputes=("none", "selective", "full"), tokenizer_vocab: Optional[int] = None,
                  vocab_multiple: int = 1, context_parallel_size: int = 1, **estimate_kw) -> Optional[dict]:
    """The best layout that fits, as a dict (tp, pp, dp, cp, ep, zero_stage, recompute, micro_batch_size,
    num_microbatches, sequence_parallel, score, a2a, estimate, explanation), or None if none does. ep > 1 only
    for a MoE model (strategy moe / hybrid, the experts in ``model``); 'a2a' is its scored all-to-all share.

    ``micro_batch_size`` fixes the micro-batch (else 1..32 are tried); ``global_batch_size`` fixes the number of
    microbatches (else 4 per pipeline stage, as the seed advises); ``zero_stages`` and ``recomputes`` limit the
    search to what the user fixed; ``tokenizer_vocab``: the embedding follows a tokenizer (``vocab_config``);
    ``pipeline_schedule`` in ``estimate_kw`` prices that schedule; ``context_parallel_size`` is kept as given
    (checked with ``cp_comm_type`` / ``hierarchical_context_parallel_sizes`` of ``estimate_kw``, as training checks
    them). A layout fits when its estimate leaves ``safety_margin`` of the GPU free. With ``explain`` the
    reasoning is in plan['explanation'] (printed when nothing fits)."""
    cfg = model if isinstance(model, ModelConfig) else get_model_config(model)
    if num_gpus < 1:
        raise ConfigError(f"number of GPUs must be positive, got {num_gpus}")
    seq = sequence_length or min(cfg.max_position_embeddings, 2048)
    cp = context_parallel_size
    tps = context_parallel_tps(cfg, cp, seq, estimate_kw.get("cp_comm_type") or "p2p",
                               estimate_kw.get("hierarchical_context_parallel_sizes"))
    mbs = [micro_batch_size] if micro_batch_size else [1, 2, 4, 8, 16, 32]
    nodes = max(1, num_gpus // gpus_per_node) if num_gpus % gpus_per_node == 0 else 1
    per_node = num_gpus // nodes
    rows, schedule = [], estimate_kw.get("pipeline_schedule", "1f1b")
    vocab = lambda tp: vocab_config(cfg, tp, tokenizer_vocab, vocab_multiple)  # noqa: E731
    layouts = _candidates(cfg, num_gpus, gpus_per_node, mbs, zero_stages, recomputes, vocab, strategy, cp, tps)
    moe_share = num_moe_layers(cfg) / cfg.num_layers if cfg.num_experts else 0.0
    for tp, pp, dp, ep, zero, rec, mb in layouts:
        if global_batch_size is not None:
            if global_batch_size % (mb * dp):
                continue
            m = global_batch_size // (mb * dp)
        else:
            m = 1 if pp == 1 else 4 * pp
        try:
            est = estimate_requirements(model_config=vocab(tp), model_variant=cfg.name, batch_size=mb,
                                        sequence_length=seq, num_gpus=per_node, num_nodes=nodes, tp=tp, pp=pp,
                                        cp=cp, ep=ep, zero_stage=zero, recompute=rec, precision=precision,
                                        strategy=strategy, gpu_memory_gb=gpu_memory_gb, num_microbatches=m,
                                        sequence_parallel=tp > 1, recommend=False, **estimate_kw)
        except ConfigError:
            continue
        a2a = a2a_cost(ep, moe_share, tp * ep, gpus_per_node)
        # ZeRO's efficiency follows the ranks it shards over (dp x cp); the fixed cp costs every layout alike
        score = throughput_score(tp, pp, dp * cp, zero, rec, mb, seq, m, stage_balance(cfg, pp), schedule, a2a)
        rows.append({"tp": tp, "pp": pp, "dp": dp, "cp": cp, "ep": ep, "zero_stage": zero, "recompute": rec,
                     "micro_batch_size": mb, "num_microbatches": m, "sequence_parallel": tp > 1, "score": score,
                     "a2a": a2a, "estimate": est})
    cap = gpu_memory_gb * (1 - safety_margin)
    for r in rows:
        r["fits"] = r["estimate"]["memory_per_gpu_gb"] <= cap
    fitting = [r for r in rows if r["fits"]]
    # best score; ties: less tp, less pp, less ep, lower ZeRO, less recompute, larger micro-batch
    order = {"none": 0, "selective": 1, "full": 2}
    key = lambda r: (-round(r["score"], 6), r["tp"], r["pp"], r["ep"], r["zero_stage"],  # noqa: E731
                     order[r["recompute"]], -r["micro_batch_size"])
    fitting.sort(key=key)
    plan = fitting[0] if fitting else None
    if explain:
        text = explanation(vocab(plan["tp"] if plan else 1), num_gpus, gpu_memory_gb, seq, precision, plan, rows,
                           strategy, estimate_kw.get("mixed_precision_mode", "params"), estimate_kw.get("lora_rank", 8),
                           estimate_kw.get("lora_targets", ("q_proj", "k_proj", "v_proj", "o_proj")),
                           {k: estimate_kw[k] for k in MOE_SIZES if estimate_kw.get(k)},
                           {k: estimate_kw[k] for k in STATE_BYTES if estimate_kw.get(k) is not None})
        if plan is None and rows:
            text += "\n" + _more_gpus(cfg, num_gpus, gpu_memory_gb, seq, micro_batch_size, precision, strategy,
                                      gpus_per_node, safety_margin, dict(estimate_kw, tokenizer_vocab=tokenizer_vocab,
                                                                         vocab_multiple=vocab_multiple,
                                                                         context_parallel_size=cp))
        if plan is not None:
            plan["explanation"] = text
        else:
            print(text)
    return plan


def model_states_line(cfg: ModelConfig, num_gpus: int, precision: str, strategy: str = "standard",
                      mode: str = "params", lora_rank: int = 8,
                      lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), moe_sizes=None,
                      state_bytes=None) -> str:
    """The estimator's bytes per parameter for this strategy (a frozen base keeps weights only) and the model
    states per GPU when fully sharded (ZeRO-3 over every GPU). ``moe_sizes``: ``MOE_SIZES`` given;
    ``state_bytes``: ``STATE_BYTES`` given (SGD's K, --grad-reduce-in-bf16's g), as the estimate prices them."""
    p, g, k = precision_bytes(precision, mode)
    over = state_bytes or {}
    p, g, k = over.get("p_bytes", p), over.get("g_bytes", g), over.get("k_bytes", k)
    trainable, experts, frozen = model_split(cfg, strategy, lora_rank, lora_targets, **(moe_sizes or {}))
    floor = ((p + g + k) * (trainable + experts) + p * frozen) / num_gpus / GiB
    text = f"{p + g + k} bytes/param ({p} weights + {g} grads + {k} optimizer)"
    if frozen:
        text = (f"{p + g + k} bytes per trained param ({p} weights + {g} grads + {k} optimizer) for "
                f"{(trainable + experts) / 1e6:.1f}M trained and {p} bytes (weights only) for {frozen / 1e9:.2f}B "
                f"frozen")
    return f"  model states need {text}: at best {floor:.1f} GiB per GPU when fully sharded over all {num_gpus} GPUs"


def explanation(cfg: ModelConfig, num_gpus: int, gpu_memory_gb: float, seq: int, precision: str,
                plan: Optional[dict], rows: List[dict], strategy: str = "standard", mode: str = "params",
                lora_rank: int = 8, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), moe_sizes=None,
                state_bytes=None) -> str:
    total = sum(model_split(cfg, strategy, lora_rank, lora_targets, **(moe_sizes or {})))
    lines = [f"auto-configuration for {cfg.name} ({total / 1e9:.2f}B params) on {num_gpus} "
             f"GPU{'s' * (num_gpus != 1)} of "
             f"{gpu_memory_gb:.0f} GiB, sequence {seq}, {precision}, {strategy}:",
             model_states_line(cfg, num_gpus, precision, strategy, mode, lora_rank, lora_targets, moe_sizes,
                               state_bytes)]
    if plan is None:
        if not rows:
            lines.append("  no layout is valid for this model and GPU count (tp must divide heads, kv heads and "
                         "vocabulary; pp <= layers)")
            return "\n".join(lines)
        best = min(rows, key=lambda r: r["estimate"]["memory_per_gpu_gb"])
        e = best["estimate"]
        lines.append(f"  NO layout fits: the smallest is tp {best['tp']} pp {best['pp']} dp {best['dp']}{_ep(best)} "
                     f"ZeRO-{best['zero_stage']} recompute {best['recompute']} micro-batch "
                     f"{best['micro_batch_size']} at {e['memory_per_gpu_gb']:.1f} GiB per GPU (model states "
                     f"{e['model_states_gb']:.1f} GiB)")
        return "\n".join(lines)
    e = plan["estimate"]
    lines.append(f"  chosen: tp {plan['tp']}{' + sequence parallel' if plan['sequence_parallel'] else ''}, pp "
                 f"{plan['pp']}, dp {plan['dp']}{_ep(plan)}, ZeRO-{plan['zero_stage']}, recompute {plan['recompute']}, "
                 f"micro-batch {plan['micro_batch_size']} x {plan['num_microbatches']} microbatches")
    lines.append(f"  memory: {e['memory_per_gpu_gb']:.1f} GiB per GPU (model states {e['model_states_gb']:.1f}, "
                 f"activations+logits {e['breakdown_gb']['activations'] + e['breakdown_gb']['logits']:.1f}), "
                 f"{e['headroom_gb']:.1f} GiB to spare")
    why = []
    if plan["tp"] > 1:
        why.append(f"tp {plan['tp']} (within a node) splits weights and activations")
    if plan["pp"] > 1:
        bubble = theoretical_bubble_fraction(e["layout"]["pipeline_schedule"], plan["pp"], plan["num_microbatches"])
        why.append(f"pp {plan['pp']} splits the layers (bubble {bubble:.0%})")
    if plan["ep"] > 1:
        span = " over dp x cp" if plan["ep"] > plan["dp"] else ""
        why.append(f"ep {plan['ep']} shards the experts{span} (their all-to-all scored at {plan['a2a']:.0%} of a "
                   "step)")
    if plan["zero_stage"]:
        what = {1: "optimizer states", 2: "optimizer states and grads", 3: "all model states"}[plan["zero_stage"]]
        over = f"dp x cp {plan['dp'] * plan['cp']}" if plan["cp"] > 1 else f"dp {plan['dp']}"
        why.append(f"ZeRO-{plan['zero_stage']} shards {what} over {over}")
    if plan["recompute"] != "none":
        why.append(f"{plan['recompute']} recompute trades compute for activation memory")
    if why:
        lines.append("  because: " + "; ".join(why))
    better = sorted((r for r in rows if not r["fits"] and r["score"] > plan["score"]),
                    key=lambda r: r["estimate"]["memory_per_gpu_gb"])[:3]
    for r in better:
        lines.append(f"  faster but too big: tp {r['tp']} pp {r['pp']} dp {r['dp']}{_ep(r)} ZeRO-{r['zero_stage']} "
                     f"recompute {r['recompute']} micro-batch {r['micro_batch_size']}: "
                     f"{r['estimate']['memory_per_gpu_gb']:.1f} GiB")
    return "\n".join(lines)


def _more_gpus(cfg, num_gpus, gpu_memory_gb, seq, micro_batch_size, precision, strategy, gpus_per_node, margin,
               estimate_kw) -> str:
    """The smallest multiple of the GPU count (up to 16x) on which some layout fits."""
    for mult in (2, 4, 8, 16):
        plan = choose_layout(cfg, num_gpus * mult, gpu_memory_gb, seq, micro_batch_size, precision=precision,
                             strategy=strategy, gpus_per_node=gpus_per_node, safety_margin=margin, explain=False,
                             **estimate_kw)
        if plan is not None:
            return (f"  {num_gpus * mult} GPUs would fit: tp {plan['tp']} pp {plan['pp']} dp {plan['dp']}"
                    f"{_ep(plan)} "
                    f"ZeRO-{plan['zero_stage']} recompute {plan['recompute']} micro-batch {plan['micro_batch_size']} "
                    f"at {plan['estimate']['memory_per_gpu_gb']:.1f} GiB per GPU")
    return f"  nothing fits on up to {16 * num_gpus} GPUs: shorten the sequence or use LoRA"


def _ep(row: dict) -> str:
    """The layout's cp and ep, where > 1 (after its dp)."""
    cp = f" cp {row['cp']}" if row.get("cp", 1) > 1 else ""
    return cp + (f" ep {row['ep']}" if row.get("ep", 1) > 1 else "")


def detect_gpu_memory_gb(default: float = 80.0) -> float:
    """GiB of the visible GPU (the first), or ``default`` when there is none (CPU runs plan for an 80 GiB card)."""
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 2**30
    except Exception:  # noqa: BLE001 - a broken CUDA setup plans like a CPU host
        pass
    return default
