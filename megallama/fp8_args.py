"""Megatron-LM's FP8 flags (``--fp8-format``, ``--fp8-recipe`` ...) and their checks.

Megatron runs ``--bf16 --fp8-format hybrid --fp8-recipe tensorwise`` through Transformer Engine; here the decoder's
tensor-parallel linears run ``torch._scaled_mm`` themselves (``mpu.fp8`` / ``mpu.fp8_linear``): current
(tensorwise) scaling only. Delayed scaling's amax history would be state to checkpoint and keep in step over tp;
it is refused with the flag to use instead. The embedding, the output layer, attention and norms stay in bf16.
"""
from __future__ import annotations

from megallama.errors import ConfigError
from megallama.mpu.fp8 import ALIGN, FORMATS, Fp8Recipe


def add_fp8_args(p) -> None:
    g = p.add_argument_group("fp8 (Megatron names)")
    g.add_argument("--fp8-format", dest="fp8", choices=FORMATS, default=None,
                   help="run the decoder's linear layers in fp8: e4m3 everywhere, or hybrid (e4m3 forward, e5m2 "
                        "gradients); needs --bf16")
    g.add_argument("--fp8-recipe", choices=("tensorwise", "delayed"), default="tensorwise",
                   help="scaling recipe: tensorwise (current scaling: each tensor's scale from its own amax); "
                        "delayed is not implemented")
    g.add_argument("--fp8-margin", type=int, default=0, help="scale down by 2**margin below the format's maximum")
    g.add_argument("--fp8-interval", type=int, default=1, help="delayed scaling only (accepted, as Megatron)")
    g.add_argument("--fp8-amax-history-len", type=int, default=1, help="delayed scaling only (accepted)")
    g.add_argument("--fp8-amax-compute-algo", choices=("max", "most_recent"), default="most_recent",
                   help="delayed scaling only (accepted)")
    g.add_argument("--fp8-param-gather", action="store_true", help="not supported: parameters stay 16-bit")


def fp8_recipe_from_args(args):
    """The ``Fp8Recipe`` of a checked command line, or None without --fp8-format."""
    fmt = getattr(args, "fp8", None)
    return Fp8Recipe(fmt, args.fp8_margin) if fmt else None


def fp8_linear_shapes(config, tp: int) -> dict:
    """{linear: [out, in] per tp rank} of a decoder layer: the GEMM dims fp8 needs in multiples of 16."""
    h, d = config.hidden_size, config.head_dim
    q, kv, f = config.num_attention_heads * d // tp, config.num_query_groups * d // tp, config.ffn_hidden_size // tp
    return {"q_proj": (q, h), "k_proj/v_proj": (kv, h), "o_proj": (h, q), "gate_proj/up_proj": (f, h),
            "down_proj": (h, f)}


def check_fp8_flags(args) -> None:
    """One ConfigError line for each fp8 combination this code does not run (called once the model is known)."""
    if getattr(args, "fp8", None) is None:
        if args.fp8_param_gather:
            raise ConfigError("--fp8-param-gather needs --fp8-format (and is not supported here); drop it")
        return
    if args.fp8_recipe != "tensorwise":
        raise ConfigError(f"--fp8-recipe {args.fp8_recipe} is not implemented; use --fp8-recipe tensorwise (current "
                          "scaling, no amax history)")
    if not args.bf16:
        raise ConfigError(f"--fp8-format {args.fp8} needs --bf16 (the GEMMs write bf16 and the rest of the model "
                          "runs in it); add --bf16")
    if args.fp8_param_gather:
        raise ConfigError("--fp8-param-gather is not supported (parameters and their all-gathers stay bf16); drop it")
    if args.fp8_margin < 0:
        raise ConfigError(f"--fp8-margin must be >= 0, got {args.fp8_margin}")
    from megallama.strategies import strategy_from_args
    strategy = strategy_from_args(args)
    if strategy.uses_moe:
        raise ConfigError("--fp8-format does not cover MoE experts (their grouped GEMMs have no fp8 path); drop "
                          "--fp8-format or the experts")
    if strategy.uses_lora:
        raise ConfigError("--fp8-format does not cover LoRA adapters; drop --fp8-format or use --strategy standard")
    bad = {name: shape for name, shape in fp8_linear_shapes(args.model_config, args.tensor_model_parallel_size).items()
           if shape[0] % ALIGN or shape[1] % ALIGN}
    if bad:
        name, (o, i) = next(iter(bad.items()))
        raise ConfigError(f"--fp8-format needs linear dims that are multiples of {ALIGN}, but {name} is [{o}, {i}] "
                          f"per tensor-parallel rank; change the hidden/FFN/head sizes or drop --fp8-format")


def apply_fp8(chunks, args) -> None:
    """Turn on fp8 in the decoder layers of every model chunk (after LoRA/MoE conversion, before compile)."""
    recipe = fp8_recipe_from_args(args)
    if recipe is None:
        return
    from megallama.initialize import print_rank_0
    from megallama.mpu.fp8 import enable_fp8
    n = sum(enable_fp8(m.model.layers, recipe) for m in chunks)
    print_rank_0(f"fp8: {n} decoder linear layers in {recipe.format} (tensorwise current scaling, margin "
                 f"{recipe.margin}); embedding and output layer in bf16")
