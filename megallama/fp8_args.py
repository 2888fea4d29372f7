"""Megatron-LM's FP8 flags (``--fp8-format``, ``--fp8-recipe`` ...) and their checks.

Megatron runs ``--bf16 --fp8-format hybrid`` through Transformer Engine; here the decoder's tensor-parallel linears
run ``torch._scaled_mm`` themselves (``mpu.fp8`` / ``mpu.fp8_linear``) with either recipe: ``tensorwise`` (current
scaling) or ``delayed`` (scales from an amax history, ``mpu.fp8_delayed``). Megatron's default is delayed; here it
is tensorwise unless the line asks for delayed, by ``--fp8-recipe delayed`` or by giving its knobs
(``--fp8-amax-history-len``, ``--fp8-amax-compute-algo``, as NVIDIA's fp8 scripts do): tensorwise is the recipe
verified on GPUs (the delayed path's CUDA test has not passed on a GPU yet), and a knob of the other recipe is
never ignored. The embedding, the output layer, attention and norms stay in bf16. Megatron's old ``--fp8-hybrid`` /
``--fp8-e4m3`` switches still name the format.
"""
from __future__ import annotations

from megallama.errors import ConfigError
from megallama.mpu.fp8 import ALIGN, AMAX_COMPUTE_ALGOS, FORMATS, RECIPES, Fp8Recipe


def add_fp8_args(p) -> None:
    g = p.add_argument_group("fp8 (Megatron names)")
    g.add_argument("--fp8-format", dest="fp8", choices=FORMATS, default=None,
                   help="run the decoder's linear layers in fp8: e4m3 everywhere, or hybrid (e4m3 forward, e5m2 "
                        "gradients); needs --bf16")
    g.add_argument("--fp8-hybrid", dest="fp8", action="store_const", const="hybrid",
                   help="Megatron's old spelling of --fp8-format hybrid")
    g.add_argument("--fp8-e4m3", dest="fp8", action="store_const", const="e4m3",
                   help="Megatron's old spelling of --fp8-format e4m3")
    g.add_argument("--fp8-recipe", choices=RECIPES, default=None,
                   help="scaling recipe: tensorwise (current scaling: each tensor's scale from its own amax; the "
                        "default) or delayed (Megatron's default: each tensor's scale from an amax history of past "
                        "steps, reduced over data x tensor x context parallel ranks; implied by its two knobs)")
    g.add_argument("--fp8-margin", type=int, default=0, help="scale down by 2**margin below the format's maximum")
    g.add_argument("--fp8-interval", type=int, default=1,
                   help="deprecated and ignored, as in Megatron and Transformer Engine (scales update every step)")
    g.add_argument("--fp8-amax-history-len", type=int, default=None,
                   help="delayed scaling: steps of amax history per tensor (default 1)")
    g.add_argument("--fp8-amax-compute-algo", choices=AMAX_COMPUTE_ALGOS, default=None,
                   help="delayed scaling: the history's max, or its most recent amax (default most_recent)")
    g.add_argument("--fp8-param-gather", action="store_true", help="not supported: parameters stay 16-bit")


def fp8_recipe_from_args(args):
    """The ``Fp8Recipe`` of a checked command line, or None without --fp8-format."""
    fmt = getattr(args, "fp8", None)
    if not fmt:
        return None
    knobs = args.fp8_amax_history_len is not None or args.fp8_amax_compute_algo is not None
    recipe = args.fp8_recipe or ("delayed" if knobs else "tensorwise")
    if recipe == "tensorwise" and knobs:
        raise ConfigError("--fp8-amax-history-len and --fp8-amax-compute-algo apply to --fp8-recipe delayed, not "
                          "tensorwise; drop them or pass --fp8-recipe delayed")
    history = 1 if args.fp8_amax_history_len is None else args.fp8_amax_history_len
    return Fp8Recipe(fmt, args.fp8_margin, recipe, history, args.fp8_amax_compute_algo or "most_recent")


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
        given = [flag for flag, v in (("--fp8-recipe", args.fp8_recipe), ("--fp8-amax-history-len",
                                      args.fp8_amax_history_len), ("--fp8-amax-compute-algo",
                                      args.fp8_amax_compute_algo), ("--fp8-margin", args.fp8_margin or None))
                 if v is not None]
        if given:  # Megatron ignores them without a format; here a flag does something or is refused
            raise ConfigError(f"{given[0]} configures fp8, but no --fp8-format was given (the run would be plain "
                              "16-bit); add --fp8-format hybrid or drop it")
        return
    if not args.bf16:
        raise ConfigError(f"--fp8-format {args.fp8} needs --bf16 (the GEMMs write bf16 and the rest of the model "
                          "runs in it); add --bf16")
    if args.fp8_param_gather:
        raise ConfigError("--fp8-param-gather is not supported (parameters and their all-gathers stay bf16); drop it")
    if args.fp8_margin < 0:
        raise ConfigError(f"--fp8-margin must be >= 0, got {args.fp8_margin}")
    fp8_recipe_from_args(args)  # the recipe's own checks (--fp8-amax-history-len >= 1)
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
    how = (f"delayed scaling, amax history {recipe.amax_history_len} steps, {recipe.amax_compute_algo}"
           if recipe.delayed else "tensorwise current scaling")
    print_rank_0(f"fp8: {n} decoder linear layers in {recipe.format} ({how}, margin {recipe.margin}); embedding and "
                 "output layer in bf16")
