"""A compressed run saved and resumed gives the per-step losses of the uninterrupted run bit for bit (2 gloo
ranks): the compressors' error memories, PowerSGD's warm-start Q and 1-bit Adam's momentum, frozen denominator and
worker/server errors travel in each rank's checkpoint file, like its RNG state. A run resumed under another layout,
bucket size, rank or top-k ratio, or from a checkpoint saved with --no-save-compression-state, starts the compressor
afresh and says so; another warm-up length keeps it."""
import contextlib
import io

from dist_utils import run_distributed

T, SAVE_AT = 11, 8
METHODS = {"powersgd": ["--gradient-compression", "powersgd", "--compression-warmup-steps", "2"],
           "topk": ["--gradient-compression", "topk", "--topk-ratio", "0.1", "--compression-warmup-steps", "2"],
           # exact optimizer steps: 0-1 (warm-up), 3, 4, 6 (variance refreshes; each resets the compressor), 10:
           # steps 7-9 are compressed and the resumed ones, 8 and 9, continue from the state saved after 7
           "onebit": ["--gradient-compression", "onebit", "--compression-warmup-steps", "2", "--zero-stage", "1"]}
OTHER = {"powersgd": ["--gradient-compression-rank", "2"], "topk": ["--topk-ratio", "0.2"],
         "onebit": ["--bucket-size", "20000"]}  # later flags win


def _train(rank, world, tmp, extra=()):
    """Every method's reference, resumed and re-flagged runs on this rank; ``extra`` flags go after the base."""
    from megallama.arguments import parse_args
    from megallama.mpu import parallel_state as ps
    from megallama.training import pretrain
    argv = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
            "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", str(T), "--lr", "1e-2", "--lr-warmup-iters", "1",
            "--mock-data", "--no-progress-bar", "--device", "cpu", "--no-fused-kernels"] + list(extra)
    out = {}

    def run(extra):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            losses = pretrain(parse_args(argv + extra, world_size=world))["losses"]
        ps.destroy_model_parallel()
        return losses, buf.getvalue()

    for name, flags in METHODS.items():
        ck = f"{tmp}/{name}"
        ref, _ = run(flags + ["--save", ck, "--save-interval", str(SAVE_AT)])
        resumed, log = run(flags + ["--load", f"{ck}/iter_{SAVE_AT:07d}"])
        _, other_log = run(flags + OTHER[name] + ["--load", f"{ck}/iter_{SAVE_AT:07d}"])
        longer_log = ""
        if name == "powersgd":  # a longer warm-up (as a longer --train-iters gives by default) keeps the state
            _, longer_log = run(flags + ["--compression-warmup-steps", "3", "--load", f"{ck}/iter_{SAVE_AT:07d}"])
        if name == "topk":  # checkpoints without the state: the resume says so (and still trains)
            run(flags + ["--save", f"{ck}_nostate", "--save-interval", str(SAVE_AT), "--exit-interval",
                         str(SAVE_AT), "--no-save-compression-state"])
            _, longer_log = run(flags + ["--load", f"{ck}_nostate/iter_{SAVE_AT:07d}"])
        out[name] = (ref, resumed, log, other_log, longer_log)
    return out


def failures(res) -> list:
    bad = []
    for name, (ref, resumed, log, other_log, longer_log) in res.items():
        if sorted(ref) != list(range(1, T + 1)) or sorted(resumed) != list(range(SAVE_AT + 1, T + 1)):
            bad.append(f"{name}: steps {sorted(ref)} / {sorted(resumed)}")
            continue
        bad += [f"{name} step {s}: resumed {v!r}, uninterrupted {ref[s]!r}" for s, v in resumed.items() if v != ref[s]]
        if "gradient compression state restored" not in log:
            bad.append(f"{name}: no 'restored' line")
        if "gradient compression state starts afresh" not in other_log:
            bad.append(f"{name}: other flags did not start afresh")
        if name == "powersgd" and "gradient compression state restored" not in longer_log:
            bad.append(f"{name}: a longer warm-up dropped the state")
        if name == "topk" and "gradient compression state starts afresh" not in longer_log:
            bad.append(f"{name}: a checkpoint saved with --no-save-compression-state restored a state")
    return bad


def test_compressed_resume_is_bit_exact(tmp_path):
    bad = failures(run_distributed(_train, 2, str(tmp_path))[0])
    assert not bad, bad


def test_compressed_resume_with_virtual_pipeline_chunks_is_bit_exact(tmp_path):
    """pp 2 x vpp 2 x dp 2: each rank saves and restores one compressor state per model chunk."""
    res = run_distributed(_train, 4, str(tmp_path), ["--pipeline-model-parallel-size", "2",
                                                     "--num-layers-per-virtual-pipeline-stage", "1",
                                                     "--micro-batch-size", "1"])
    bad = failures(res[0])
    assert not bad, bad


