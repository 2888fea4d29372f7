"""What an MoE layer (model/moe.py) costs: its parameters and the bytes its forward saves for backward.

Per MoE layer and tp rank: the router [E, h] (replicated), E/ep experts of 3*h*F_e/tp (F_e: --moe-ffn-hidden-size,
default the dense FFN) and, with --moe-shared-expert-intermediate-size F_s, a shared SwiGLU MLP of 3*h*F_s/tp that
is tensor- and data-parallel like the dense MLP (its gradients reduce over all of dp, not the expert-dp group).

Rows through the experts, for T = b*s/cp tokens (gathered over tp under SP) and k choices: without a capacity
all T*k assignments (balanced routing assumed: each rank's experts see T*k rows under ep too); with
--moe-expert-capacity-factor cf each expert keeps at most C = ceil((T*k/E)*cf) (Megatron's order, as the layer),
so at most min(T*k, E*C) are kept (the bound; exact when every expert is full); with
--moe-pad-expert-input-to-capacity every expert computes exactly min(C, T) rows, E*min(C, T) in all, whatever
the routing (the padding weighs 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

from megallama.activation_memory import Numerics, Shape, layer_saved, swiglu_saved


@dataclass(frozen=True)
class MoEShape:
    """This rank's experts (E/ep), the router's top-k, the per-expert FFN size and the MoE options above."""
    num_experts: int
    local_experts: int
    topk: int
    ffn: int
    shared: int = 0  # shared expert FFN size (0: none)
    capacity_factor: Optional[float] = None  # None (or negative, Megatron's "no dropping"): no capacity
    pad: bool = False

    def capacity(self, tokens: int) -> Optional[int]:
        cf = self.capacity_factor
        return None if cf is None or cf < 0 else max(1, math.ceil((tokens * self.topk / self.num_experts) * cf))

    def kept(self, tokens: int) -> int:
        """Assignments the dispatch keeps (at most: balanced routing keeps all of them up to the capacity)."""
        cap = self.capacity(tokens)
        return tokens * self.topk if cap is None else min(tokens * self.topk, self.num_experts * min(cap, tokens))

    def rows(self, tokens: int) -> int:
        """Rows the experts compute: the kept assignments, or E * min(C, T) when padded to capacity."""
        if self.pad and self.capacity(tokens) is not None:
            return self.num_experts * min(self.capacity(tokens), tokens)
        return self.kept(tokens)

    def layer_saved(self, x: Shape, n: Numerics, recompute: str = "none") -> Dict[str, int]:
        return moe_layer_saved(x, n, self, recompute)

    def expert_params(self, h: int, tp: int) -> int:
        """Expert weights of one MoE layer on this rank (router excluded)."""
        return self.local_experts * 3 * h * self.ffn // tp


def moe_layer_saved(x: Shape, n: Numerics, moe: MoEShape, recompute: str = "none") -> Dict[str, int]:
    """A decoder layer whose MLP is ``MoELayer`` with the default router (softmax over the top-k logits, fp32,
    aux_loss): the router keeps its fp32 input (and, with 16-bit params, an fp32 copy of its weight), the logits,
    scores, logsumexp (z loss), top-k ids and weights of its own S/tp (SP) tokens, the aux statistics; the dispatch
    keeps the kept order and token ids (padding: also the slots, the unpadded rows and weights, the padded token
    ids); the experts keep their input rows (cast), gate, up (+ silu) and the SwiGLU product, grouped-GEMM offsets;
    the combine keeps the weights (cast), the expert outputs and the weighted outputs. A shared expert keeps what a
    dense MLP keeps. Checked byte for byte on CPU (tests/test_memory_features.py)."""
    out = layer_saved(x, n, recompute)
    S, Sl, h, E, k = x.S, x.Sn, x.h, moe.num_experts, moe.topk
    A, R, Fl = moe.kept(S), moe.rows(S), moe.ffn // x.t
    lin = n.e if n.cast else n.r  # a linear's saved input: the autocast copy, or the tensor itself
    shared = moe.shared // x.t
    # q/k/v's input, and the shared expert's: its autocast copy, or the norm output itself unless that is fp32 and
    # so already the router's input
    shared_in = lin * Sl * h if moe.shared and (n.cast or n.r < 4) else 0
    out["linear_inputs"] = out["linear_inputs"] // 2 + shared_in
    router = 4 * Sl * h + 8 * Sl * E + 4 * Sl + 12 * Sl * k + 4 * (2 * E + 2) + 12  # + stats, 3 loss scalars
    experts = 16 * A + lin * R * h + (3 if n.fused else 4) * n.e * R * Fl + 12 * moe.local_experts
    combine = n.e * R + 2 * n.e * R * h
    if moe.pad and moe.capacity(S) is not None:
        experts += 8 * A + n.r * A * h + 4 * A + 8 * R  # slots, the unpadded rows and weights, padded token ids
    shared_mlp = swiglu_saved(Shape(x.b, x.s, h, moe.shared, x.a, x.g, x.V, x.t, x.sp), n) if moe.shared else 0
    out["mlp"] = router + experts + combine + shared_mlp
    casts = 0
    if n.cast:
        casts = n.e * (x.layer_matmul_params - 3 * x.ffn_weight + 3 * moe.local_experts * h * Fl + 3 * h * shared)
    out["weight_casts"] = casts + (4 * E * h if n.r < 4 else 0)  # the router's fp32 weight copy
    return out


def moe_layer_params(cfg, moe: MoEShape, tp: int) -> Dict[str, int]:
    """One MoE layer's MLP part on a tp rank: 'experts' (this rank's experts: expert-parallel, reduced over the
    expert-data-parallel group), 'router' and 'dense' (the shared expert), both replicated over ep and reduced over
    all of dp like every dense weight."""
    h = cfg.hidden_size
    return {"experts": moe.expert_params(h, tp), "router": h * moe.num_experts, "dense": 3 * h * moe.shared // tp}
