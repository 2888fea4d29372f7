"""Megatron's --train-data-path / --valid-data-path / --test-data-path: whole corpora per split instead of --split
shares of one. The training stream is the one --data-path X --split 100,0,0 gives (same samples, same order), the
validation set is the other corpus, and the test corpus is evaluated once at the end."""
import json
import re

import pytest

from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.training import pretrain

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--lr", "3e-3", "--no-progress-bar", "--device", "cpu", "--train-iters", "4",
        "--lr-warmup-iters", "1", "--eval-iters", "2"]


def _corpus(path, words, n=40):
    words = words.split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(40))}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("per_split")
    return {"train": _corpus(d / "train.jsonl", "the quick brown fox jumps over a lazy dog while wizards hex plums"),
            "valid": _corpus(d / "valid.jsonl", "import sys def main return value class object list dict"),
            "test": _corpus(d / "test.jsonl", "lorem ipsum dolor sit amet consectetur adipiscing elit sed do"),
            "cache": str(d / "cache")}


def _run(argv, corpora):
    return pretrain(parse_args(TINY + ["--data-cache-dir", corpora["cache"]] + argv, world_size=1))


def test_each_split_comes_from_its_own_corpus(corpora, capsys):
    per_split = _run(["--train-data-path", corpora["train"], "--valid-data-path", corpora["valid"],
                      "--test-data-path", corpora["test"], "--eval-interval", "2"], corpora)
    out = capsys.readouterr().out
    one = _run(["--data-path", corpora["train"], "--split", "100,0,0"], corpora)
    assert per_split["losses"] == one["losses"]  # the whole train corpus, in --split 100,0,0's order
    assert sorted(per_split["valid_losses"]) == [2, 4] and per_split["test_loss"] is not None
    m = re.search(r"validation loss at iteration 4 on test set \| lm loss value: ([0-9.E+-]+)", out)
    assert m and float(m.group(1)) == pytest.approx(per_split["test_loss"], rel=1e-6)
    on_train = _run(["--train-data-path", corpora["train"], "--valid-data-path", corpora["train"],
                     "--eval-interval", "2"], corpora)
    assert on_train["losses"] == per_split["losses"]
    assert on_train["valid_losses"][4] < per_split["valid_losses"][4]  # its own text is easier than unseen code


@pytest.mark.parametrize("argv,says", [
    (["--data-path", "{train}", "--valid-data-path", "{valid}"], "pass --data-path (split by --split) or"),
    (["--valid-data-path", "{valid}"], "--valid-data-path/--test-data-path need --train-data-path"),
    (["--mock-data", "--train-data-path", "{train}"], "--mock-data makes random tokens"),
    (["--per-split-data-args-path", "{valid}", "--data-path", "{train}"], "pass --data-path (split by --split) or "
                                                                          "--per-split-data-args-path, not both"),
])
def test_mixing_the_two_ways_is_one_line(corpora, argv, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        _run([a.format(**corpora) for a in argv], corpora)


def test_given_validation_and_test_data_are_used(corpora, capsys):
    """A --valid-data-path is validated at the end even without --eval-interval, and --split's third share is the
    test set, evaluated once at the end (Megatron's)."""
    out = _run(["--train-data-path", corpora["train"], "--valid-data-path", corpora["valid"]], corpora)
    assert sorted(out["valid_losses"]) == [4] and out["test_loss"] is None
    split = _run(["--data-path", corpora["train"], "--split", "80,10,10"], corpora)
    assert split["test_loss"] is not None and split["valid_losses"] == {}
    assert "on test set" in capsys.readouterr().out
    assert _run(["--data-path", corpora["train"], "--split", "90,10,0"], corpora)["test_loss"] is None
