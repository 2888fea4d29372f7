"""Gradient compression on two GPUs over NCCL, with the comm hook on a side stream (``overlap_grad_reduce``).

With overlap the hook compresses each finished bucket on its own CUDA stream while the backward goes on; the main
stream waits for it before the optimizer. Small buckets make most hooks run mid-backward. Checks (fp32, TF32 off):
lossless settings (top-k ratio 1, full-rank PowerSGD with every matrix compressed) train like uncompressed
(losses 1e-5 relative), and every compressor, lossy ones included, gives the same losses with the hook on the side
stream as on the main stream (1e-6: the same kernels in the same order; a missing wait would hand the optimizer
half-averaged buckets). A compressed run resumed from a checkpoint on the GPUs repeats the uninterrupted losses
bit for bit (the CPU test's runs, on CUDA with the side stream). Also runs under ``torchrun --nproc_per_node 2 tests/multigpu/test_compression_nccl.py``.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, "..", ".."), os.path.join(_HERE, ".."), os.path.join(_HERE, "..", "optimizer"),
                os.path.join(_HERE, "..", "compression")]

from dist_utils import run_distributed  # noqa: E402

pytestmark = pytest.mark.multigpu
STEPS, BUCKET = 6, 10_000


def _runs():
    from megallama.optimizer.compression import CompressionConfig
    return {"none": CompressionConfig(),
            "topk 1.0": CompressionConfig("topk", topk_ratio=1.0, warmup_steps=1),
            "powersgd full": CompressionConfig("powersgd", rank=128, warmup_steps=1, min_compression_rate=0.0),
            "powersgd r4": CompressionConfig("powersgd", rank=4, warmup_steps=1),
            "topk 0.05": CompressionConfig("topk", topk_ratio=0.05, warmup_steps=1),
            "onebit": CompressionConfig("onebit", warmup_steps=2)}


def check(rank, world, device_type="cuda"):
    import zero_harness
    from compression_harness import CFG, OPT, batch
    from megallama.model import build_model
    from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
    from megallama.optimizer.compression import attach_gradient_compression
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")

    def gpu_batch(step, *a, **k):
        return tuple(t.to(dev) for t in batch(step, *a, **k))

    out = {}
    for overlap in (False, True):
        for name, cfg in _runs().items():
            model = build_model(CFG, device=dev, seed=11)
            ddp = DistributedDataParallel(model, data_parallel_group=dist.group.WORLD, bucket_size=BUCKET,
                                          overlap_grad_reduce=overlap)
            opt = get_megatron_optimizer(OptimizerConfig(**OPT), [ddp])
            attach_gradient_compression([ddp], opt, cfg)
            losses, _ = zero_harness.train(ddp, opt, 0, STEPS, 1, batch_fn=gpu_batch)
            out[overlap, name] = (losses, len(ddp.layout.buckets), ddp._hook_stream is not None)
    return out


def _failures(out):
    bad = []
    for (overlap, name), (losses, nb, side) in out.items():
        if nb < 4:
            bad.append(f"{name}: only {nb} buckets")
        if overlap and name != "none" and not side:
            bad.append(f"{name}: the hook never ran on the side stream")
        ref = out[overlap, "none"][0]
        if name in ("topk 1.0", "powersgd full"):
            bad += [f"{overlap} {name} step {i}: {a} vs none {b}" for i, (a, b) in enumerate(zip(losses, ref))
                    if abs(a - b) > 1e-5 * abs(b)]
        main = out[False, name][0]
        bad += [f"{name} step {i}: side stream {a} vs main stream {b}" for i, (a, b) in enumerate(zip(losses, main))
                if abs(a - b) > 1e-6 * abs(b)]
    return bad


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_compression_over_nccl_with_side_stream_hooks():
    out = run_distributed(check, 2, backend="nccl")[0]
    assert not _failures(out), _failures(out)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_compressed_resume_on_gpus_is_bit_exact(tmp_path):
    """tests/compression/test_compression_resume.py on 2 GPUs, with the hooks on the side stream (small buckets)."""
    import test_compression_resume as resume
    res = run_distributed(resume._train, 2, str(tmp_path),
                          ["--device", "cuda", "--overlap-grad-reduce", "--bucket-size", "5000"], backend="nccl")[0]
    assert not resume.failures(res), resume.failures(res)


if __name__ == "__main__":  # torchrun --nproc_per_node 2 tests/multigpu/test_compression_nccl.py
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    res = check(dist.get_rank(), dist.get_world_size())
    if dist.get_rank() == 0:
        for k, v in res.items():
            print(k, v)
        print("failures:", _failures(res))
    dist.destroy_process_group()
