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

import torch

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
    res = run_distributed(_train, 4)[3]  # the last rank prints the log line (Megatron's print_rank_last)
    for layout in LAYOUTS:
        ref = res[layout, "none"][0]
        assert sorted(ref) == list(range(1, T + 1))
        for name in ("topk", "powersgd", "onebit"):
            losses, log = res[layout, name]
            for step in ref:
                assert abs(losses[step] - ref[step]) <= 1e-5 * abs(ref[step]), (layout, name, step, losses, ref)
            if name != "onebit":  # the compressed path ran: the log line counts its bytes
                assert "grad comm MB/step" in log, (layout, name, log)


def _replicated_weights(rank, world):
    """tp 2 x dp 2 without sequence parallelism, lossy compressors: every rank's tp-replicated weights (norms)."""
    from megallama.arguments import parse_args
    from megallama.mpu import parallel_state as ps
    import megallama.training as training
    argv = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
            "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", "5", "--lr", "1e-2", "--lr-warmup-iters", "1",
            "--mock-data", "--no-progress-bar", "--device", "cpu", "--log-interval", "5",
            "--tensor-model-parallel-size", "2", "--compression-warmup-steps", "2"]
    out, kept = {}, {}
    finish = training.finish_param_sync
    training.finish_param_sync = lambda chunks: (finish(chunks), kept.update(
        {n: p.detach().clone() for n, p in chunks[0].named_parameters()
         if not getattr(p, "tensor_model_parallel", False)}))[0]
    for flags in (["topk", "--topk-ratio", "0.1"], ["onebit"], ["topk", "--topk-ratio", "0.1", "--zero-stage", "1"]):
        with contextlib.redirect_stdout(io.StringIO()):
            training.pretrain(parse_args(argv + ["--gradient-compression"] + flags, world_size=world))
        out[" ".join(flags)] = (ps.get_tensor_model_parallel_rank(), dict(kept))
        ps.destroy_model_parallel()
    return out


def test_tp_replicated_weights_stay_identical_under_lossy_compression():
    """A norm weight shared a bucket with tp-sharded weights: top-k selection and 1-bit chunk scales then differed
    per tp rank, and so did the norm's copies (1e-3 apart after 8 steps). Bucketed apart, they stay bit-identical."""
    res = run_distributed(_replicated_weights, 4)
    for method in res[0]:
        by_tp = {}
        for r in res.values():
            tp_rank, weights = r[method]
            by_tp.setdefault(tp_rank, []).append(weights)
        a, b = by_tp[0][0], by_tp[1][0]
        assert a and set(a) == set(b), method
        for name in a:
            assert torch.equal(a[name], b[name]), (method, name, float((a[name] - b[name]).abs().max()))


def _onebit_exact_transport(rank, world):
    """1-bit Adam whose 1-bit mean is replaced by the exact one (frozen-variance Adam: the layout cannot matter)
    at dp 4, tp 2 x dp 2 (with and without sequence parallelism) and pp 2 x dp 2 (tied embedding on two stages)."""
    from megallama.arguments import parse_args
    from megallama.mpu import parallel_state as ps
    from megallama.optimizer import compression_onebit
    from megallama.training import pretrain

    def exact_mean(self, x, n, st):
        y = x.clone()
        self.all_reduce_mean(y)
        return y[:n]
    compression_onebit.OneBitCompressor._mean = exact_mean
    argv = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
            "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", str(T), "--lr", "1e-2", "--lr-warmup-iters", "1",
            "--mock-data", "--no-progress-bar", "--device", "cpu", "--no-fused-kernels", "--log-interval", str(T),
            "--gradient-compression", "onebit", "--compression-warmup-steps", "2"]
    layouts = {"dp4": [], "tp2": ["--tensor-model-parallel-size", "2"],
               "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
               "pp2_tied": ["--pipeline-model-parallel-size", "2"]}
    out = {}
    for name, flags in layouts.items():
        args = parse_args(argv + flags, world_size=world)
        assert args.model_config.tie_word_embeddings
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            out[name] = (pretrain(args)["losses"], buf.getvalue())
        ps.destroy_model_parallel()
    return out


def test_onebit_momentum_is_layout_independent():
    """1-bit Adam handed the averaged momentum to the optimizer, and the loop then added up the copies of a
    sequence-parallel norm (over tp) or of a tied embedding (over its two stages): each copy's beta1 m counted, R
    times the momentum (pp 2: 3e-3 off dp 4 after one compressed step). And its variance floor, a parameter's mean
    of v, was taken per tp shard (tp 2: 2e-5 off by step 6). Each copy now keeps its share of the momentum and the
    floor is the whole parameter's; with an exact transport every layout trains the dp 4 curve."""
    res = run_distributed(_onebit_exact_transport, 4)[3]  # the last rank prints the log line
    ref = res["dp4"][0]
    assert sorted(ref) == list(range(1, T + 1))
    for name, (losses, log) in res.items():
        assert "grad comm MB/step" in log, (name, log)  # the compressed (1-bit) path ran
        for step in ref:
            assert abs(losses[step] - ref[step]) <= 5e-6 * abs(ref[step]), (name, step, losses, ref)
