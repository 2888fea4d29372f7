"""The seed's ``PerformanceBenchmark``: real training steps per batch size, through the repo's benchmark tools.

On CUDA it runs ``tools/benchmark.py`` (tok/s, tok/s/GPU, MFU, peak memory, optional HF baselines); on CPU each
batch size runs ``benchmarks/megallama_step.py`` (the same ``pretrain`` on mock data) for tok/s. Each configuration
is its own process, so memory statistics and compile caches never mix.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence

from megallama.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHAPE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size")


class PerformanceBenchmark:
    def __init__(self, model_variant: str = "tiny_llama3_150m", batch_sizes: Sequence[int] = (1, 2, 4, 8),
                 sequence_length: int = 2048, num_gpus: int = 1, steps: int = 10, compare_hf: bool = False,
                 model_overrides: Optional[dict] = None, extra_args: Optional[List[str]] = None,
                 device: Optional[str] = None):
        from megallama.config import get_model_config
        get_model_config(model_variant, **(model_overrides or {}))  # fail early on a bad name or shape
        if any(int(b) < 1 for b in batch_sizes):
            raise ConfigError(f"batch sizes must be positive, got {list(batch_sizes)}")
        self.model_variant, self.batch_sizes = model_variant, [int(b) for b in batch_sizes]
        self.sequence_length, self.num_gpus, self.steps = sequence_length, num_gpus, steps
        self.compare_hf, self.model_overrides = compare_hf, dict(model_overrides or {})
        self.extra_args, self.device = list(extra_args or []), device
        self.results: List[dict] = []

    def _flags(self) -> List[str]:
        out = []
        for k, v in self.model_overrides.items():
            if k not in _SHAPE:
                raise ConfigError(f"model_overrides key '{k}' unknown; use {', '.join(_SHAPE)}")
            out += [f"--{k.replace('_', '-')}", str(v)]
        return out + self.extra_args

    def _env(self):
        return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))

    def run_comprehensive_benchmark(self) -> List[dict]:
        import torch
        use_cuda = (self.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
        self.results = self._run_gpu() if use_cuda else self._run_cpu()
        return self.results

    def _run_gpu(self) -> List[dict]:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "results.json")
            cmd = [sys.executable, os.path.join(REPO, "tools", "benchmark.py"), "--model", self.model_variant,
                   "--batch-sizes", *map(str, self.batch_sizes), "--seq-length", str(self.sequence_length),
                   "--steps", str(self.steps), "--gpus", str(self.num_gpus), "--save-results", out]
            if self.compare_hf:
                cmd.append("--compare-hf")
            if self._flags():
                cmd += ["--megallama-args", " ".join(self._flags())]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=self._env())
            if r.returncode != 0 or not os.path.exists(out):
                raise ConfigError(f"benchmark failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
            with open(out) as fh:
                return json.load(fh)["rows"]

    def _run_cpu(self) -> List[dict]:
        rows = []
        for b in self.batch_sizes:
            cmd = [sys.executable, os.path.join(REPO, "benchmarks", "megallama_step.py"), "--model", self.model_variant,
                   "--seq-length", str(self.sequence_length), "--micro-batch-size", str(b), "--global-batch-size",
                   str(b), "--train-iters", str(self.steps), "--device", "cpu", *self._flags()]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=self._env())
            line = next((ln for ln in reversed(r.stdout.splitlines()) if ln.startswith("{")), None)
            row = json.loads(line) if line else {"error": (r.stderr or r.stdout).strip()[-500:]}
            row.update(micro_batch_size=b, device="cpu")
            if "tokens_per_s" in row:
                row["tokens_per_s_per_gpu"] = row["tokens_per_s"]
            rows.append(row)
        return rows

    def print_summary(self) -> str:
        if not self.results:
            raise ConfigError("no results yet; call run_comprehensive_benchmark() first")
        unit = "CPU" if all(r.get("device") == "cpu" for r in self.results) else "GPU"  # what tok/s is per
        lines = [f"{self.model_variant}, sequence {self.sequence_length}:",
                 f"{'impl':>12s} {'mbs':>4s} {'tok/s/' + unit:>10s} {'step s':>8s} {'peak GiB':>9s}"]
        for r in self.results:
            impl = r.get("impl", "megallama")
            if "error" in r:
                lines.append(f"{impl:>12s} {r['micro_batch_size']:4d} failed: {r['error'][-120:]}")
                continue
            peak = r.get("peak_mem_gib")  # None on CPU: not measured there
            lines.append(f"{impl:>12s} {r['micro_batch_size']:4d} "
                         f"{r['tokens_per_s_per_gpu']:10.0f} {r.get('step_time_s', float('nan')):8.3f} "
                         + (f"{peak:9.2f}" if peak is not None else f"{'n/a':>9s}"))
        text = "\n".join(lines)
        print(text)
        return text
