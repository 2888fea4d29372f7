"""What a CPU user following the README meets first: a missing optional package, a named model priced at the bundled
tokenizer's vocabulary, the examples' dry runs, a mistyped flag, the tiny launcher's --save, and the wording of a
few errors. Scripts run in a subprocess, as a user runs them."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from megallama.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
         "--no-fused-kernels", "--device", "cpu"]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES",
                "NODE_RANK", "SLURM_PROCID"):
        env.pop(key, None)
    return {**env, **extra}


def _python(*argv, timeout=300, cwd=REPO, **env):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, env=_env(**env),
                          timeout=timeout)


# ---------------------------------------------------------------- 1. the hf extra missing
@pytest.mark.parametrize("direction", [["megallama-to-hf", "--load", "ckpt"], ["hf-to-megallama", "--hf-dir", "hf"]])
def test_conversion_without_safetensors_is_one_line_naming_the_extra(tmp_path, direction):
    wrapper = ("import runpy, sys; sys.modules['safetensors'] = sys.modules['safetensors.torch'] = None; "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    tool = os.path.join(REPO, "tools", "convert_checkpoint.py")
    r = _python("-c", wrapper, tool, *direction, "--output", "out", cwd=str(tmp_path), timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "'safetensors' package" in r.stderr and 'pip install -e ".[hf]"' in \
        r.stderr, r.stderr[-2000:]
    assert os.listdir(tmp_path) == []  # nothing written


# ---------------------------------------------------------------- 2. a named model shrunk to the bundled tokenizer
def test_dry_run_warns_that_a_named_model_follows_the_bundled_tokenizer(tmp_path):
    r = _python(os.path.join(REPO, "pretrain_llama.py"), "--model", "llama3_8b", "--dry-run", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    want = ("warning: llama3_8b's vocabulary is 128256 but the embedding follows the bundled tokenizer's 8192 "
            "(7.05B params, not 8.03B); pass --tokenizer-type/--tokenizer-model for the model's own tokenizer or "
            "--vocab-size 128256")
    assert r.stdout.count(want) == 1, r.stdout[-3000:]


def test_the_real_run_warns_too_and_only_for_a_published_model(tmp_path, capsys):
    from megallama.arguments import parse_args
    from megallama.autoconfig_args import follow_tokenizer
    from megallama.training_setup import build_data
    data = ["--data-cache-dir", str(tmp_path), "--train-iters", "1"]
    build_data(parse_args(["--model", "llama3_8b", *SMALL, *data], world_size=1))
    out = capsys.readouterr().out
    assert "warning: llama3_8b's vocabulary is 128256 but the embedding follows the bundled tokenizer's 8192" in out
    for argv in (["--model", "tiny_llama3_50m"], ["--model", "llama3_8b", "--vocab-size", "128256"]):
        line = follow_tokenizer(parse_args(argv + SMALL, world_size=1))
        assert "warning" not in line and "warning" not in capsys.readouterr().out, line
    build_data(parse_args(["--model", "tiny_llama3_50m", *SMALL, *data], world_size=1))
    assert "warning" not in capsys.readouterr().out


# ---------------------------------------------------------------- 3. the examples' dry run prices their launch
@pytest.mark.parametrize("example,extra,expect", [
    ("train_llama_7b", [], "8 GPUs = tp 2 x pp 1 x dp 4 (+sp), ZeRO-1, recompute full"),
    ("train_llama_7b", ["--gpus", "4"], "4 GPUs = tp 2 x pp 1 x dp 2 (+sp), ZeRO-1"),
    ("multi_node_training", [], "32 GPUs = tp 8 x pp 2 x dp 2 (+sp), ZeRO-2"),
    ("multi_node_training", ["--gpus", "8", "--nodes", "8"], "64 GPUs = tp 8 x pp"),
])
def test_example_dry_run_plans_the_launch_it_stands_for(example, extra, expect, tmp_path):
    r = _python(os.path.join(REPO, "examples", f"{example}.py"), "--dry-run", *extra, cwd=str(tmp_path))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert expect in r.stdout and "cannot hold tp 2" not in r.stdout, r.stdout[-3000:]
    assert "vocab 8192" not in r.stdout and "warning" not in r.stdout and "does NOT fit" not in r.stdout


# ---------------------------------------------------------------- 6. a mistyped flag
def test_a_mistyped_flag_names_the_closest_one(capsys):
    from megallama.arguments import parse_args
    for typo, flag in ((["--trian-iters", "5"], "--train-iters"), (["--mirco-batch-size=3"], "--micro-batch-size")):
        with pytest.raises(SystemExit) as done:
            parse_args(["--model", "tiny_llama3_50m", *typo], world_size=1)
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.count("\n") == 1 and f"did you mean {flag}? see --help" in err, err
    with pytest.raises(SystemExit):
        parse_args(["--model", "tiny_llama3_50m", "--xyzzy-plugh"], world_size=1)
    assert capsys.readouterr().err == "error: unrecognized arguments: --xyzzy-plugh; see --help for the flags\n"


# ---------------------------------------------------------------- 4. the tiny launcher's --load follows --save
def test_tiny_launcher_loads_from_the_save_directory_given(tmp_path):
    """The script ends in ``exec python pretrain_llama.py ...``: a stub python on PATH shows the flags it gets."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python").write_text('#!/usr/bin/env bash\necho "$@"\n')
    (stub / "python").chmod(0o755)
    env = _env(PATH=f"{stub}{os.pathsep}{os.environ['PATH']}")
    script = os.path.join(REPO, "examples", "pretrain_tiny_cpu.sh")

    def flags(*argv):
        r = subprocess.run(["bash", script, *argv], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        words = r.stdout.split()
        return words[words.index("--save") + 1], words[words.index("--load") + 1]

    assert flags() == ("checkpoints/tiny", "checkpoints/tiny")
    assert flags("--train-iters", "2", "--save", "/tmp/x") == ("/tmp/x", "/tmp/x")
    assert flags("--save=/tmp/y") == ("/tmp/y", "/tmp/y")


# ---------------------------------------------------------------- 7. wording
def test_lr_change_prints_short_floats():
    from megallama.lr_scheduler import OptimizerParamScheduler
    s = OptimizerParamScheduler(None, 3e-4, 3e-4 / 10, 10, 100, "cosine")
    with pytest.raises(ConfigError) as e:
        s.load_state_dict(dict(s.state_dict(), min_lr=2e-5))
    assert "--min-lr (default --lr/10) 2e-05 in the checkpoint, 3e-05 now" in str(e.value), str(e.value)


@pytest.mark.parametrize("iters,says", [((2, 4), "(iteration 4); pass another --save directory, or move it away"),
                                        ((2, 4, 6), "(iterations 4, 6); pass another --save directory, or move "
                                                    "those iterations away")])
def test_ckpt_step_refusal_counts_the_later_checkpoints(tmp_path, iters, says):
    from megallama.checkpointing.files import check_save_dir
    for i in iters:
        (tmp_path / f"iter_{i:07d}").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text(str(iters[-1]))
    with pytest.raises(ConfigError) as e:
        check_save_dir(SimpleNamespace(save=str(tmp_path), load=str(tmp_path), ckpt_step=2, finetune=False))
    assert says in str(e.value), str(e.value)


def test_api_layout_line_says_one_gpu():
    import megallama
    shape = dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2)
    text = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", num_gpus=1, model_overrides=shape) \
        .print_configuration()
    assert "layout: 1 GPU = tp 1 x pp 1 x dp 1," in text, text
