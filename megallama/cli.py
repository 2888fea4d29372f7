"""``python -m megallama.cli train | generate | estimate-memory | benchmark | validate-env`` (console script
``megallama``).

``train`` takes ``pretrain_llama.py``'s flags and the seed's aliases (--model --gpus --nodes --strategy --lora-rank
--zero-stage --activation-checkpointing --gradient-compression --mixed-precision --tensor-parallel
--pipeline-parallel --batch-size --epochs --data --dry-run). With --gpus x --nodes > 1 outside torchrun it re-launches
itself through ``torch.distributed.run`` (one process per GPU; multi-node rendezvous from MASTER_ADDR, MASTER_PORT
and NODE_RANK). ``--dry-run`` prints the resolved configuration and the memory estimate (with the vocabulary the run
builds: the tokenizer's, padded, unless --vocab-size or --mock-data) and exits 0 without building the model. A user
mistake prints one line and exits 2.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import List, Optional, Sequence

from megallama.errors import ConfigError

USAGE = """usage: python -m megallama.cli {train,generate,estimate-memory,benchmark,validate-env} [flags]

  train            train (pretrain_llama.py flags + the seed's aliases; --dry-run to only resolve and estimate)
  generate         sample text from a checkpoint (--load DIR --prompt TEXT; torchrun for tensor parallel)
  estimate-memory  per-GPU memory of a model and layout (--json, --auto-configure)
  benchmark        tok/s, MFU, peak memory for --batch-sizes (real training steps)
  validate-env     torch / CUDA / NCCL / kernels / disk checks
"""


def _value(argv: Sequence[str], flag: str, default=None):
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return default


def _world(argv: Sequence[str]):
    """(--gpus, --nodes), read before the flags are parsed (they decide the launch); a bad value is one line."""
    out = []
    for flag in ("--gpus", "--nodes"):
        raw = _value(argv, flag, "1")
        try:
            out.append(int(raw))
        except ValueError:
            raise ConfigError(f"{flag} {raw} is not a whole number") from None
        if out[-1] < 1:
            raise ConfigError(f"{flag} must be >= 1, got {out[-1]}")
    return tuple(out)


def _launcher(argv: List[str], gpus: int, nodes: int) -> List[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus)]
    if nodes > 1:
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "29500")
        rank = os.environ.get("NODE_RANK", os.environ.get("SLURM_NODEID"))
        if not addr or rank is None:
            raise ConfigError(f"--nodes {nodes} needs MASTER_ADDR and NODE_RANK (or SLURM_NODEID) in the environment "
                              "on every node; export them or launch with torchrun yourself")
        cmd += ["--nnodes", str(nodes), "--node_rank", str(rank), "--master_addr", addr, "--master_port", port]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "megallama.cli", "train", *argv]


def dry_run(argv: List[str]) -> int:
    """Resolve the flags for the requested world size and print them with the memory estimate; build nothing."""
    from megallama.arguments import parse_args
    from megallama.autoconfig_args import follow_tokenizer
    from megallama.memory_advice import format_table
    from megallama.memory_args import estimate_for_args
    gpus, nodes = _world(argv)
    args = parse_args(argv, world_size=gpus * nodes)
    vocab = follow_tokenizer(args)  # the embedding the run builds (build_data resizes it to the tokenizer)
    lines = ["resolved configuration:"]
    lines += [f"  {k:40s} {getattr(args, k)}" for k in sorted(vars(args)) if k != "model_config"]
    lines.append(f"  model_config {args.model_config.to_dict()}")
    lines.append(f"  {vocab}")
    print("\n".join(lines))
    est = estimate_for_args(args, gpus, nodes)  # the pipeline split is checked here too
    print()
    print(format_table(est))
    return 0


def _wait(proc) -> int:
    """Wait for the launcher; Ctrl-C reached it too (same process group) and it stops the ranks, so keep waiting
    instead of killing it (``subprocess.call`` would, orphaning the ranks); a second Ctrl-C sends it SIGTERM."""
    interrupts = 0
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts > 1:
                proc.terminate()


def _asks_help(argv: Sequence[str]) -> bool:
    flags = list(argv)[:list(argv).index("--")] if "--" in argv else list(argv)
    return "-h" in flags or "--help" in flags


def _help(build_parser, prog: str) -> int:
    """A subcommand's --help under its own name: its parser is shared with a script and named for that
    (``usage: megallama`` for ``megallama train``, ``usage: estimate-memory``)."""
    p = build_parser()
    p.prog = prog
    p.print_help()
    return 0


def train(argv: List[str]) -> int:
    if _asks_help(argv):  # before --dry-run or --gpus relaunch: help is printed, nothing runs
        from megallama.arguments import build_parser
        return _help(build_parser, "megallama train")
    if "--dry-run" in argv:
        return dry_run(argv)
    gpus, nodes = _world(argv)
    if gpus * nodes > 1 and "WORLD_SIZE" not in os.environ:
        return _wait(subprocess.Popen(_launcher(argv, gpus, nodes)))
    from megallama.arguments import parse_args
    from megallama.environment import validate_environment
    from megallama.training import pretrain
    args = parse_args(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        env = validate_environment(args.save)
        for e in env["errors"]:
            print(f"environment error: {e}", file=sys.stderr)
        for w in env["warnings"]:
            print(f"environment warning: {w}", file=sys.stderr)
    pretrain(args)
    return 0


def benchmark(argv: List[str]) -> int:
    import torch
    if torch.cuda.is_available():  # the GPU tool takes the seed's flags as they are
        tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "benchmark.py")
        return subprocess.call([sys.executable, tool, *argv])
    import json
    from megallama.benchmarking import PerformanceBenchmark
    from megallama.arg_parser import OneLineErrorParser
    p = OneLineErrorParser("megallama benchmark")
    p.add_argument("--model", default="tiny_llama3_150m")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--save-results", default=None)
    p.add_argument("--megallama-args", default="", help="extra training flags, e.g. '--num-layers 2'")
    a = p.parse_args(argv)  # a mistyped flag (--batch-size for --batch-sizes) is an error, not ignored
    check_results_path(a.save_results)
    bench = PerformanceBenchmark(a.model, a.batch_sizes, a.seq_length, a.gpus, a.steps,
                                 extra_args=shlex.split(a.megallama_args), device="cpu")
    rows = bench.run_comprehensive_benchmark()
    bench.print_summary()
    if a.save_results:
        with open(a.save_results, "w") as fh:
            json.dump({"card": "cpu", "model": a.model, "rows": rows}, fh, indent=1)
    return 0 if all("error" not in r for r in rows) else 1


def check_results_path(path: Optional[str], flag: str = "--save-results") -> None:
    """An output file is checked before the benchmark runs, not when its results are written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    why = "is a directory" if os.path.isdir(path) else None if os.path.isdir(folder) else f"{folder} does not exist"
    if why:
        raise ConfigError(f"{flag} {path}: {why}; name a file in an existing folder")


def validate_env(argv: List[str]) -> int:
    from megallama.arg_parser import OneLineErrorParser
    from megallama.environment import format_environment, validate_environment
    p = OneLineErrorParser("megallama validate-env", description="torch / CUDA / NCCL / kernels / disk checks")
    p.add_argument("--path", default=None, help="the directory whose free disk space to check (e.g. --save)")
    report = validate_environment(p.parse_args(argv).path)
    print(format_environment(report))
    return 1 if report["errors"] else 0


COMMANDS = {"train": train, "generate": None, "estimate-memory": None, "benchmark": benchmark,
            "validate-env": validate_env}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        from megallama.initialize import launch_rank
        if launch_rank() == 0:  # under torchrun: once, not once per rank
            print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command '{cmd}'; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if cmd == "estimate-memory":
        from megallama.memory_cli import build_parser, main as estimate_main
        return _help(build_parser, "megallama estimate-memory") if _asks_help(rest) else estimate_main(rest)
    if cmd == "generate":
        from megallama.generation_cli import main as generate_main
        return generate_main(rest)
    try:
        return COMMANDS[cmd](rest)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line, no traceback (also while torchrun runs the ranks)
        from megallama.initialize import interrupted_line
        if int(os.environ.get("RANK", "0")) == 0:
            print(interrupted_line(e), file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