def _resume_flags(rank, world, tmp):
    """top-k saved at SAVE_AT and resumed with --no-load-rng, then with --no-load-optim."""
    from megallama.arguments import parse_args
    from megallama.mpu import parallel_state as ps
    from megallama.training import pretrain
    argv = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
            "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", str(T), "--lr", "1e-2", "--lr-warmup-iters", "1",
            "--mock-data", "--no-progress-bar", "--device", "cpu", "--no-fused-kernels"] + METHODS["topk"]
    out = []
    ck = f"{tmp}/iter_{SAVE_AT:07d}"
    for extra in (["--save", tmp, "--save-interval", str(SAVE_AT)], ["--load", ck, "--no-load-rng"],
                  ["--load", ck, "--no-load-optim"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            out.append((pretrain(parse_args(argv + extra, world_size=world))["losses"], buf.getvalue()))
        ps.destroy_model_parallel()
    return out


def test_no_load_rng_keeps_the_compression_state(tmp_path):
    """--no-load-rng (RNG states only, as in Megatron) also left the compressors' error memories unread, so the
    resumed curve left the uninterrupted one, and the log blamed the checkpoint; --no-load-optim's fresh start now
    names the flag."""
    (ref, _), (resumed, log), (_, no_optim_log) = run_distributed(_resume_flags, 2, str(tmp_path / "ck"))[0]
    assert "gradient compression state restored" in log, log
    assert sorted(resumed) == list(range(SAVE_AT + 1, T + 1))
    assert all(resumed[s] == ref[s] for s in resumed), (resumed, ref)
    assert "gradient compression state starts afresh (--no-load-optim)" in no_optim_log, no_optim_log


def test_compression_at_data_parallel_size_one_is_said_to_do_nothing(capsys):
    """tp x pp filling every GPU leaves dp 1: nothing is reduced over data parallelism, so the compression flag
    does nothing; that is a warning line, not silence."""
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    pretrain(parse_args(["--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size", "128",
                         "--num-attention-heads", "4", "--vocab-size", "256", "--seq-length", "16", "--train-iters",
                         "1", "--mock-data", "--no-progress-bar", "--device", "cpu", "--gradient-compression",
                         "powersgd"], world_size=1))
    assert "warning: --gradient-compression powersgd has nothing to compress at data-parallel size 1" in \
        capsys.readouterr().err


def _afresh_reasons(rank, world):
    import copy
    from compression_harness import make
    from megallama.optimizer.compression import CompressionConfig, compression_state, load_compression_state
    ddp, _, _ = make(0, CompressionConfig("topk", topk_ratio=0.1, warmup_steps=0))
    saved = compression_state([ddp])
    out = [load_compression_state([ddp], saved)]
    for key, value in (("world", 4), ("topk_ratio", 0.2), ("buckets", [[0, 8]])):
        other = copy.deepcopy(saved)
        other[0]["signature"][key] = value
        out.append(load_compression_state([ddp], other))
    out.append(load_compression_state([ddp], None))
    return out


def test_a_fresh_start_says_why():
    """A resume at another data-parallel size (the error memories are per dp rank: they belong to no rank of the
    new layout) starts the compressor afresh, and the line now names the difference instead of 'this layout'."""
    same, world, ratio, buckets, none = run_distributed(_afresh_reasons, 2)[0]
    assert same == "gradient compression state restored"
    assert world == "gradient compression state starts afresh (saved at data-parallel size 4, this run has 2)"
    assert ratio == "gradient compression state starts afresh (saved at --topk-ratio 0.2, this run has 0.1)"
    assert "another bucket layout (--bucket-size" in buckets, buckets
    assert "saved without compression or with --no-save-compression-state" in none, none


def _layout_change(rank, world, tmp):
    """top-k saved at dp 4 and resumed at tp 2 x dp 2: the log line of the resume."""
    from megallama.arguments import parse_args
    from megallama.mpu import parallel_state as ps
    from megallama.training import pretrain
    argv = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
            "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "8", "--train-iters", str(SAVE_AT + 1), "--lr", "1e-2", "--mock-data",
            "--no-progress-bar", "--device", "cpu", "--no-fused-kernels"] + METHODS["topk"]
    logs = []
    for extra in (["--save", tmp, "--save-interval", str(SAVE_AT)],
                  ["--load", f"{tmp}/iter_{SAVE_AT:07d}", "--tensor-model-parallel-size", "2"]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            pretrain(parse_args(argv + extra, world_size=world))
        ps.destroy_model_parallel()
        logs.append(buf.getvalue())
    return logs[1]


def test_a_layout_change_says_so_not_that_the_checkpoint_has_no_state(tmp_path):
    """dp 4 -> tp 2 x dp 2: no rank file matches, so the state is not read; the line named a flag the user never
    passed ('saved without compression or with --no-save-compression-state') before."""
    log = run_distributed(_layout_change, 4, str(tmp_path / "ck"))[0]
    assert "gradient compression state starts afresh (the layout changed since the save" in log, log[-1500:]
