"""Training logs: one Megatron-style line per interval, TensorBoard and (optional) W&B scalars (the progress bar is
megallama/progress.py).

The log line and the validation report carry Megatron's labels and number formats (format_log_line,
format_validation_lines), so that a parser written for Megatron's logs reads these; megallama's own fields
("tokens per second", "MFU", "mem GiB") are extra "label: value |" pairs in the same shape.

TensorBoard tags are Megatron's, so runs of both sit side by side in one TensorBoard: every
``--tensorboard-log-interval`` iterations "learning-rate", "batch-size", "lm loss" (that iteration's), "loss-scale",
"grad-norm", "num-zeros"/"params-norm" (when logged), "world-size" (--log-world-size-to-tensorboard), each also
"<tag> vs samples" against consumed samples; "lm loss validation" (and "... ppl" with
--log-validation-ppl-to-tensorboard) and "lm loss test" when evaluated; "iteration-time" (s) and "throughput"
(TFLOP/s per GPU) per --log-interval with --log-timers-to-tensorboard; "mem-*-bytes" with --log-memory-to-tensorboard
(CUDA). megallama's own: "tokens-per-second" and "mfu" per --log-interval, "comm/*" (gradient compression), "moe/*".

Throughput figures follow the project's convention: FLOPs/token = 6 * (matmul params incl. the output layer)
+ 12 * layers * hidden * seq; MFU is against the card's dense bf16 peak (H100 SXM: 989 TFLOP/s). fp8 runs
(--fp8-format) count the same FLOPs against the same bf16 peak, as Megatron does: its "throughput per GPU
(TFLOP/s/GPU)" divides the same num_floating_point_operations by time whatever the GEMM precision, and names no
peak; so an fp8 run's MFU compares with a bf16 run's directly (its fp8 GEMMs' own ceiling is twice that peak).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch

_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                "A10": 125.0, "4090": 165.0}


def device_peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tf in _PEAK_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def flops_per_token(cfg, seq_length: int, moe=None) -> float:
    """``moe`` (a MoEConfig): its sparse layers count the FFNs a token runs through, as Megatron's
    num_floating_point_operations: top-k experts of the expert FFN size plus the shared expert (no router GEMM)."""
    h, L, f = cfg.hidden_size, cfg.num_layers, cfg.ffn_hidden_size
    kv = cfg.num_query_groups * cfg.head_dim
    ffn = L * f
    if moe is not None:
        sparse = len(moe.layers) if moe.layers is not None else L
        ffn += sparse * (moe.topk * (moe.ffn_hidden_size or f) + (moe.shared_expert_intermediate_size or 0) - f)
    matmul = L * (2 * h * h + 2 * h * kv) + 3 * h * ffn + cfg.vocab_size * h
    return 6.0 * matmul + 12.0 * L * h * seq_length


class TrainingLogger:
    def __init__(self, args, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.wandb = None
        if not enabled:
            return
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=args.tensorboard_dir,
                                        max_queue=getattr(args, "tensorboard_queue_size", 1000))
        if args.wandb_project:
            try:
                import wandb
            except ImportError:
                print("warning: --wandb-project given but wandb is not installed (pip install megallama[wandb]); "
                      "logging to TensorBoard only", file=sys.stderr)
            else:
                os.environ.setdefault("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")
                self.wandb = wandb.init(project=args.wandb_project, name=args.wandb_exp_name,
                                        dir=args.wandb_save_dir or args.tensorboard_dir or ".",
                                        config={k: v for k, v in vars(args).items()
                                                if isinstance(v, (int, float, str, bool, type(None)))})

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if v is not None}, step=step)

    def scalars_with_samples(self, step: int, consumed: int, values: dict) -> None:
        """Each value at the iteration, and (TensorBoard only: W&B has its own axes) as "<tag> vs samples" at the
        consumed sample count, as Megatron writes them."""
        self.scalars(step, values)
        if self.enabled and self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(f"{k} vs samples", v, consumed)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def memory_scalars(device: torch.device) -> dict:
    """--log-memory-to-tensorboard: the CUDA caching allocator's counters (Megatron's tags); none on CPU."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {"mem-reserved-bytes": stats["reserved_bytes.all.current"],
            "mem-allocated-bytes": stats["allocated_bytes.all.current"],
            "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"],
            "mem-allocated-count": stats["allocation.all.current"]}


# the log line's fields in Megatron's order and formats (its parsers read them); megallama's own (tokens per second,
# MFU, mem GiB) sit before the skip counts, which print under Megatron's labels
_LOG_FIELDS = (("consumed samples", "{:12d}"), ("elapsed time per iteration (ms)", "{:.1f}"),
               ("throughput per GPU (TFLOP/s/GPU)", "{:.1f}"), ("learning rate", "{:.6E}"),
               ("decoupled learning rate", "{:.6E}"), ("global batch size", "{:5d}"), ("lm loss", "{:.6E}"),
               ("loss scale", "{:.1f}"), ("grad norm", "{:.3f}"), ("num zeros", "{:.1f}"), ("params norm", "{:.3f}"),
               ("tokens per second", "{:.1f}"), ("MFU", "{:.1%}"), ("mem GiB", "{:.2f}"),
               ("skipped iterations", "{:3d}"), ("nan iterations", "{:3d}"))
_LABELS = {"skipped iterations": "number of skipped iterations", "nan iterations": "number of nan iterations"}


def format_log_line(iteration: int, train_iters: int, values: dict) -> str:
    """Megatron's training log line. Norms are fixed-point as there (``{:.3f}``): a parser's ``[0-9.]+`` would
    read an E-notation "6.0E-01" as 6.0."""
    parts = [f"iteration {iteration:8d}/{train_iters:8d}"]
    for key, fmt in _LOG_FIELDS:
        v = values.get(key)
        if v is not None:
            parts.append(f"{_LABELS.get(key, key)}: {fmt.format(v)}")
    return " | ".join(parts) + " |"


def format_validation_lines(where: str, loss: float, ppl: float) -> str:
    """Megatron's validation report (its evaluate_and_print_results), framed by dashes: ``where`` is "iteration N"
    during training, "iteration N on validation set" / "on test set" at its end. "lm loss value" keeps a
    training-loss parser's "lm loss: " off the validation losses."""
    line = f" validation loss at {where} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} | "
    rule = "-" * (len(line) + 1)
    return f"{rule}\n{line}\n{rule}"
