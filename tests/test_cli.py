"""``python -m megallama.cli``: every command and the seed's flags, as a user runs them (subprocesses, CPU)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--vocab-size", "512", "--seq-length", "16"]


def cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "megallama.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def test_dry_run_with_the_seed_flags_prints_configuration_and_estimate():
    r = cli("train", "--model", "tiny_llama3_50m", "--gpus", "1", "--data", "/path/to/test_data.jsonl",
            "--batch-size", "64", "--epochs", "1", "--strategy", "lora", "--lora-rank", "8", "--zero-stage", "1",
            "--activation-checkpointing", "--gradient-compression", "--mixed-precision", "bfloat16",
            "--tensor-parallel", "1", "--pipeline-parallel", "1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "resolved configuration:" in r.stdout and "recompute_granularity                    full" in r.stdout
    assert "GPU memory" in r.stdout and "lora" in r.stdout


def test_pretrain_script_dry_run_plans_a_multi_gpu_launch_from_one_process():
    """``python pretrain_llama.py --tensor-model-parallel-size 8 --gpus 8 --dry-run`` on a laptop: the plan, as
    ``megallama train --dry-run`` prints it (it stopped at "world size 1 is not divisible by tp*pp*cp")."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_llama.py"), "--model",  # noqa
                                     "llama3_8b", "--tensor-model-parallel-size", "8", *a, "--dry-run"],
                                    capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    r = run("--gpus", "8")
    assert r.returncode == 0, r.stderr
    assert "resolved configuration:" in r.stdout and "GPU memory" in r.stdout
    assert r.stdout == cli("train", "--model", "llama3_8b", "--tensor-model-parallel-size", "8", "--gpus", "8",
                           "--dry-run").stdout
    r = run()
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("pass --gpus 8)"), r.stderr


