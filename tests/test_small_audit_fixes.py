"""Small findings of user audits: every ``megallama`` subcommand's --help names itself, and a refused run leaves no
empty --save directory it made (one that existed before stays)."""
import os

import pytest

from megallama.arguments import parse_args
from megallama.cli import main
from megallama.errors import ConfigError
from megallama.training import pretrain

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "16", "--micro-batch-size", "1",
        "--global-batch-size", "1", "--mock-data", "--no-progress-bar", "--device", "cpu"]


@pytest.mark.parametrize("cmd", ["train", "generate", "estimate-memory", "benchmark", "validate-env"])
def test_each_subcommand_help_is_named_for_it(cmd, capsys):
    try:
        assert main([cmd, "--help"]) == 0
    except SystemExit as e:  # argparse's own --help exits 0
        assert e.code == 0
    assert capsys.readouterr().out.startswith(f"usage: megallama {cmd} ")


@pytest.mark.parametrize("script", ["pretrain_llama.py", "finetune_llama.py", "tools/estimate_memory.py"])
def test_each_script_help_is_named_for_it(script):
    """They shared the parser's fixed names ("usage: megallama", "usage: estimate-memory")."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith(f"usage: {os.path.basename(script)} "), out.stdout[:80]


def test_a_refused_run_removes_only_the_empty_save_directory_it_made(tmp_path, one_thread):
    refused = TINY + ["--train-iters", "2", "--lr-warmup-iters", "20"]  # refused after --save is checked writable
    new = tmp_path / "new" / "ck"
    with pytest.raises(ConfigError, match="LR warmup"):
        pretrain(parse_args(refused + ["--save", str(new)], world_size=1))
    assert not (tmp_path / "new").exists()  # nor the parent it made
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(ConfigError, match="LR warmup"):
        pretrain(parse_args(refused + ["--save", str(kept)], world_size=1))
    assert kept.is_dir() and os.listdir(kept) == []
    ok = tmp_path / "ok"  # a run that saves keeps its directory
    pretrain(parse_args(TINY + ["--train-iters", "1", "--save", str(ok)], world_size=1))
    assert "latest_checkpointed_iteration.txt" in os.listdir(ok)


def test_mock_data_says_that_the_data_path_is_not_read(capsys):
    """--mock-data with --data-path trained on random tokens without a word (Megatron's mock dataset ignores the
    blend too): one warning line names the path."""
    parse_args(TINY + ["--train-iters", "1", "--data-path", "/tmp/nope.jsonl"], world_size=1)
    err = capsys.readouterr().err
    assert err.count("warning: --mock-data trains on random tokens: --data-path /tmp/nope.jsonl is not read") == 1
    parse_args(TINY + ["--train-iters", "1"], world_size=1)
    assert "--mock-data" not in capsys.readouterr().err
