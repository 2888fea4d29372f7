"""Activation bytes of OUR Llama layer, derived from what autograd saves in ``megallama/model`` and its ops.

Not Korthikanti et al.'s GPT-3 count: every term below is a tensor that ``saved_tensors_hooks`` sees (or that a
checkpoint keeps alive), and ``tests/test_memory.py`` re-measures them on CPU. Per rank:
S = b*s/cp tokens in a tensor-parallel region, Sn = S/tp under sequence parallelism (else S), h hidden, F ffn,
a heads, g kv heads, V vocab, t = tp, e = compute bytes (2 bf16/fp16, 4 fp32), r = bytes of the parameters and the
residual stream (4 under autocast: fp32 params; the embedding output and the residual adds stay fp32).

One decoder layer keeps (no recompute):
  RMSNorm x2   fused kernel: its input r*Sn*h + rstd 4*Sn; reference: 4*Sn*h (input in fp32) + 4*Sn + r*Sn*h
  q/k/v input  e*Sn*h once per group (autocast copy, or the norm output itself; the shard under SP); same gate/up
  attention    q, k after RoPE, v, out: e*S*(h/t)*(2 + 2g/a); logsumexp 4*b*(a/t)*s (flash / cuDNN / CPU flash)
  SwiGLU       fused: gate, up + the product (down_proj's input) 3*e*S*F/t; reference adds silu(gate): 4*e*S*F/t
  weight casts autocast only: each matmul saves its bf16 weight copy, e*(layer matmul params)/t per microbatch
fp8 (--fp8-format): the linears keep 1-byte inputs and no weight casts (``layer_saved``). MoE layers: moe_memory.py.
RoPE saves only its cos/sin tables (shared by all layers). Selective recompute checkpoints the norms (keeping
their input r*Sn*h) and SwiGLU (gate, up); full recompute keeps each checkpointed chunk's input r*Sn*h and rebuilds
one chunk in backward. Every parallel linear casts its input and weight with ``.to()`` just outside its own
autograd Function, so autocast's cast cache holds no weight copy of a fully recomputed layer.

With the loop's default bf16 parameters (mode 'params', r = e = 2) and the fused kernels, tp 1, this is
S*h*(2*2 + 2*2 + 4 + 4g/a + 6F/h) = sbh(12 + 4g/a + 6F/h) bytes per layer, the figure of a flash-attention Llama
layer. With fp32 parameters under autocast (--params-dtype fp32) the residual stream and norms are fp32 and every
matmul keeps a bf16 weight copy: sbh(20 + 4g/a + 6F/h) plus 2 bytes per layer weight, per microbatch in flight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

from megallama.errors import ConfigError

# Must equal megallama.mpu.linear_cross_entropy._CHUNK_BYTES / _ROW_ALIGN (a test checks): logits bytes per head
# chunk in the compute dtype, rows a multiple of 256 when the tokens take more than one chunk.
FUSED_HEAD_CHUNK_BYTES, FUSED_HEAD_ROW_ALIGN = 512 * 2**20, 256
MODES, RECOMPUTE, HEADS = ("autocast", "params"), ("none", "selective", "full"), ("fused", "unfused")


@dataclass(frozen=True)
class Numerics:
    """e/r bytes as above; ``cast``: autocast copies weights and activations; ``fused``: the csrc kernels run.
    Mode 'params' stores parameters in the compute dtype (the loop's default); 'autocast' keeps fp32 params."""
    e: int
    r: int
    cast: bool
    fused: bool = True
    fp8: bool = False  # --fp8-format: the decoder's linears save their inputs in fp8 (1 byte), no weight casts

    @staticmethod
    def of(precision: str, mode: str = "params", fused: bool = True, fp8: bool = False) -> "Numerics":
        if precision not in ("bf16", "fp16", "fp32"):
            raise ConfigError(f"precision '{precision}' is not one of bf16, fp16, fp32; pick one of those")
        if mode not in MODES:
            raise ConfigError(f"mixed-precision mode '{mode}' is not one of {', '.join(MODES)}; pick one of those")
        if fp8 and precision != "bf16":
            raise ConfigError(f"fp8 needs bf16 (the fp8 GEMMs write bf16), got precision '{precision}'; use bf16")
        e = 4 if precision == "fp32" else 2
        if mode == "autocast":
            return Numerics(e=e, r=4, cast=e < 4, fused=fused, fp8=fp8)
        return Numerics(e=e, r=e, cast=False, fused=fused, fp8=fp8)


@dataclass(frozen=True)
class Shape:
    b: int
    s: int  # local sequence (seq / cp)
    h: int
    F: int
    a: int
    g: int
    V: int
    t: int = 1
    sp: bool = False

    @classmethod
    def of(cls, cfg, micro_batch: int, seq: int, tp: int = 1, sp: bool = False, cp: int = 1,
           ffn_hidden_size: int = None) -> "Shape":
        return cls(micro_batch, seq // cp, cfg.hidden_size, ffn_hidden_size or cfg.ffn_hidden_size,
                   cfg.num_attention_heads, cfg.num_query_groups, cfg.vocab_size, tp, bool(sp and tp > 1))

    @property
    def S(self) -> int:
        return self.b * self.s

    @property
    def Sn(self) -> int:
        return self.S // self.t if self.sp else self.S

    @property
    def d(self) -> int:
        return self.h // self.a

    @property
    def qkv_params(self) -> int:  # local to this tp rank
        return (self.h * self.h + 2 * self.h * self.g * self.d) // self.t

    @property
    def ffn_weight(self) -> int:  # one of gate/up/down, local
        return self.h * self.F // self.t

    @property
    def layer_matmul_params(self) -> int:
        return self.qkv_params + self.h * self.h // self.t + 3 * self.ffn_weight


def norm_saved(x: Shape, n: Numerics) -> int:
    if n.fused:
        return n.r * x.Sn * x.h + 4 * x.Sn
    return 4 * x.Sn * x.h + 4 * x.Sn + n.r * x.Sn * x.h


def swiglu_saved(x: Shape, n: Numerics, selective: bool = False) -> int:
    """gate, up (+ silu(gate) in the reference) and the product that down_proj keeps."""
    return (3 if n.fused or selective else 4) * n.e * x.S * (x.F // x.t)


def layer_saved(x: Shape, n: Numerics, recompute: str = "none") -> Dict[str, int]:
    """Bytes one decoder layer keeps for backward, by component (weight casts listed apart).

    fp8 (mpu/fp8_linear.py): each linear saves its input quantised (1 byte; the [b, s/tp, h] shard under SP, the
    gather is redone in backward), its fp32 scales and the weight itself (a parameter: no cast, no fp8 copy). So
    q/k/v and gate/up keep 1*Sn*h instead of the 16-bit input; down_proj an fp8 copy of the SwiGLU product, which
    is then freed; o_proj an fp8 copy of the attention output, which attention keeps anyway."""
    sel = recompute == "selective"
    attn = 2 * n.e * x.S * (x.h // x.t) + 2 * n.e * x.S * (x.g // x.t) * x.d + 4 * x.b * (x.a // x.t) * x.s
    if not n.fp8:
        return {"norms": 2 * (n.r * x.Sn * x.h if sel else norm_saved(x, n)),
                "linear_inputs": 2 * (n.e if n.cast else n.r) * x.Sn * x.h,
                "attention": attn, "mlp": swiglu_saved(x, n, sel),
                "weight_casts": n.e * x.layer_matmul_params if n.cast else 0}
    Fl = x.F // x.t
    return {"norms": 2 * (n.r * x.Sn * x.h if sel else norm_saved(x, n)),
            "linear_inputs": 2 * x.Sn * x.h + x.S * (x.h // x.t) + 4 * (4 + 3 + 2 + 2),  # + o's input, the scales
            "attention": attn, "mlp": swiglu_saved(x, n, sel) - n.e * x.S * Fl + x.S * Fl,
            "weight_casts": 0}


def modules_saved(parts: Dict[str, int], x: Shape, n: Numerics, modules, moe=None) -> Dict[str, int]:
    """A layer's kept bytes under selective recompute of Megatron's ``--recompute-modules`` (model/recompute.py),
    from its no-recompute ``parts`` (``layer_saved`` or, with ``moe`` (a ``MoEShape``), ``moe_layer_saved``):
    layernorm keeps the norms' inputs and frees their outputs (the q/k/v, gate/up and shared-expert inputs unless
    those are autocast or fp8 copies); core_attn frees the logsumexp (q, k, v are its checkpoint's inputs, and its
    output is o_proj's input either way); mlp / moe keep only the MLP's input (the norm output) and no weight casts;
    moe_act frees the experts' SwiGLU product; shared_experts the shared expert's SwiGLU set and weight casts.
    Checked byte for byte on CPU against the saved tensors (tests/test_memory_recompute_modules.py)."""
    mods, out = set(modules), dict(parts)
    own_input = not (n.cast or n.fp8)  # a linear keeps the norm output itself, not a copy of it
    norm_out = n.r * x.Sn * x.h
    if moe is None:
        half = parts["linear_inputs"] // 2  # q/k/v's input
    else:  # as moe_layer_saved: the shared expert's input is counted unless the router keeps it (fp32)
        shared_in = (n.e if n.cast else n.r) * x.Sn * x.h if moe.shared and (n.cast or n.r < 4) else 0
        half = parts["linear_inputs"] - shared_in
    mlp_in = parts["linear_inputs"] - half  # gate/up's input, or the shared expert's
    if "layernorm" in mods:
        out["norms"] = 2 * norm_out
        half, mlp_in = (0, 0) if own_input else (half, mlp_in)
    if "core_attn" in mods:
        out["attention"] -= 4 * x.b * (x.a // x.t) * x.s
    shared_casts = n.e * 3 * x.h * (moe.shared // x.t) if moe is not None and n.cast else 0
    if ("mlp" in mods and moe is None) or ("moe" in mods and moe is not None):
        out["mlp"], mlp_in = 0, (0 if "layernorm" in mods else norm_out)
        attn_casts = n.e * (x.qkv_params + x.h * x.h // x.t) if n.cast else 0
        out["weight_casts"] = attn_casts if moe is not None or n.cast else parts["weight_casts"]
    elif moe is not None:
        if "layernorm" in mods and n.r == 4:  # the router's fp32 input is the norm output itself: freed too
            out["mlp"] -= 4 * x.Sn * x.h
        if "moe_act" in mods:  # the product (and the reference SwiGLU's silu(gate)): only gate and up are kept
            out["mlp"] -= (1 if n.fused else 2) * n.e * moe.rows(x.S) * (moe.ffn // x.t)
        if "shared_experts" in mods and moe.shared:
            sh = Shape(x.b, x.s, x.h, moe.shared, x.a, x.g, x.V, x.t, x.sp)
            out["mlp"] -= swiglu_saved(sh, n)
            out["weight_casts"] -= shared_casts
            mlp_in = 0 if n.cast else mlp_in  # its checkpoint keeps the norm output: fp32, the router's input
    out["linear_inputs"] = half + mlp_in
    return out


def layer_bytes(x: Shape, n: Numerics, recompute: str = "none") -> int:
    return sum(layer_saved(x, n, recompute).values())


def embedding_saved(x: Shape) -> int:
    """Token ids (int64) kept by the embedding; with tp > 1 the masked local ids plus the bool mask."""
    return 8 * x.S + (x.S if x.t > 1 else 0)


def rope_tables(x: Shape) -> int:
    return 2 * 4 * x.s * (x.d // 2)


def head_saved(x: Shape, n: Numerics, head: str = "fused", trainable: bool = True) -> Dict[str, int]:
    """Final norm + output layer + cross-entropy, kept until backward (a frozen output weight: no d(weight))."""
    vloc = x.V // x.t
    out = {"final_norm": norm_saved(x, n)}
    if head == "fused":  # gradients computed in forward: d(hidden) in compute dtype, d(weight) in fp32
        out["head"] = n.e * x.S * x.h + (4 * vloc * x.h if trainable else 0)
    else:  # lm_head input, its weight cast, fp32 softmax + target bookkeeping
        out["head"] = (n.e if n.cast else n.r) * x.Sn * x.h + (n.e * vloc * x.h if n.cast else 0) \
            + 4 * x.S * vloc + 10 * x.S
    return out


def fused_head_rows(x: Shape, n: Numerics) -> int:
    rows = max(1, min(x.S, FUSED_HEAD_CHUNK_BYTES // (n.e * (x.V // x.t))))
    return rows - rows % FUSED_HEAD_ROW_ALIGN if FUSED_HEAD_ROW_ALIGN <= rows < x.S else rows


def head_forward_transient(x: Shape, n: Numerics, head: str = "fused", device: str = "cuda") -> int:
    """Peak bytes the head holds during its forward on top of what it saves: the final norm output (and its
    all-gather under SP), the compute-dtype input and weight copies, the token bookkeeping, and per chunk of R
    logits: on CUDA (torch.compile'd softmax kernels, fp32 grad_w accumulated by the GEMM in place:
    ``ops.gemm_accum_fp32_``) the chunk's logits, its gradient and the previous chunk's gradient; elsewhere the
    eager fp32 temporaries of the softmax and its gradient, and the fp32 copies of the chunk's gradient and input
    that the CPU grad_w GEMM reads. Unfused: the logits and their fp32 copy."""
    vloc = x.V // x.t
    base = n.r * x.Sn * x.h + (n.r * x.S * x.h if x.sp else 0)
    if head == "unfused":
        return base + n.e * x.S * vloc + (4 * x.S * vloc if n.e < 4 else 0)
    if n.r != n.e:
        base += n.e * x.S * x.h + n.e * vloc * x.h
    base += 4 * x.S + 2 * x.S + 16 * x.S + 4 * x.S  # losses, valid/mine masks, local ids (+ temp), coefficients
    rows = fused_head_rows(x, n)
    R, e, prev = rows * vloc, n.e, (n.e if x.S > rows else 0)  # the previous chunk's gradient, still referenced
    if device == "cuda":
        return base + (prev + 2 * e) * R
    up = 4 if e < 4 else 0  # logits.to(fp32) is a copy unless the logits are fp32 already
    stats = (prev + e + up + 8) * R  # x - max, exp(...)
    grad = (prev + e + up + 4 + 1 + 8) * R + 8 * vloc  # exp, the one-hot mask, p - 1, the where; column ids
    wgrad = e * R + (4 * R + 4 * rows * x.h if e < 4 else 0)  # g, and fp32 copies of g and h for the GEMM
    return base + max(stats, grad, wgrad)


def head_backward_transient(x: Shape, n: Numerics, head: str = "fused", trainable: bool = True) -> int:
    vloc = x.V // x.t
    if head == "fused":  # grad_h * scale (compute dtype) -> residual dtype; grad_w * scale written in the param dtype
        return n.e * x.S * x.h + (n.r * x.S * x.h if n.r != n.e else 0) + (n.r * vloc * x.h if trainable else 0)
    return n.e * x.S * vloc if n.e < 4 else 0  # the fp32 softmax grad cast back to the logits dtype


def layer_backward_workspace(x: Shape, n: Numerics, recompute: str = "none", moe=None) -> int:
    """Bytes above the layer's saved set while its MLP runs backward (the largest part of a Llama layer):
    the residual grad, then the max of down_proj's (input grad + weight grad + fp32 upcast), SwiGLU's (two grads
    while the product is freed) and gate/up's (input grads + both weight grads).
    For an MoE layer the same with the experts' rows (``MoEShape.rows``) and their stacked weights."""
    c, W, eF = (4 if n.cast else 0), x.ffn_weight, n.e * x.S * (x.F // x.t)
    if moe is not None:
        W, eF = moe.local_experts * x.h * (moe.ffn // x.t), n.e * moe.rows(x.S) * (moe.ffn // x.t)
    G = n.r * x.Sn * x.h
    gy = (n.e * x.S * x.h if x.sp else n.e * x.Sn * x.h if n.r != n.e else 0)
    mlp_saved = swiglu_saved(x, n, recompute == "selective") + (n.e * W if n.cast else 0)
    if recompute == "selective" and not n.fused:
        mlp_saved -= eF  # silu(gate) and the product are rebuilt in backward: one more eF at SwiGLU
    cand = [
        gy + eF + n.e * W,  # down_proj: input grad, then the weight-grad GEMM
        n.e * W + c * W - (n.e * W if n.cast else 0),  # its weight grad upcast (input grad replaces the input)
        2 * eF - (n.e * W if n.cast else 0) + (eF if recompute == "selective" and not n.fused else 0),  # SwiGLU
        # gate/up backward: two input grads in, input-grad GEMMs and both weight grads out (+ SP re-gather)
        -mlp_saved - (n.e * W if n.cast else 0) + 2 * eF + 2 * n.e * x.S * x.h + 2 * n.e * W
        + ((1 if n.fp8 else n.e) * (x.S + x.Sn) * x.h if x.sp else 0),
    ]  # under autocast the fp32 casts of its grads run after the node frees its saved bf16 copies: below this
    return G + max(cand)


def wgrad_queue_layer(x: Shape, n: Numerics, moe: bool = False) -> Dict[str, int]:
    """One decoder layer under ZB-H1's B/W split (mpu/layers.py ``_defer_weight_grads``): 'queued', the bytes its
    weight-gradient GEMMs hold from B to W (B frees the autograd graph; each GEMM keeps its input as saved, q/k/v
    sharing one and gate/up another, and its output gradient in the compute dtype, o's and down's a whole [S, h]
    before the tp reduction); 'grads', the weight gradients W makes, all of them before it accumulates any
    (fp32 under autocast). An MoE layer's experts take their gradients in B: only attention's GEMMs queue.
    fp8: the queued inputs and output gradients are fp8 (1 byte each).
    Checked on CPU against the live-bytes peak of pp 2 training steps (tests/test_memory.py), not yet on GPU."""
    q = 1 if n.fp8 else n.e
    lin = (1 if n.fp8 else n.e if n.cast else n.r) * x.Sn * x.h
    attn = lin + 2 * q * x.S * (x.h // x.t) + 2 * q * x.S * (x.g // x.t) * x.d + q * x.S * x.h
    weights = x.qkv_params + x.h * x.h // x.t
    if not moe:
        attn += lin + 3 * q * x.S * (x.F // x.t) + q * x.S * x.h
        weights += 3 * x.ffn_weight
    return {"queued": attn, "grads": (4 if n.cast else n.e) * weights}


def recompute_chunks(num_layers: int, method: str, k: int):
    """(number of checkpointed chunks, layers per chunk, layers stored whole) for Megatron's methods."""
    k = max(1, k)
    if method == "block":
        n = min(k, num_layers)
        return n, 1, num_layers - n
    return math.ceil(num_layers / k), min(k, num_layers), 0


def stage_activation_peak(x: Shape, n: Numerics, num_layers: int, recompute: str = "none", in_flight: int = 1,
                          pre_process: bool = True, post_process: bool = True, head: str = "fused",
                          recompute_method: str = "uniform", recompute_num_layers: int = 1,
                          others_hold_ends: bool = True, extra: Dict[str, int] = None, moe=None,
                          moe_layers: int = 0, device: str = "cuda", head_trainable: bool = True,
                          wgrad_queued: int = None, recompute_modules=None) -> Dict[str, int]:
    """Peak activation bytes of one pipeline stage holding ``in_flight`` microbatches (1F1B steady state: the
    others are held whole while one runs its head forward, head backward or a layer's backward). Interleaved
    schedules pass model-chunk forwards as ``in_flight`` and ``others_hold_ends=False``: only one of them is the
    chunk with the embedding / head. ``extra``: bytes other parts hold in a given phase (ZeRO-3 gathered units,
    ZeRO-2/3 gradient staging; 'attention backward': context parallelism's attention buffers, a phase of its own),
    by phase name, reported under 'buffers'. ``moe_layers`` of the ``num_layers`` are
    MoE layers shaped by ``moe`` (a ``moe_memory.MoEShape``). ``head_trainable=False``: a frozen output weight
    (LoRA) gets no gradient.
    ``recompute_modules``: under selective, Megatron's --recompute-modules (``modules_saved``; None: megallama's
    default selective); the largest layer's recomputed bytes are rebuilt during its backward.
    ``wgrad_queued``: ZB-H1 with the B/W split, this many microbatches' W pending (``wgrad_queue_layer``) while
    ``in_flight`` are held whole; while a W runs, one fewer is whole and one more is queued (None: grads in B).

    Returns the peak split into 'activations' (layers, embedding, final norm, tables), 'weight_casts',
    'logits' (the head's saved tensors and transients), and the 'phase' the peak is in; 'other_per_microbatch'
    and 'casts_per_microbatch' are what each of the other held microbatches adds (memory_stage's uneven chunks)."""
    if recompute not in RECOMPUTE:
        raise ConfigError(f"recompute '{recompute}' is not one of {', '.join(RECOMPUTE)}; pick one of those")
    if head not in HEADS:
        raise ConfigError(f"head '{head}' is not one of {', '.join(HEADS)}; pick one of those")
    rec = "selective" if recompute == "selective" else "none"
    by_module = rec == "selective" and recompute_modules is not None
    parts = layer_saved(x, n, "none" if by_module else rec)
    rebuilt = 0  # bytes a selective module recomputes during its layer's backward (the largest layer's)
    if by_module:
        kept = modules_saved(parts, x, n, recompute_modules)
        rebuilt = sum(parts.values()) - sum(kept.values()) if moe_layers < num_layers else 0
        parts = kept
    if moe is not None and moe_layers:  # the per-layer average over dense and MoE layers
        mp = moe.layer_saved(x, n, "none" if by_module else rec)
        if by_module:
            kept = modules_saved(mp, x, n, recompute_modules, moe)
            rebuilt = max(rebuilt, sum(mp.values()) - sum(kept.values()))
            mp = kept
        parts = {k: (parts[k] * (num_layers - moe_layers) + mp[k] * moe_layers) // num_layers for k in parts}
    casts_layer = parts["weight_casts"]
    whole = sum(parts.values())
    if recompute == "full":
        n_chunks, per_chunk, stored = recompute_chunks(num_layers, recompute_method, recompute_num_layers)
        layers = n_chunks * n.r * x.Sn * x.h + stored * (whole - casts_layer)
        casts, recomputed = stored * casts_layer, per_chunk * whole
    else:
        layers, casts, recomputed, per_chunk = num_layers * (whole - casts_layer), num_layers * casts_layer, rebuilt, 0
    misc = rope_tables(x) + (embedding_saved(x) if pre_process else 0)
    # a stage's output lives until its send is over, not until its backward (pipeline/deallocate.py): one, the
    # latest microbatch's, whatever the phase and however many microbatches are in flight
    sent = 0 if post_process else n.r * x.Sn * x.h
    hs = head_saved(x, n, head, head_trainable) if post_process else {"final_norm": 0, "head": 0}
    held = layers + casts + misc + hs["final_norm"] + hs["head"]  # one microbatch after its forward
    ws = layer_backward_workspace(x, n, recompute, moe if moe_layers else None)
    ex = dict(extra or {})
    lb, hf, hb, fe = (ex.get(k, 0) for k in ("layer backward", "head forward", "head backward", "forward end"))
    phases = {"layer backward": (held - hs["final_norm"] - hs["head"] + recomputed + ws + lb, 0,
                                 per_chunk * casts_layer, lb)}
    if ex.get("attention backward"):  # cp attention's buffers (cp_memory.py) beside the residual grad, not the MLP's
        ab = ex["attention backward"] + lb
        phases["attention backward"] = (held - hs["final_norm"] - hs["head"] + recomputed + n.r * x.Sn * x.h + ab,
                                        0, per_chunk * casts_layer, ab)
    if pre_process and ex.get("embedding backward"):  # ZeRO-3's embedding unit, after the layers' backward
        phases["embedding backward"] = (misc + ex["embedding backward"], 0, 0, ex["embedding backward"])
    if post_process:
        fwd = head_forward_transient(x, n, head, device)
        phases["head forward"] = (held + fwd + hf, hs["head"] + fwd, 0, hf)
        bwd = head_backward_transient(x, n, head, head_trainable)
        phases["head backward"] = (held + bwd + hb, hs["head"] + bwd, 0, hb)
    else:
        phases["forward end"] = (held + fe, 0, 0, fe)
    if wgrad_queued is not None:
        _queue_wgrads(phases, x, n, num_layers, wgrad_queued, moe_layers, head if post_process else None,
                      misc + (layers + casts) // max(1, num_layers) + recomputed + ws + lb,
                      max(1, per_chunk), casts)
    phases = {k: (cur + sent, *rest) for k, (cur, *rest) in phases.items()}
    phase = max(phases, key=lambda k: phases[k][0])
    current, logits, extra_casts, buffers = phases[phase]
    other = held if others_hold_ends else held - hs["final_norm"] - hs["head"] - \
        (embedding_saved(x) if pre_process else 0)
    total = (in_flight - 1) * other + current
    one_casts, casts = casts, in_flight * casts + extra_casts
    return {"total": total, "logits": logits, "weight_casts": casts, "buffers": buffers,
            "activations": total - logits - casts - buffers, "phase": phase, "held_per_microbatch": held,
            "layer_bytes": whole, "other_per_microbatch": other, "casts_per_microbatch": one_casts}


def _queue_wgrads(phases, x, n, num_layers, queued, moe_layers, head, late_base, per_chunk, casts) -> None:
    """ZB-H1's phases: every one also holds ``queued`` microbatches' pending W; late in its B a microbatch holds
    its first layer (chunk) whole and the other layers' queue; W holds one more queue and the grads it makes,
    one fewer microbatch whole (its casts too). An unfused head's output GEMM queues its input and logits grad."""
    dense, moe = wgrad_queue_layer(x, n), wgrad_queue_layer(x, n, moe=True)
    layer = {k: (dense[k] * (num_layers - moe_layers) + moe[k] * moe_layers) // max(num_layers, 1)  # 0: empty stage
             for k in dense}
    head_q = (n.e if n.cast else n.r) * x.Sn * x.h + n.e * x.S * (x.V // x.t) if head == "unfused" else 0
    head_g = (4 if n.cast else n.e) * (x.V // x.t) * x.h if head == "unfused" else 0
    one = num_layers * layer["queued"] + head_q
    held = queued * one
    for name, (cur, logits, ex_casts, buffers) in list(phases.items()):
        if name == "layer backward":
            cur = max(cur, late_base + (num_layers - per_chunk) * layer["queued"] + head_q)
        phases[name] = (cur + held, logits, ex_casts, buffers)
    lb = phases["layer backward"][3]
    phases["weight grads"] = (held + one + num_layers * layer["grads"] + head_g + lb, 0, -casts, lb)
