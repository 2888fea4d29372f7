"""What the Python examples share: their command line, the tiny CPU override, the data flags and the report.

Every example runs its real model size by default (on GPUs, one process per GPU under torchrun) and, with
``--tiny`` or ``MEGALLAMA_EXAMPLE_TINY=1``, the same code on a 2-layer model for a few steps on CPU on the bundled
data; ``--dry-run`` prints the real run's configuration and memory estimate from one process: for the GPUs the
example is launched on (its docstring's count; ``--gpus`` / ``--nodes`` plan another, torchrun's launch plans its
own). tests/test_examples.py runs both.
"""
from __future__ import annotations

import argparse
import math
import os

import megallama
from megallama.errors import ConfigError

# 2 layers, hidden 64: a few hundred ms a step on one CPU core. The vocabulary follows the bundled tokenizer (8192).
TINY_SHAPE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2)
TINY_ITERS = 3


def example_parser(doc: str, gpus: int = 8, nodes: int = 1) -> argparse.ArgumentParser:
    """The examples' flags; ``gpus`` x ``nodes``: the launch the example is written for, which --dry-run prices."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", default=os.environ.get("MEGALLAMA_EXAMPLE_TINY") == "1",
                   help="a 2-layer model for a few steps on CPU on the bundled data (or MEGALLAMA_EXAMPLE_TINY=1)")
    p.add_argument("--train-iters", type=int, default=None, help="optimizer steps (default: the example's)")
    p.add_argument("--data-path", default=None, help="a .jsonl file or .bin/.idx prefix (default: bundled data)")
    p.add_argument("--tokenizer-model", default=None, help="the model's tokenizer (Llama 3: the tiktoken "
                   "tokenizer.model; Llama 2: the sentencepiece .model); default: the bundled 8K BPE")
    p.add_argument("--tokenizer-type", default=None, help="default: llama3 for a 128K vocabulary, else sentencepiece")
    p.add_argument("--dry-run", action="store_true", help="print the configuration and per-GPU memory estimate of "
                   f"the run this example launches ({nodes * gpus} GPUs; --gpus/--nodes for another) and exit")
    p.add_argument("--gpus", type=_positive, default=None, help=f"with --dry-run: GPUs per node to plan for "
                   f"(default {gpus}; 1 with --tiny; under torchrun the launched processes)")
    p.add_argument("--nodes", type=_positive, default=None, help=f"with --dry-run: nodes to plan for (default {nodes})")
    p.set_defaults(launch_gpus=gpus, launch_nodes=nodes)
    return p


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number >= 1")
    return int(text)


def launch_shape(args=None) -> tuple:
    """(nodes, GPUs per node) of the run: torchrun's launch (WORLD_SIZE, LOCAL_WORLD_SIZE; 1 x 1 for plain python),
    or for a one-process --dry-run the launch the example is written for (``--gpus`` x ``--nodes`` override it), so
    that the dry run prices the run it stands for, not a 1-process one."""
    launched = "WORLD_SIZE" in os.environ
    if args is not None and args.dry_run and not launched:
        if args.tiny:  # the CPU override runs on one process unless asked otherwise
            return args.nodes or 1, args.gpus or 1
        return args.nodes or args.launch_nodes, args.gpus or args.launch_gpus
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if args is not None and launched and (args.gpus or args.nodes) and \
            (args.gpus or per_node) * (args.nodes or 1) != world:
        raise ConfigError(f"--gpus/--nodes plan {(args.gpus or per_node) * (args.nodes or 1)} GPUs but torchrun "
                          f"launched {world} processes; drop --gpus/--nodes under torchrun")
    return (world // per_node, per_node) if per_node and world % per_node == 0 else (1, world)


def world_size(args=None) -> int:
    """Processes of the run (``launch_shape``: torchrun's WORLD_SIZE, 1 for plain python, the planned launch for a
    one-process --dry-run)."""
    nodes, per_node = launch_shape(args)
    return nodes * per_node


def is_rank_0() -> bool:
    """Rank 0 of the launch (before the process group exists, from torchrun's RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def tiny_training_config(world: int = 0, **overrides) -> megallama.TrainingConfig:
    """The CPU override's training settings: fp32, 4 sequences of 64 tokens a step (2 per rank with more ranks, so
    every data-parallel size divides it), TINY_ITERS steps; ``world``: the processes (default: launched)."""
    base = dict(model_name="tiny", batch_size=max(4, 2 * (world or world_size())), micro_batch_size=2,
                sequence_length=64, learning_rate=3e-3, train_iters=TINY_ITERS, warmup_iters=1,
                mixed_precision="fp32", log_interval=1)
    base.update(overrides)
    return megallama.TrainingConfig(**base)


def model_overrides(args, model_variant: str, **tiny_extra) -> dict:
    """--tiny: the CPU shape; otherwise the model's own vocabulary, which ``run_flags`` keeps at launch
    (--vocab-size), so that the plan prices the run that is launched (without it the API plans the bundled 8K
    tokenizer's vocabulary)."""
    if args.tiny:
        return dict(TINY_SHAPE, **tiny_extra)
    from megallama.config import get_model_config
    return {"vocab_size": get_model_config(model_variant).vocab_size}


def run_flags(args, vocab_size: int) -> dict:
    """Extra ``pretrain_llama.py`` flags for ``launch_training``/``fit``: CPU for --tiny; otherwise the data,
    the tokenizer and the model's own vocabulary (the bundled 8K tokenizer would otherwise shrink it)."""
    flags = {"data_path": args.data_path, "train_iters": args.train_iters}
    if args.tiny:
        flags.update(device="cpu", no_progress_bar=True)
    else:
        flags["vocab_size"] = vocab_size
    if args.tokenizer_model:
        flags.update(tokenizer_type=args.tokenizer_type or ("llama3" if vocab_size > 100_000 else "sentencepiece"),
                     tokenizer_model=args.tokenizer_model)
    return {k: v for k, v in flags.items() if v is not None}


def dry_run(orchestrator, args) -> int:
    """--dry-run: the configuration and its memory estimate, and the flags resolved for the planned world size
    (``launch_shape``); no process group, no model."""
    if is_rank_0():
        orchestrator.print_configuration()
    orchestrator.build_args(world_size(args))  # ConfigError if the layout does not resolve for this many processes
    return 0


def report(summary: dict) -> int:
    """Print the loss curve on rank 0; exit status 1 when a loss is not finite."""
    losses = summary.get("losses", {})
    finite = bool(losses) and all(math.isfinite(v) for v in losses.values())
    if is_rank_0():
        steps = sorted(losses)
        curve = " -> ".join(f"{losses[s]:.4f}" for s in steps[:1] + steps[-1:]) if steps else "none"
        print(f"trained {len(steps)} iterations, loss {curve}", flush=True)
    return 0 if finite else 1


def run_example(body) -> int:
    """``sys.exit(run_example(main))``: a user mistake (ConfigError) is one line from rank 0 and exit status 2,
    the process group is always torn down (``initialize.run_script``), else ``body``'s status."""
    from megallama.initialize import run_script
    status = []
    code = run_script(lambda: status.append(body()))
    return code or (status[0] if status else 0)
