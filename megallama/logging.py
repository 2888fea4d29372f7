"""Training logs: one Megatron-style line per interval, TensorBoard and (optional) W&B scalars (the progress bar is
megallama/progress.py).

The log line and the validation report carry Megatron's labels and number formats (format_log_line,
format_validation_lines) and are printed by the last rank (Megatron's print_rank_last: under pipeline parallelism a
stage that holds the loss), the log line after Megatron's `` [YYYY-mm-dd HH:MM:SS]`` timestamp, so that a parser
written for Megatron's logs reads these; megallama's own fields ("tokens per second", "MFU", "mem GiB (max over
ranks)": the largest peak allocation of any rank, CUDA only, which under 1F1B is usually stage 0's, not the printing
last rank's; per-rank figures are Megatron's memory report lines) are extra "label: value |" pairs in the same shape.

TensorBoard tags are Megatron's, so runs of both sit side by side in one TensorBoard: every
``--tensorboard-log-interval`` iterations "learning-rate", "batch-size", "lm loss" (that iteration's), "loss-scale",
"grad-norm", "num-zeros"/"params-norm" (when logged), "world-size" (--log-world-size-to-tensorboard), each also
"<tag> vs samples" against consumed samples; "lm loss validation" (and "... ppl" with
--log-validation-ppl-to-tensorboard) and "lm loss test" when evaluated; "iteration-time" (s), "throughput"
(TFLOP/s per GPU) and the timers' "<name>-time" (s per iteration, as Megatron's timers.write) per --log-interval with
--log-timers-to-tensorboard; "mem-*-bytes" with --log-memory-to-tensorboard (CUDA); MoE's "load_balancing_loss" (or
its seq_/global_ variant) and "z_loss" per --log-interval. megallama's own: "tokens-per-second" and "mfu" per
--log-interval, "comm/*" (gradient compression), "moe/max_load". The last rank writes them, as Megatron's.

Throughput figures follow the project's convention: FLOPs/token = 6 * (matmul params incl. the output layer)
+ 12 * layers * hidden * seq; MFU is against the card's dense bf16 peak (H100 SXM: 989 TFLOP/s). fp8 runs
(--fp8-format) count the same FLOPs against the same bf16 peak, as Megatron does: its "throughput per GPU
(TFLOP/s/GPU)" divides the same num_floating_point_operations by time whatever the GEMM precision, and names no
peak; so an fp8 run's MFU compares with a bf16 run's directly (its fp8 GEMMs' own ceiling is twice that peak).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from datetime import datetime
from typing import Optional

import torch
import torch.distributed as dist

from megallama.errors import ConfigError
from megallama.initialize import is_last_rank

# dense bf16 tensor-core peaks (datasheets list twice these "with sparsity"); the first name a device's contains
# wins, so the PCIe and NVL H100s (fewer SMs and lower clocks than the SXM card) come before "H100"
_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "H800": 989.0,
                "A100": 312.0, "A800": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


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


def wandb_dir(args) -> str:
    """--wandb-save-dir, else Megatron's <--save>/wandb, else next to the TensorBoard events (or here)."""
    if args.wandb_save_dir:
        return args.wandb_save_dir
    return os.path.join(args.save, "wandb") if getattr(args, "save", None) else (args.tensorboard_dir or ".")


def check_wandb_installed(args) -> None:
    """--wandb-project without wandb: one line on every rank, before a long run that would log nowhere (a launch
    line is still parsed without it: dry runs and estimates need no wandb)."""
    if getattr(args, "wandb_project", None) and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"--wandb-project {args.wandb_project} needs wandb, which is not installed: "
                          "pip install wandb (or drop --wandb-project)")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _from_last_rank(error: Optional[str]) -> Optional[str]:
    """The last rank's start-up error (None: started) on every rank: one broadcast, so that all stop together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return error
    box = [error]
    dist.broadcast_object_list(box, src=dist.get_world_size() - 1)
    return box[0]


class TrainingLogger:
    """TensorBoard and W&B writers of the last rank (Megatron's); a no-op elsewhere and when not ``enabled`` (the
    same on every rank: off under --skip-train).

    No failure of theirs leaves ranks waiting in a collective. A missing wandb is refused before
    (``check_wandb_installed``, every rank). A writer that does not start on the last rank (wandb.init raising: no
    network, a bad entity; an events folder that cannot be made) is broadcast to every rank, and each raises the
    same ConfigError (the scripts: one line from rank 0, exit 2 on every rank); without the broadcast the other ranks
    would wait in the first step's collectives for a rank that has gone. W&B failing mid-run (wandb.log or finish
    raising) costs the run nothing: one warning line from the last rank and no W&B from then on (TensorBoard goes
    on), where a propagated exception would stop the last rank alone."""

    def __init__(self, args, enabled: bool = True):
        self.enabled = enabled and is_last_rank()
        self.writer = None
        self.wandb = None
        if not enabled or not (args.tensorboard_dir or args.wandb_project):
            return
        error = None
        if self.enabled:
            try:
                if args.tensorboard_dir:
                    self.writer = self._start_tensorboard(args)
                if args.wandb_project:
                    self.wandb = self._start_wandb(args)
            except ConfigError as e:
                error = str(e)
        error = _from_last_rank(error)
        if error is not None:
            self.close()
            raise ConfigError(error)

    @staticmethod
    def _start_tensorboard(args):
        from torch.utils.tensorboard import SummaryWriter
        try:
            return SummaryWriter(log_dir=args.tensorboard_dir, max_queue=getattr(args, "tensorboard_queue_size", 1000))
        except OSError as e:
            raise ConfigError(f"--tensorboard-dir {args.tensorboard_dir}: cannot write the events there "
                              f"({_first_line(e)}); pass a writable directory") from None

    @staticmethod
    def _start_wandb(args):
        import wandb
        os.environ.setdefault("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")
        try:
            save_dir = wandb_dir(args)
            os.makedirs(save_dir, exist_ok=True)
            return wandb.init(project=args.wandb_project, name=args.wandb_exp_name, dir=save_dir,
                              entity=getattr(args, "wandb_entity", None),
                              config={k: v for k, v in vars(args).items()
                                      if isinstance(v, (int, float, str, bool, type(None)))})
        except Exception as e:  # noqa: BLE001 - wandb's errors are many; each is one line for the user
            raise ConfigError(f"wandb did not start ({_first_line(e)}); fix it, set WANDB_MODE=offline (no network "
                              "needed), or drop --wandb-project") from None

    def _wandb_failed(self, what: str, e: Exception) -> None:
        self.wandb = None
        print(f"warning: wandb {what} failed ({_first_line(e)}); training goes on without W&B"
              + (" (TensorBoard is still written)" if self.writer is not None else ""), file=sys.stderr, flush=True)

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in values.items() if v is not None}, step=step)
            except Exception as e:  # noqa: BLE001 - see the class docstring
                self._wandb_failed("log", e)

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
            try:
                self.wandb.finish()
            except Exception as e:  # noqa: BLE001 - the run is done; its W&B record is what failed
                self._wandb_failed("finish", e)


def memory_scalars(device: torch.device) -> dict:
    """--log-memory-to-tensorboard: the CUDA caching allocator's counters (Megatron's tags); none on CPU."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {"mem-reserved-bytes": stats["reserved_bytes.all.current"],
            "mem-allocated-bytes": stats["allocated_bytes.all.current"],
            "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"],
            "mem-allocated-count": stats["allocation.all.current"]}


