"""Selective recompute by submodule: Megatron's ``--recompute-modules`` under ``--recompute-granularity selective``.

Without the flag, selective keeps megallama's earlier behaviour: the two norms and the dense MLP's SwiGLU are
checkpointed (``LlamaDecoderLayer.recompute_norm``, ``LlamaMLP.recompute_activation``). With it, exactly the listed
modules are recomputed, as Megatron-Core does:

  core_attn       the attention core (softmax(QK^T)V after RoPE), checkpointed: keeps q, k, v
  layernorm       input_layernorm and post_attention_layernorm, output-discarding: the norm output that q/k/v
                  (gate/up, the router) keep is freed after the sublayer's forward and rebuilt at its backward
  mlp             the dense MLP, checkpointed: keeps its input only
  moe             the whole MoE layer (router, dispatch, experts, shared expert), checkpointed
  moe_act         the routed experts' SwiGLU, output-discarding (what the down projection keeps); with moe too,
                  moe alone applies (the checkpointed layer keeps no SwiGLU output anyway)
  shared_experts  the shared expert (with its gate), checkpointed
  mla_up_proj     refused: megallama has no multi-latent attention

Checkpointed modules re-run their collectives (SP all-gathers, ep all-to-alls) in backward, as in Megatron.
``CheckpointWithoutOutput`` is Megatron's output-discarding checkpoint: the function runs without a graph and saves
its inputs; its output's storage is emptied once the consumer has saved it, and refilled by a hook on the
consumer's output before the consumer's backward reads it.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from megallama.errors import ConfigError

RECOMPUTE_MODULES = ("core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts")
MEGATRON_DEFAULT = ("core_attn",)


def check_recompute_modules(granularity: Optional[str], modules: Optional[Sequence[str]]) -> Optional[tuple]:
    """The validated module tuple (None: the flag was not given). One ConfigError line per mistake."""
    if modules is None:
        return None
    if granularity != "selective":
        raise ConfigError("--recompute-modules selects what --recompute-granularity selective recomputes; add "
                          "--recompute-granularity selective or drop --recompute-modules")
    bad = [m for m in modules if m not in RECOMPUTE_MODULES]
    if bad:
        raise ConfigError(f"--recompute-modules {bad[0]} is not one of {', '.join(RECOMPUTE_MODULES)}; pick from "
                          "those")
    if "mla_up_proj" in modules:
        raise ConfigError("--recompute-modules mla_up_proj recomputes multi-latent attention's up projection, and "
                          "megallama has no MLA; drop mla_up_proj")
    return tuple(dict.fromkeys(modules))


def check_recompute_modules_args(args) -> None:
    """For argument checks: validates and normalises ``args.recompute_modules`` in place."""
    args.recompute_modules = check_recompute_modules(getattr(args, "recompute_granularity", None),
                                                     getattr(args, "recompute_modules", None))
    discarding = sorted({"layernorm", "moe_act"} & set(args.recompute_modules or ()))
    if discarding and getattr(args, "compile", False):  # storage resizes inside a compiled layer: not verified
        raise ConfigError(f"--recompute-modules {' '.join(discarding)} (output-discarding) is not supported with "
                          "--compile; drop --compile or those modules")


def apply_selective_recompute(model, modules: Optional[Iterable[str]] = None) -> None:
    """Mark the decoder layers of ``model`` (a ``LlamaForCausalLM`` or its ``.model``) for selective recompute of
    ``modules`` (None: megallama's default, the norms and the dense SwiGLU)."""
    from megallama.model.moe import MoELayer
    inner = getattr(model, "model", model)
    chosen = None if modules is None else set(check_recompute_modules("selective", list(modules)))
    for layer in inner.layers.values():
        mlp, moe = layer.mlp, isinstance(layer.mlp, MoELayer)
        if chosen is None:
            layer.recompute_norm = True
            if hasattr(mlp, "recompute_activation"):
                mlp.recompute_activation = True
            continue
        layer.discard_norm_output = "layernorm" in chosen
        layer.self_attn.recompute_core_attention = "core_attn" in chosen
        layer.recompute_mlp = ("moe" if moe else "mlp") in chosen
        if moe:
            mlp.experts.recompute_activation = "moe_act" in chosen and "moe" not in chosen  # moe keeps less
            mlp.recompute_shared_experts = "shared_experts" in chosen and mlp.shared_experts is not None


def checkpointed(fn, *args):
    """``fn(*args)`` under non-reentrant activation checkpointing when a graph is being built, else plainly."""
    if not torch.is_grad_enabled():
        return fn(*args)
    from torch.utils.checkpoint import checkpoint
    return checkpoint(fn, *args, use_reentrant=False)


class _NoOutputFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, owner, *args):
        with torch.no_grad():
            out = run(*args)
        ctx.save_for_backward(*args)
        owner.ctx = ctx
        return out

    @staticmethod
    def backward(ctx, grad):
        inputs, outputs = ctx.recomputed
        ctx.recomputed = None
        torch.autograd.backward(outputs, grad)
        return (None, None) + tuple(t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None
                                    for t in inputs)


class CheckpointWithoutOutput:
    """One use: ``y = ck.checkpoint(fn, *inputs)``, run the consumer ``z = g(y)``, then
    ``ck.discard_output_and_register_recompute(z)``. ``fn`` must return one tensor and be deterministic."""

    def __init__(self):
        self.run, self.ctx, self.output = None, None, None

    def checkpoint(self, run, *args):
        self.run = run
        self.output = _NoOutputFunction.apply(run, self, *args)
        return self.output

    def discard_output_and_register_recompute(self, hook_tensor: torch.Tensor) -> None:
        if not hook_tensor.requires_grad or torch._C._current_graph_task_id() != -1:
            return  # no backward reads it; or this is an enclosing checkpoint's recompute, which backward reads now
        self.output.untyped_storage().resize_(0)
        hook_tensor.register_hook(self._recompute)

    def _recompute(self, grad):
        saved = self.ctx.saved_tensors
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in saved]
        with torch.enable_grad():
            out = self.run(*inputs)
        storage = self.output.untyped_storage()
        storage.resize_(out.untyped_storage().size())
        with torch.no_grad():
            storage.copy_(out.untyped_storage())
        self.ctx.recomputed = (inputs, out)
        self.run, self.ctx, self.output = None, None, None
        return grad
