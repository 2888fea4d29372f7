"""MoE statistics for the log line: tokens per expert and the auxiliary losses of every MoE layer, recorded in the
layers' forward (megallama/model/moe.py) and reported, over all ranks, at the log interval (training.py)."""
from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist

from megallama import compile_disable
from megallama.mpu import parallel_state as ps


class MoEStats:
    """Per-layer tokens per expert and aux/z losses of each micro-batch, accumulated between ``report`` calls and
    summed over the pp and dp ranks there: the mean aux/z loss over every micro-batch and the tokens of the whole
    global batches, the single-process values whatever the layout.

    The sums stay on the device (one [E + 3] tensor a layer): ``record`` runs in every MoE layer's forward, and a
    host copy there would synchronise the GPU once per layer; ``report`` (at the log interval) reads them. It is
    kept out of ``torch.compile``: its per-layer dict would otherwise recompile the layer's graph for each layer."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums: Dict[int, torch.Tensor] = {}  # [tokens per expert..., aux, z, calls] per layer

    @compile_disable.disable
    def record(self, layer: int, tokens: torch.Tensor, aux: torch.Tensor, z: torch.Tensor):
        if torch._C._current_graph_task_id() != -1:  # a recompute inside backward: counted in its forward already
            return
        row = torch.cat([tokens.detach().double().reshape(-1), aux.detach().double().reshape(1),
                         z.detach().double().reshape(1), tokens.new_ones(1, dtype=torch.float64)])
        if layer in self.sums and self.sums[layer].shape == row.shape:
            self.sums[layer].add_(row)
        else:  # first call, or another model's layer (another expert count) since the last report: start afresh
            self.sums[layer] = row

    def report(self, reset: bool = True) -> dict:
        """{"aux_loss", "z_loss" (means over layers and calls), "tokens_per_expert" {layer: list},
        "max_load" (largest expert share / uniform share, worst layer)}; empty when nothing was recorded.
        Covers every pipeline stage's layers and every dp rank's micro-batches: all ranks must call it at the same
        step."""
        rows = self._rows_of_all_ranks()
        if reset:
            self.reset()
        if not rows:
            return {}
        tokens = {l: r[:-3] for l, r in rows.items()}
        out = {"aux_loss": sum(float(r[-3] / r[-1]) for r in rows.values()) / len(rows),
               "z_loss": sum(float(r[-2] / r[-1]) for r in rows.values()) / len(rows),
               "tokens_per_expert": {l: [int(round(v)) for v in t.tolist()] for l, t in tokens.items()}}
        out["max_load"] = max(float(t.max() / t.mean().clamp_min(1e-9)) for t in tokens.values())
        return out

    def _rows_of_all_ranks(self) -> Dict[int, torch.Tensor]:
        """{layer: host row}, summed over pp (other stages' layers, Megatron's reduce_aux_losses_tracker_across_ranks)
        and dp (other micro-batches; the ep ranks are dp ranks). Not over tp/cp: their ranks record the same
        micro-batch statistics (reduced in the forward). Each layer lives on one stage: no layer counts twice."""
        layers = sorted(self.sums)
        groups = []
        if dist.is_initialized():
            groups = [g for g in (ps.get_pipeline_model_parallel_group(), ps.get_data_parallel_group())
                      if g is not None and dist.get_world_size(g) > 1]
        if not groups:  # one host copy for all layers
            return dict(zip(layers, torch.stack([self.sums[l] for l in layers]).cpu())) if layers else {}
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(groups[0]) == "nccl" else "cpu"
        # a stage without MoE layers knows neither the layer count nor E: agree on the table's shape first
        shape = torch.tensor([max(layers) + 1 if layers else 0, self.sums[layers[0]].numel() if layers else 0],
                             device=device)
        for g in groups:
            dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=g)
        n, width = shape.tolist()
        if n == 0:
            return {}
        table = torch.zeros(n, width, dtype=torch.float64, device=device)
        for l in layers:
            table[l] = self.sums[l].to(device)
        for g in groups:
            dist.all_reduce(table, group=g)
        table = table.cpu()
        return {l: table[l] for l in range(n) if table[l, -1] > 0}  # calls > 0: an MoE layer that ran


_STATS = MoEStats()


def get_moe_stats() -> MoEStats:
    return _STATS


def format_moe_stats(report: dict) -> str:
    """One log-line fragment: losses, worst load and the per-layer tokens/expert histogram."""
    if not report:
        return ""
    hist = " ".join(f"L{l}:[{','.join(str(c) for c in cs)}]" for l, cs in report["tokens_per_expert"].items())
    return (f"moe aux loss: {report['aux_loss']:.6E} | moe z loss: {report['z_loss']:.6E} | moe max load: "
            f"{report['max_load']:.3f} | tokens/expert {hist} |")