_LOAD_BALANCING_TAGS = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                        "global_aux_loss": "global_load_balancing_loss"}


def moe_scalars(moe_config, report: dict) -> dict:
    """Megatron's MoE tags (its track_moe_metrics): the load-balancing loss named by its type, "z_loss" when the
    z-loss is on, each the mean over layers and micro-batches *without* its coefficient (Megatron's tracker divides
    it out); and megallama's "moe/max_load". ``report`` holds the losses with their coefficients (moe_stats)."""
    out = {"moe/max_load": report["max_load"]}
    tag = _LOAD_BALANCING_TAGS.get(moe_config.load_balancing_type)
    if tag and moe_config.aux_loss_coeff > 0:
        out[tag] = report["aux_loss"] / moe_config.aux_loss_coeff
    if moe_config.z_loss_coeff > 0:
        out["z_loss"] = report["z_loss"] / moe_config.z_loss_coeff
    return out


def memory_report(device: torch.device, iteration: int) -> Optional[str]:
    """Megatron's report_memory line, ``[Rank N] (after N iterations) memory (MB) | allocated: ... | max allocated:
    ... | reserved: ... | max reserved: ...`` (its plain float formats); None on CPU (no allocator counters)."""
    if device.type != "cuda":
        return None
    mb = 1024.0 * 1024.0
    rank = dist.get_rank() if dist.is_initialized() else 0
    return (f"[Rank {rank}] (after {iteration} iterations) memory (MB)"
            f" | allocated: {torch.cuda.memory_allocated(device) / mb}"
            f" | max allocated: {torch.cuda.max_memory_allocated(device) / mb}"
            f" | reserved: {torch.cuda.memory_reserved(device) / mb}"
            f" | max reserved: {torch.cuda.max_memory_reserved(device) / mb}")


def max_over_ranks(value: Optional[float], device: torch.device) -> Optional[float]:
    """The largest ``value`` over all ranks: one all-reduce of one float, so a line printed by the last rank shows
    the worst rank. A collective: every rank calls it at the same (log) steps; ``None`` (a field that is off, the
    same on every rank) returns None without communicating."""
    if value is None or not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


# the log line's fields in Megatron's order and formats (its parsers read them); megallama's own (tokens per second,
# MFU, mem GiB) sit before the skip counts, which print under Megatron's labels
MEM_FIELD = "mem GiB (max over ranks)"
_LOG_FIELDS = (("consumed samples", "{:12d}"), ("elapsed time per iteration (ms)", "{:.1f}"),
               ("throughput per GPU (TFLOP/s/GPU)", "{:.1f}"), ("learning rate", "{:.6E}"),
               ("decoupled learning rate", "{:.6E}"), ("global batch size", "{:5d}"), ("lm loss", "{:.6E}"),
               ("loss scale", "{:.1f}"), ("grad norm", "{:.3f}"), ("num zeros", "{:.1f}"), ("params norm", "{:.3f}"),
               ("tokens per second", "{:.1f}"), ("MFU", "{:.1%}"), (MEM_FIELD, "{:.2f}"),
               ("skipped iterations", "{:3d}"), ("nan iterations", "{:3d}"))
_LABELS = {"skipped iterations": "number of skipped iterations", "nan iterations": "number of nan iterations"}


def format_log_line(iteration: int, train_iters: int, values: dict, now: Optional[datetime] = None) -> str:
    """Megatron's training log line, from its `` [2024-05-01 12:00:00] iteration ...`` timestamp (wall clock,
    ``now``). Norms are fixed-point as there (``{:.3f}``): a parser's ``[0-9.]+`` would read an E-notation
    "6.0E-01" as 6.0."""
    stamp = (now or datetime.now()).strftime("%Y-%m-%d %H:%M:%S")
    parts = [f" [{stamp}] iteration {iteration:8d}/{train_iters:8d}"]
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
