"""Shared pieces of the compression tests: a tiny Llama on byte-level text from the bundled corpus (real language,
vocabulary 256), a deterministic global batch per step, and a data-parallel loop over our DDP + optimizer with an
optional gradient compressor attached (the loop is the ZeRO tests' own)."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from megallama.config import ModelConfig
from megallama.model import build_model
from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
from megallama.optimizer.compression import CompressionConfig, attach_gradient_compression, compression_report

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(_TESTS, "optimizer"), os.path.join(os.path.dirname(_TESTS), "benchmarks")]
import zero_harness  # noqa: E402  (the data-parallel training loop, shared with the ZeRO tests)
from compression_convergence import corpus  # noqa: E402  (the benchmark's reader of the bundled corpus)

CFG = ModelConfig(name="compression-tiny", num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, vocab_size=256, max_position_embeddings=64)
SEQ, GLOBAL_BATCH, SEED = 32, 16, 11
OPT = dict(lr=3e-3, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0)

_TEXT = None


def corpus_bytes(limit: int = 400_000) -> torch.Tensor:
    """The first ``limit`` bytes of the bundled corpus's text (UTF-8), as token ids 0-255 (read once)."""
    global _TEXT
    if _TEXT is None:
        _TEXT = corpus(limit)
    return _TEXT


def batch(step: int, global_batch: int = GLOBAL_BATCH, seq: int = SEQ):
    text = corpus_bytes()
    g = torch.Generator().manual_seed(5000 + step)
    starts = torch.randint(0, text.numel() - seq - 1, (global_batch,), generator=g)
    ids = torch.stack([text[s:s + seq + 1] for s in starts.tolist()])
    return ids[:, :-1], ids[:, 1:]


def make(zero_stage: int, compression: CompressionConfig | None = None, cfg: ModelConfig = CFG, **opt_kw):
    """DDP over all ranks (the whole world is one dp group) + optimizer (+ compressor)."""
    model = build_model(cfg, seed=SEED)
    group = dist.group.WORLD if dist.is_initialized() else None
    ddp = DistributedDataParallel(model, zero_stage=zero_stage, data_parallel_group=group)
    opt = get_megatron_optimizer(OptimizerConfig(**dict(OPT, **opt_kw)), [ddp])
    comps = attach_gradient_compression([ddp], opt, compression) if compression is not None else []
    return ddp, opt, comps


def train(ddp, opt, steps: int, num_microbatches: int = 1, start: int = 0):
    """Steps ``start..start+steps-1`` of the ZeRO tests' loop on this corpus; returns the dp-mean losses and the
    compression report (bytes per step, ratio) over the run."""
    losses, _ = zero_harness.train(ddp, opt, start, steps, num_microbatches, batch_fn=batch)
    return losses, compression_report([ddp])
