"""Flags that used to be ignored silently: --gpus in a single process, virtual pipeline stages without the
interleaved schedule, --sequence-parallel without tensor parallelism. Each is now applied, warned about, or an
error (Megatron's behaviour where it has one)."""
import pytest

from megallama.arguments import parse_args
from megallama.errors import ConfigError

TINY = ["--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "32", "--vocab-size", "512", "--micro-batch-size", "1",
        "--global-batch-size", "4"]


def test_gpus_must_match_the_launched_processes_unless_dry_run(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="--gpus 2 x --nodes 1 does not match the launched world size 1; launch "
                                          "with torchrun --nproc_per_node 2"):
        parse_args(TINY + ["--gpus", "2"])
    assert parse_args(TINY + ["--gpus", "2", "--dry-run"]).gpus == 2  # planning from one process
    assert parse_args(TINY + ["--gpus", "1"]).world_size == 1
    assert parse_args(TINY + ["--gpus", "2"], world_size=2).data_parallel_size == 2  # under torchrun


def test_virtual_stages_imply_interleaved_and_must_divide_the_stage():
    args = parse_args(TINY + ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
                      world_size=2)
    assert args.pipeline_schedule == "interleaved"
    assert parse_args(TINY, world_size=1).pipeline_schedule == "1f1b"  # the default is unchanged
    with pytest.raises(ConfigError, match="needs the interleaved schedule, but --pipeline-schedule gpipe was given"):
        parse_args(TINY + ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                           "--pipeline-schedule", "gpipe"], world_size=2)
    with pytest.raises(ConfigError, match="does not split 4 layers over 2 pipeline stages"):
        parse_args(TINY + ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"],
                   world_size=2)
    with pytest.raises(ConfigError, match="needs --pipeline-model-parallel-size > 1"):
        parse_args(TINY + ["--num-layers-per-virtual-pipeline-stage", "2"], world_size=1)


def test_sequence_parallel_without_tensor_parallel_warns_and_is_off(capsys):
    args = parse_args(TINY + ["--sequence-parallel"], world_size=1)
    assert args.sequence_parallel is False
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: --sequence-parallel has no effect with --tensor-model-parallel-size 1; turned off"]
    assert parse_args(TINY + ["--sequence-parallel", "--tensor-model-parallel-size", "2"],
                      world_size=2).sequence_parallel is True


@pytest.mark.parametrize("extra,says", [
    (["--device", "tpu"], "--device tpu is not cpu, cuda or cuda:N"),
    (["--device", "cpu", "--distributed-backend", "nccl"], "nccl needs CUDA devices; use gloo"),
    (["--log-interval", "0"], "--log-interval must be >= 1"),
    (["--exit-interval", "-1"], "--exit-interval must be >= 0"),  # --eval-iters 0 is off: test_megatron_flags
    (["--loss-log", "."], "is a directory; pass a file path"),
    (["--tensorboard-dir", __file__], "is a file; pass a directory"),
    (["--mock-data", "--epochs", "1"], "--mock-data has none; give --train-iters"),
    (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr 0.001 is above --lr 0.0001"),
])
def test_run_control_flags_fail_before_anything_runs(extra, says):
    """Each of these was a traceback at the first log step, after an iteration, or a silent CPU run."""
    with pytest.raises(ConfigError, match=says.replace(".", r"\.").replace("(", r"\(")):
        parse_args(TINY + extra, world_size=1)


def test_tokenizer_path_is_saved_absolute(tmp_path, monkeypatch):
    """Checkpoints record --tokenizer-model: relative to the launch directory it breaks generate.py elsewhere."""
    (tmp_path / "tok.model").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert parse_args(TINY + ["--tokenizer-model", "tok.model"], world_size=1).tokenizer_model == \
        str(tmp_path / "tok.model")
    assert parse_args(TINY + ["--device", "cuda:1"], world_size=1).device == "cuda:1"


def test_an_unknown_flag_is_one_line_not_the_usage(capsys):
    with pytest.raises(SystemExit) as done:
        parse_args(TINY + ["--lr-warmup-fractio", "0.1"], world_size=1)  # a typo: no abbreviations
    err = capsys.readouterr().err
    assert done.value.code == 2 and err == ("error: unrecognized arguments: --lr-warmup-fractio 0.1; did you mean "
                                            "--lr-warmup-fraction? see --help for the flags\n")


def test_recompute_method_and_layers_are_for_full_recompute_only():
    """Megatron rejects --recompute-method / --recompute-num-layers with selective granularity (they were ignored
    silently); without them, or with full, the loop's uniform / 1 still apply."""
    for extra, named in ((["--recompute-num-layers", "2"], "--recompute-num-layers applies"),
                         (["--recompute-method", "block"], "--recompute-method applies"),
                         (["--recompute-method", "uniform", "--recompute-num-layers", "1"],
                          "--recompute-method and --recompute-num-layers apply")):
        with pytest.raises(ConfigError, match=f"^{named} to --recompute-granularity full only"):
            parse_args(TINY + ["--recompute-granularity", "selective"] + extra)
    args = parse_args(TINY + ["--recompute-granularity", "selective"])
    assert (args.recompute_method, args.recompute_num_layers) == ("uniform", 1)
    args = parse_args(TINY + ["--recompute-granularity", "full", "--recompute-method", "block",
                              "--recompute-num-layers", "2"])
    assert (args.recompute_method, args.recompute_num_layers) == ("block", 2)
    assert parse_args(TINY).recompute_method == "uniform"
    with pytest.raises(ConfigError, match="--recompute-num-layers must be >= 1, got 0"):
        parse_args(TINY + ["--recompute-granularity", "full", "--recompute-num-layers", "0"])
