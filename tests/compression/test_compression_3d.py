"""Gradient compression inside tensor and pipeline parallelism (4 gloo ranks, the real training loop).

A compressor sees each model chunk's buckets over the data-parallel group only: tp shards, pipeline stages, virtual
chunks and the tied embedding's extra all-reduce all stay as without compression. Lossless settings prove it: top-k
with ratio 1 sends every entry, and PowerSGD at full rank (every matrix compressed, none sent exact) reproduces
each matrix, so both must train like uncompressed (fp32, losses 1e-5 relative) at tp 2 x dp 2 with sequence
parallelism and at pp 2 (interleaved, 2 virtual chunks) x dp 2; 1-bit Adam whose warm-up covers the run is AdamW.
"""
import contextlib
import dataclasses
import io

from dist_utils import run_distributed

T = 6
LAYOUTS = {"tp2_dp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
           "pp2_vpp2_dp2": ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                            "--micro-batch-size", "1"]}
METHODS = {"none": [],
           "topk": ["--gradient-compression", "topk", "--topk-ratio", "1.0", "--compression-warmup-steps", "1"],
           "powersgd": ["--gradient-compression", "powersgd", "--gradient-compression-rank", "128",
                        "--compression-warmup-steps", "1"],
           "onebit": ["--gradient-compression", "onebit", "--compression-warmup-steps", str(T)]}


def _train(rank, world):
    import megallama.optimizer.compression as compression
    from megallama.arguments import parse_args
    from megallama.mpu import parallel_state as ps
    from megallama.training import pretrain
    config_from_args = compression.config_from_args
    # PowerSGD sends a matrix exact unless its rank shrinks it 2x; at full rank none would be compressed
    compression.config_from_args = lambda a: dataclasses.replace(config_from_args(a), min_compression_rate=0.0)
    argv = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
            "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", str(T), "--lr", "1e-2", "--lr-warmup-iters", "1",
            "--mock-data", "--no-progress-bar", "--device", "cpu", "--no-fused-kernels", "--log-interval", str(T)]
    out = {}
    for layout, lflags in LAYOUTS.items():
        for name, mflags in METHODS.items():
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                res = pretrain(parse_args(argv + lflags + mflags, world_size=world))
            ps.destroy_model_parallel()
            out[layout, name] = (res["losses"], buf.getvalue())
    return out


def test_lossless_compression_trains_like_uncompressed_under_tp_and_pp():
    res = run_distributed(_train, 4)[0]
    for layout in LAYOUTS:
        ref = res[layout, "none"][0]
        assert sorted(ref) == list(range(1, T + 1))
        for name in ("topk", "powersgd", "onebit"):
            losses, log = res[layout, name]
            for step in ref:
                assert abs(losses[step] - ref[step]) <= 1e-5 * abs(ref[step]), (layout, name, step, losses, ref)
            if name != "onebit":  # the compressed path ran: the log line counts its bytes
                assert "grad comm MB/step" in log, (layout, name, log)
