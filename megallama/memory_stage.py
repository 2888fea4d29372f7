"""One pipeline stage's memory by category: its parameters' model states, the activations of the microbatches its
schedule holds (activation_memory.py, moe_memory.py), ZeRO buffers and the optimizer step's temporaries.
``memory.estimate_requirements`` takes the fullest stage."""
from __future__ import annotations

from typing import List, Optional, Sequence

from megallama import activation_memory as am
from megallama.config import ModelConfig
from megallama.cp_memory import cp_attention_backward_bytes
from megallama.memory_states import (checkpoint_bytes, layer_params, lora_params, num_moe_layers, split_states_bytes,
                                     trainable_split)
from megallama.moe_memory import MoEShape, moe_layer_params

WORKSPACE_BYTES = 64 * 2 ** 20  # cuBLAS / cuBLASLt workspaces, allocated through the caching allocator


def stage_layers(cfg: ModelConfig, pp: int, first_stage_layers: Optional[int] = None,
                 schedule: str = "1f1b", last_stage_layers: Optional[int] = None,
                 layer_counts: Optional[Sequence[int]] = None) -> List[int]:
    """Decoder layers on each pipeline stage, split as the pipeline builds it (pipeline/partition.py): balanced by
    cost, so the stages with the embedding and the output head get fewer; interleaved cuts equal chunks.
    ``layer_counts``: the split the flags resolved to (``args.pipeline_layer_counts``: per model part, uneven
    virtual stages included), summed per rank."""
    if pp == 1:
        return [cfg.num_layers]
    if layer_counts is not None:
        return [sum(layer_counts[r::pp]) for r in range(pp)]
    if schedule == "interleaved":
        return [cfg.num_layers // pp] * pp
    from megallama.pipeline.partition import costs_from_config, partition_layers
    parts = partition_layers(cfg.num_layers, pp, costs=costs_from_config(cfg),
                             first_stage_num_layers=first_stage_layers, last_stage_num_layers=last_stage_layers)
    return [len(part) for part in parts]


def _in_flight(schedule: str, pp: int, stage: int, m: int, v: int, group: Optional[int] = None) -> int:
    """Microbatches (interleaved: model-chunk forwards) whose activations a stage holds at its peak; interleaved
    warms up with (v - 1) groups of ``group`` (--microbatch-group-size-per-virtual-pipeline-stage, default pp)."""
    if pp == 1:
        return 1
    if schedule == "gpipe":
        return m
    if schedule == "interleaved":
        return min(m * v, 2 * (pp - stage - 1) + (v - 1) * (group or pp) + 1)
    if schedule == "chimera":  # two pipelines in opposite directions: about pp microbatches of one stage's layers
        return min(m, pp)
    return min(pp - stage, m)


def held_chunks_peak(pp: int, stage: int, m: int, v: int, group: Optional[int], price,
                     schedule: str = "interleaved") -> tuple:
    """The worst moment of ``stage`` under the interleaved (or Chimera) order (pipeline/schedules.py, the runner's
    own): walking its actions, a chunk forward is held from its F through its B; at each action
    ``price(active, others)`` (local chunk indices: the one running, the other held ones) is what the stage holds.
    Returns (price, active, others) of the max, so uneven chunks are priced each at its own layers rather than all
    at the largest."""
    from megallama.pipeline.schedules import F, build_schedule
    held, best = [], None
    for a in build_schedule(schedule, pp, m, v, group).actions[stage]:
        if a.kind == F:
            held.append(a.chunk)
        others = list(held)
        others.remove(a.chunk)
        value = price(a.chunk, others)
        if best is None or value > best[0]:
            best = (value, a.chunk, tuple(others))
        if a.kind != F:
            held.remove(a.chunk)
    return best


def _uneven_chunks_peak(chunk_counts, stage, pp, m, v, group, L, moe_layers_total, moe, pre, post, peak_kw,
                        schedule="interleaved"):
    """``stage_activation_peak`` of a rank whose chunks hold different layer counts: each chunk priced on its own
    (the embedding / head only on the chunk that has it: interleaved's first / last, Chimera's parts 0 / pp-1),
    combined at the schedule's worst moment."""
    from megallama.pipeline.schedules import chunk_parts
    parts = chunk_parts(schedule, pp, stage, v)
    one = []
    for k, n in enumerate(chunk_counts):
        n_moe = round(n * moe_layers_total / L) if moe is not None else 0
        ends = (parts[k] == 0, parts[k] == pp - 1) if schedule == "chimera" else (pre and k == 0, post and k == v - 1)
        one.append(am.stage_activation_peak(num_layers=n, in_flight=1, pre_process=ends[0], post_process=ends[1],
                                            moe_layers=n_moe, moe=moe, **peak_kw))
    _, a, others = held_chunks_peak(pp, stage, m, v, group, lambda a, o: one[a]["total"] + sum(
        one[c]["other_per_microbatch"] for c in o), schedule)
    act = dict(one[a])
    act["total"] += sum(one[c]["other_per_microbatch"] for c in others)
    act["weight_casts"] += sum(one[c]["casts_per_microbatch"] for c in others)
    act["activations"] = act["total"] - act["logits"] - act["weight_casts"] - act["buffers"]
    act["held_layers"] = chunk_counts[a] + sum(chunk_counts[c] for c in others)
    act["held_moe_layers"] = sum(round(chunk_counts[c] * moe_layers_total / L) if moe is not None else 0
                                 for c in (a, *others))
    return act, 1 + len(others)


def _zb_h1(pp: int, stage: int, m: int, zero: int, strategy: str, inflight: int):
    """(whole, W-queued) microbatches of a ZB-H1 stage at its F/B peak (pipeline/schedules.py ``_zb_h1_orders``:
    1F1B's order, a forward waits while min(pp, m) are not yet W'd): 1F1B's min(pp - stage, m) whole, the rest
    of min(pp, m) queued. A LoRA base is frozen: nothing queues (B frees all). ZeRO-3 splits by re-running the
    backward in W (pipeline/runner.py): graphs live until W, min(pp, m) whole, except on the head's stage."""
    if strategy in ("lora", "hybrid"):
        return inflight, None
    if zero == 3:
        return (inflight if stage == pp - 1 else min(pp, m)), None
    return inflight, min(pp, m) - inflight


def stage_memory(cfg, x, num, layers, stage, L, pp, tp, dp, cp, ep, zero, recompute, schedule, m, v, strategy,
                 lora_rank, lora_targets, pkg, head, method, k_layers, bucket, overlap, optimizer, device="cuda",
                 moe: Optional[MoEShape] = None, recompute_modules=None, chunk_layers: Optional[int] = None,
                 cp_comm_type: str = "p2p", hierarchical_cp_sizes: Optional[Sequence[int]] = None,
                 microbatch_group_size: Optional[int] = None, chunk_counts: Optional[Sequence[int]] = None):
    """Memory of one pipeline stage (pipeline rank ``stage``) in bytes, by category. ``moe``: the MoE layers'
    shape (None: a dense model, or a strategy that builds none). ``chunk_layers``: the stage's largest virtual
    chunk where they differ; ``chunk_counts``: its chunks' layers (chunk order), which, when they differ under
    the interleaved schedule, price each held chunk forward at its own layers (``held_chunks_peak``), else every
    chunk forward in flight is priced at the largest; Chimera's mirror chunk (stage pp-1-s's part) is priced at
    ``layers[pp-1-s]`` by the same walk, with that part's ends (ranks 0 and pp-1 hold the embedding and the head
    both; middle ranks neither). ``cp_comm_type`` (and
    ``hierarchical_cp_sizes`` for a2a+p2p): whose buffers the attention backward holds at cp > 1 (cp_memory.py)."""
    pre, post = stage == 0, stage == pp - 1
    lp = layer_params(cfg, tp)
    h, vloc = cfg.hidden_size, cfg.vocab_size // tp
    chunks = 2 if schedule == "chimera" and pp > 1 else 1  # Chimera keeps stages i and pp-1-i
    # the embedding lives on part 0, the head on part pp-1: under Chimera both on ranks 0 and pp-1 (each holds the
    # other direction's end as its mirror chunk), neither on the middle ranks
    has_embedding = stage in (0, pp - 1) if chunks == 2 else pre
    has_head = has_embedding if chunks == 2 else post
    n_layers = layers[stage] + (layers[pp - 1 - stage] if chunks == 2 else 0)
    mlp = lp["mlp"]
    expert_params = moe_dense = 0
    if moe is not None:  # routers and shared experts: dense weights of the MoE layers (hybrid trains them)
        frac = min(1.0, num_moe_layers(cfg) / L)
        mp = moe_layer_params(cfg, moe, tp)
        expert_params = int(n_layers * frac * mp["experts"])
        moe_dense = int(n_layers * frac * (mp["router"] + mp["dense"]))
        dense_mlp = int(n_layers * (1 - frac) * mlp)
    else:
        dense_mlp = n_layers * mlp
    dense = n_layers * (lp["attn"] + lp["norms"]) + dense_mlp
    if has_embedding:
        dense += vloc * h
    if has_head:
        dense += h + (0 if (cfg.tie_word_embeddings and pp == 1) else vloc * h)
    p, n = pkg[0], dp * cp
    adapters = n_layers * lora_params(cfg, lora_rank, lora_targets, tp) if strategy in ("lora", "hybrid") else 0
    split = trainable_split(strategy, dense, expert_params, adapters, moe_dense)
    st = split_states_bytes(split, zero, n, ep, pkg)
    local_params = dense + expert_params + moe_dense
    # activations
    inflight, queued = _in_flight(schedule, pp, stage, m, v, microbatch_group_size), None
    if schedule == "zb-h1" and pp > 1:
        inflight, queued = _zb_h1(pp, stage, m, zero, strategy, inflight)
    per_chunk_layers = max(1, chunk_layers or layers[stage] // v) if schedule == "interleaved" else \
        layers[stage] if chunks == 2 else n_layers
    n_moe = round(per_chunk_layers * num_moe_layers(cfg) / L) if moe is not None else 0
    # ZeRO buffers by phase. Stage 2: one fp32 staging bucket in backward (up to three with overlap). Stage 3:
    # each unit (a layer; the embedding / untied head) is a bucket, gathered (p bytes) just before its use and
    # freed after, the next one prefetched; the root (a tied or shared output weight) stays gathered all step.
    trainable_local = split[0] + split[1]
    extra = {}
    if zero >= 2 and n > 1:
        k = 3 if overlap else 1
        unit = lp["attn"] + lp["norms"] + (sum(mp.values()) if moe is not None else lp["mlp"])
        if zero == 2:
            staging = 4 * min(trainable_local, k * min(bucket, trainable_local))
            extra = {"head backward": staging, "layer backward": staging}
        else:
            # the root (zero3.build_units: the weight compute_logits reads) stays gathered from the forward's end
            # through the head's backward on the head's stage only; a first stage without the head (pp > 1) holds
            # the embedding as its root, gathered only around the embedding, and a middle stage none
            tied_root = has_head and (cfg.tie_word_embeddings or pp > 1)
            root = vloc * h if tied_root else 0
            head_unit = 0 if (tied_root or not has_head) else vloc * h
            extra = {"head forward": p * (root + head_unit), "forward end": p * (root + 2 * unit),
                     "head backward": p * (root + head_unit) + 4 * head_unit,
                     "layer backward": p * (root + 2 * unit) + 4 * k * unit}
            if has_embedding and not has_head:  # its backward, the microbatch's last: gathered weight, grad, staging
                extra["embedding backward"] = (3 * p + 4) * vloc * h
            if strategy == "lora":  # a unit gathers its layer whole (the frozen base is sharded as the adapters
                # are); only the adapters stage gradients; a frozen root is freed once the head's backward is done
                a = lora_params(cfg, lora_rank, lora_targets, tp)
                extra = {"head forward": p * (root + head_unit), "forward end": p * (root + 2 * (unit + a)),
                         "head backward": p * (root + head_unit), "layer backward": p * 2 * (unit + a) + 4 * k * a}
    if cp > 1:
        extra["attention backward"] = cp_attention_backward_bytes(
            x.b, x.s, cfg.num_attention_heads // tp, cfg.num_query_groups // tp, cfg.head_dim, num.e, cp,
            cp_comm_type, hierarchical_cp_sizes)
    peak_kw = dict(x=x, n=num, recompute=recompute, head=head, recompute_method=method,
                   recompute_num_layers=k_layers, others_hold_ends=schedule not in ("interleaved", "chimera"),
                   extra=extra, device=device, head_trainable=strategy not in ("lora", "hybrid"),
                   recompute_modules=recompute_modules)
    if schedule == "interleaved" and pp > 1 and chunk_counts is not None and len(set(chunk_counts)) > 1:
        act, inflight = _uneven_chunks_peak(list(chunk_counts), stage, pp, m, v, microbatch_group_size, L,
                                            num_moe_layers(cfg), moe, pre, post, peak_kw)
    elif chunks == 2:  # Chimera's two directions, each chunk at its own layers and ends (the mirror's too)
        act, inflight = _uneven_chunks_peak([layers[stage], layers[pp - 1 - stage]], stage, pp, m, 2, None, L,
                                            num_moe_layers(cfg), moe, pre, post, peak_kw, schedule="chimera")
    else:
        act = am.stage_activation_peak(num_layers=per_chunk_layers, in_flight=inflight, pre_process=pre,
                                       post_process=post, moe=moe, moe_layers=n_moe, wgrad_queued=queued, **peak_kw)
        act["held_layers"], act["held_moe_layers"] = inflight * per_chunk_layers, inflight * n_moe
    if strategy in ("lora", "hybrid") and recompute != "full":
        # + the rank-r intermediates; - what frozen weights need not keep: a frozen down_proj's input (the SwiGLU
        # product; MoE layers' experts train under hybrid), the input of a frozen gate/up or q/k/v GEMM (kept
        # only for weight gradients unless an adapter reads it), on the first stage the first layer's input norm.
        # Per layer the activations hold (interleaved / Chimera: each chunk forward its own chunk's layers only)
        held = act["held_layers"]
        dense_layers = held - act["held_moe_layers"]
        lin = (num.e if num.cast else num.r) * x.Sn * h
        delta = held * len(lora_targets) * num.e * x.S * lora_rank - \
            (0 if "down_proj" in lora_targets else dense_layers * num.e * x.S * (cfg.ffn_hidden_size // tp)) - \
            (0 if {"gate_proj", "up_proj"} & set(lora_targets) else dense_layers * lin) - \
            (0 if {"q_proj", "k_proj", "v_proj"} & set(lora_targets) else held * lin)
        first = 0  # the first layer's input needs no gradient: its input norm keeps nothing
        if has_embedding:  # the stage holding part 0 (Chimera: rank pp-1's mirror chunk too)
            norm = am.norm_saved(x, num) if recompute == "none" else num.r * x.Sn * h  # selective: the input only
            first = norm
            if not {"q_proj", "k_proj", "v_proj"} & set(lora_targets):  # nor does its attention (q, k, v, lse) ...
                first += am.layer_saved(x, num)["attention"] - \
                    (num.e * x.S * (h // tp) if "o_proj" in lora_targets else 0)  # ... but o_proj's adapter's input
                first += num.e * (x.qkv_params if num.cast else 0)  # no q/k/v input grad: their casts are not kept
                if "o_proj" not in lora_targets:  # nothing in its attention trains: the MLP's input norm keeps nothing
                    first += norm + num.e * (h * h // tp if num.cast else 0)
        delta -= first
        act["activations"] += delta
        act["total"] += delta
    buffers = WORKSPACE_BYTES + act["buffers"]
    step = WORKSPACE_BYTES
    if optimizer == "foreach":  # torch's foreach AdamW: one fp32 temporary as large as the params it updates
        step += 4 * trainable_local / (n if zero >= 1 else 1)
    out = {"weights": st["weights"], "grads": st["grads"], "optimizer": st["optimizer"],
           "activations": act["activations"], "logits": act["logits"], "weight_casts": act["weight_casts"],
           "buffers": buffers, "phase": act["phase"], "in_flight": inflight, "wgrad_queued": queued or 0,
           "held_layers": act["held_layers"],
           "params": local_params, "checkpoint": checkpoint_bytes(local_params, st["optimizer"], p),
           "layers": n_layers, "fwd_bwd": act["total"] + WORKSPACE_BYTES, "step": step}
    if step > out["fwd_bwd"]:  # the optimizer step, after the activations are freed, is the peak
        out.update(activations=0, logits=0, weight_casts=0, buffers=step, phase="optimizer step")
    return out