def test_dry_run_of_405b_on_64_gpus_does_not_build_anything():
    r = cli("train", "--model", "llama3_405b", "--gpus", "8", "--nodes", "8", "--zero-stage", "3",
            "--tensor-parallel", "8", "--pipeline-parallel", "8", "--activation-checkpointing", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "ZeRO-3 shards over data-parallel ranks, and dp = 1 here" in r.stdout


def test_train_runs_on_cpu_and_relaunches_through_torchrun():
    one = cli("train", "--model", "tiny_llama3_50m", *TINY, "--mock-data", "--train-iters", "2", "--batch-size", "4",
              "--device", "cpu", "--no-progress-bar")
    assert one.returncode == 0, one.stderr
    two = cli("train", "--model", "tiny_llama3_50m", *TINY, "--mock-data", "--train-iters", "2", "--batch-size", "4",
              "--device", "cpu", "--no-progress-bar", "--gpus", "2", timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    loss = lambda out: [ln.split("lm loss:")[1].split("|")[0].strip() for ln in out.splitlines()  # noqa: E731
                        if "] iteration " in ln and "lm loss:" in ln]
    assert len(loss(one.stdout)) == 2 and loss(two.stdout) and "world=2" in two.stdout


def test_estimate_memory_validate_env_benchmark_and_errors(tmp_path):
    r = cli("estimate-memory", "--model", "llama2_7b", "--batch-size", "16", "--gpus", "4", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["layout"]["dp"] == 4
    r = cli("validate-env")
    assert r.returncode == 0 and "environment ready for training" in r.stdout and "torch:" in r.stdout
    out = tmp_path / "bench.json"
    r = cli("benchmark", "--model", "tiny_llama3_50m", "--gpus", "1", "--batch-sizes", "1", "--seq-length", "16",
            "--steps", "2", "--save-results", str(out), "--megallama-args", " ".join(TINY[:-2]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(out.read_text())["rows"][0]["tokens_per_s"] > 0
    r = cli("train", "--model", "llama3_8b", "--tensor-parallel", "3", "--gpus", "4", "--dry-run")
    assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert cli().returncode == 2 and cli("frobnicate").returncode == 2


def test_every_entry_point_prints_its_help():
    """``--help`` of every script, tool and CLI command exits 0 (argparse expands ``%`` in help texts when it
    prints them, so a bad one only shows up here)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    scripts = ["pretrain_llama.py", "finetune_llama.py"] + sorted(
        os.path.join("tools", f) for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py"))
    cmds = [[sys.executable, s, "--help"] for s in scripts] + [
        [sys.executable, "-m", "megallama.cli", c, "--help"] for c in ("train", "generate", "estimate-memory",
                                                                       "benchmark")]
    procs = [(c, subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env))
             for c in cmds]
    for c, p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and "usage" in out.lower(), (c, err[-1500:])


def test_dry_run_estimates_the_vocabulary_the_run_builds(tmp_path, monkeypatch, capsys):
    """No --vocab-size: the embedding follows the tokenizer (the bundled 8192, padded to 9000 here), in the dry run's
    configuration and estimate as in the run, not the named model's 128K."""
    import megallama.memory_args as memory_args
    from megallama.arguments import parse_args
    from megallama.cli import dry_run
    from megallama.model import build_model
    from megallama.training_setup import build_data
    seen, estimate = {}, memory_args.estimate_for_args
    monkeypatch.setattr(memory_args, "estimate_for_args", lambda a, *rest, **kw: seen.setdefault("est", estimate(
        a, *rest, **kw)))
    argv = ["--model", "tiny_llama3_50m", *TINY[:-4], "--seq-length", "16", "--make-vocab-size-divisible-by", "1000",
            "--data-cache-dir", str(tmp_path), "--train-iters", "1"]
    assert dry_run(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    run = parse_args(argv, world_size=1)
    build_data(run)
    assert run.model_config.vocab_size == 9000 and "'vocab_size': 9000" in out
    assert "vocabulary: 9000 (the tokenizer's 8192, padded as the run will)" in out
    assert seen["est"]["num_params"] == sum(p.numel() for p in build_model(run.model_config).parameters())
    for extra, says in ((["--vocab-size", "512"], "vocabulary: 512 (--vocab-size)"),
                        (["--mock-data"], "vocabulary: 128256 (mock data)"),
                        (["--tokenizer-type", "llama3", "--tokenizer-model", str(tmp_path / "none.model")],
                         "vocabulary: tiny_llama3_50m's 128256 (the tokenizer does not load here: tokenizer model")):
        assert dry_run(argv + extra + ["--dry-run"]) == 0 and says in capsys.readouterr().out


def test_cli_flag_mistakes_are_one_line_and_help_is_help(tmp_path):
    """--gpus abc was a ValueError traceback; benchmark dropped a mistyped flag (--batch-size for --batch-sizes)
    and ran its defaults; validate-env --help ran the checks. A --save still to be made is not a disk warning."""
    for argv, says in ((["train", "--gpus", "abc", "--dry-run"], "error: --gpus abc is not a whole number"),
                       (["train", "--nodes", "0", "--dry-run"], "error: --nodes must be >= 1, got 0"),
                       (["benchmark", "--batch-size", "1"], "error: unrecognized arguments: --batch-size 1")):
        r = cli(*argv)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr[-2000:]
        assert r.stderr.startswith(says), r.stderr
    r = cli("validate-env", "--help")
    assert r.returncode == 0 and "--path" in r.stdout and "environment ready" not in r.stdout
    from megallama.environment import validate_environment
    assert not [w for w in validate_environment(str(tmp_path / "new" / "run"))["warnings"] if "disk" in w]


def test_benchmark_checks_its_results_file_before_running(tmp_path, capsys):
    """A --save-results in a missing folder was a FileNotFoundError traceback after the whole benchmark ran."""
    from megallama.cli import main
    for path, says in ((tmp_path / "no" / "b.json", f"{tmp_path / 'no'} does not exist"),
                       (tmp_path, "is a directory")):
        assert main(["benchmark", "--model", "tiny_llama3_50m", "--steps", "1000", "--save-results", str(path)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --save-results {path}: {says}; name a file in an existing folder\n", err
