"""``--load-adapter DIR``: start LoRA from a PEFT adapter folder (``--save-adapter``'s, or HF peft's) instead of a
fresh init, in fine-tuning and in generation.

The folder is checked when the flags are parsed (``adopt_adapter_flags``: it exists, it is a LoRA adapter this code
can apply, its rank/alpha/targets agree with the run's LoRA flags, unset ones taking its values), so a mistake is one
line before anything is built. Its tensors are read after the strategy has added the adapters to the loaded base
(``load_adapter_from_args``); ``strategies.load_adapter`` splits them for any tp/pp layout. A resume (``--load``
holding this run's checkpoint) wins: the checkpoint's adapters were trained further than the folder's.
"""
from __future__ import annotations

import json
import os

from megallama.errors import ConfigError
from megallama.model.lora import LORA_TARGETS, LoRAConfig

_FIX = "pass the folder --save-adapter (or PEFT's save_pretrained) wrote"
# PEFT options that change what the adapter computes or what the file holds, which megallama's LoRA does not do
_UNSUPPORTED = (("use_dora", "DoRA"), ("use_rslora", "rank-stabilised scaling (alpha/sqrt(r))"),
                ("rank_pattern", "per-module ranks"), ("alpha_pattern", "per-module alphas"),
                ("modules_to_save", "fully trained extra modules"), ("layers_to_transform", "a subset of layers"))


def read_adapter_config(path: str, flag: str = "--load-adapter") -> LoRAConfig:
    """The LoRA settings of a PEFT adapter folder, or one ConfigError line saying why it is not one we can apply."""
    if not os.path.exists(path):
        raise ConfigError(f"{flag} {path} does not exist; {_FIX}")
    if not os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a file; {_FIX} (the one that holds it)")
    cfg_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_file):
        from megallama.checkpointing.files import holds_checkpoint
        hint = " (it holds a megallama checkpoint: pass that as --load or --pretrained-checkpoint)" \
            if holds_checkpoint(path) else ""
        raise ConfigError(f"{flag} {path} has no adapter_config.json, so it is not a LoRA adapter folder{hint}; "
                          f"{_FIX}")
    try:
        with open(cfg_file, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{flag} {path}: adapter_config.json cannot be read ({e}); {_FIX}") from None
    if not any(os.path.isfile(os.path.join(path, n)) for n in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ConfigError(f"{flag} {path} holds no adapter_model.safetensors or adapter_model.bin; {_FIX}")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ConfigError(f"{flag} {path} is a {cfg.get('peft_type')} adapter; only LoRA adapters load")
    for key, what in _UNSUPPORTED:
        if cfg.get(key):
            raise ConfigError(f"{flag} {path} uses {what} ({key} in its adapter_config.json), which megallama's "
                              "LoRA does not apply; pass a plain LoRA adapter")
    targets = cfg.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise ConfigError(f"{flag} {path}: target_modules {targets!r} in its adapter_config.json is not a list of "
                          f"module names; megallama adapts named modules ({', '.join(LORA_TARGETS)})")
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise ConfigError(f"{flag} {path} adapts {bad[0]}, which megallama's LoRA does not (it adapts "
                          f"{', '.join(LORA_TARGETS)})")
    try:
        rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))  # PEFT's default alpha is 8
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{flag} {path}: adapter_config.json has no usable rank r ({cfg.get('r')!r}); "
                          f"{_FIX}") from None
    return LoRAConfig(rank=rank, alpha=alpha, dropout=float(cfg.get("lora_dropout") or 0.0),
                      target_modules=list(dict.fromkeys(targets))).validate()


def adopt_adapter_flags(args) -> None:
    """Parse time: the run's LoRA flags left unset take the adapter's values; a given one that disagrees is refused
    (the saved tensors would not fit, or would compute another function)."""
    from megallama.strategies import strategy_from_args
    path = args.load_adapter
    if getattr(args, "strategy", None) not in ("lora", "hybrid"):
        raise ConfigError(f"--load-adapter {path} needs --strategy lora or hybrid (--strategy "
                          f"{getattr(args, 'strategy', None) or 'standard'} has no adapters to load into); add "
                          "--strategy lora")
    theirs = read_adapter_config(path)
    given = {k: getattr(args, k, None) is not None for k in ("lora_rank", "lora_alpha", "lora_target_modules")}
    if not given["lora_rank"]:
        args.lora_rank = theirs.rank
    if not given["lora_alpha"]:
        args.lora_alpha = theirs.alpha
    if not given["lora_target_modules"]:
        args.lora_target_modules = list(theirs.target_modules)
    mine = strategy_from_args(args).lora_config()
    for key, flag in (("rank", "--lora-rank"), ("alpha", "--lora-alpha"), ("target_modules", "--lora-target-modules")):
        a, b = getattr(mine, key), getattr(theirs, key)
        if (sorted(a) == sorted(b)) if key == "target_modules" else a == b:
            continue
        show = (lambda v: ",".join(v)) if key == "target_modules" else (lambda v: f"{v:g}")
        field = {"rank": "r", "alpha": "lora_alpha"}.get(key, key)
        raise ConfigError(f"{flag} {show(a)} does not match the adapter in --load-adapter {path} ({field} "
                          f"{show(b)} in its adapter_config.json); pass {flag} {show(b)}, or drop {flag} to take "
                          "the adapter's")


def load_adapter_from_args(chunks, args) -> None:
    """After the strategy added the adapters to the loaded base: copy the folder's tensors into them (this rank's
    tp shards of its own stage's layers). Skipped on a resume, whose checkpoint holds the adapters trained since."""
    path = getattr(args, "load_adapter", None)
    if not path:
        return
    from megallama.initialize import print_rank_0
    from megallama.strategies import load_adapter
    from megallama.training_setup import resumes_run
    if resumes_run(args):
        print_rank_0(f"--load {args.load} resumes this run: its checkpoint's adapters are loaded, not those of "
                     f"--load-adapter {path}")
        return
    try:
        n = load_adapter(path, chunks)
    except ConfigError as e:
        raise ConfigError(f"--load-adapter {path}: {e}") from None
    print_rank_0(f"LoRA adapters start from {path} ({n} tensors loaded on global rank 0)")


def apply_adapter_for_generation(model, path: str, args, seed: int = 1234) -> LoRAConfig:
    """Generation: add the folder's LoRA adapters to a loaded base model (kept separate, as the fine-tuned run's
    model computes them, so the output equals generating from that run's checkpoint)."""
    from megallama.model.lora import apply_lora
    from megallama.strategies import load_adapter, strategy_from_args
    if strategy_from_args(args).uses_lora:
        raise ConfigError(f"--load-adapter {path}: checkpoint --load already holds LoRA adapters (--strategy "
                          f"{args.strategy}); pass its base model as --load, or drop --load-adapter")
    cfg = read_adapter_config(path)
    cfg.dropout = 0.0
    apply_lora(model, cfg, seed, freeze_base=True)
    try:
        load_adapter(path, [model])
    except ConfigError as e:
        raise ConfigError(f"--load-adapter {path}: {e}") from None
    return cfg
