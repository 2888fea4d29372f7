"""Blends in Megatron's per-split paths (``--train-data-path 0.3 a 0.7 b``), ``--data-args-path`` and
``--per-split-data-args-path``: each split is a blend sampled as --data-path's (deterministic, every prefix of the
stream within one sample of the weights, each corpus's own samples in order); prefixes without weights are weighted
by size, as in Megatron; the file flags train exactly as the command line they stand for; a resumed run continues
the same stream; bad input and Megatron's forbidden mixes are one line each."""
import argparse
import json
import re

import numpy as np
import pytest

from megallama.arguments import parse_args
from megallama.data.blended_dataset import build_corpora_blend
from megallama.data.data_args import data_blend_per_split, resolve_data_args
from megallama.data.gpt_dataset import build_dataset_from_path
from megallama.data.preprocess import preprocess_jsonl
from megallama.errors import ConfigError
from megallama.training import pretrain

TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--lr", "3e-3", "--no-progress-bar", "--device", "cpu", "--train-iters", "6",
        "--lr-warmup-iters", "1", "--eval-iters", "2"]


def _corpus(path, words, n):
    words = words.split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(words[(i * 5 + j) % len(words)] for j in range(20 + i % 9))}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, bundled_tokenizer):
    """a and b as jsonl, c as a .bin/.idx prefix (tools/preprocess_data.py's output), of different sizes."""
    d = tmp_path_factory.mktemp("blends")
    c_jsonl = _corpus(d / "c.jsonl", "lorem ipsum dolor sit amet consectetur adipiscing elit sed do", 30)
    c = preprocess_jsonl(c_jsonl, str(d / "c"), bundled_tokenizer, progress=False)["text"]
    return {"a": _corpus(d / "a.jsonl", "the quick brown fox jumps over a lazy dog while wizards hex", 40),
            "b": _corpus(d / "b.jsonl", "import sys def main return value class object list dict", 200),
            "c": c, "dir": d, "cache": str(d / "cache")}


def _ns(**kw):
    base = dict(data_path=None, data_args_path=None, per_split_data_args_path=None, train_data_path=None,
                valid_data_path=None, test_data_path=None, given_flags=[])
    return argparse.Namespace(**{**base, **kw})


def _tokens(ds, i):
    return ds[i]["input_ids"].numpy()


def test_a_weighted_split_blend_is_deterministic_and_follows_the_weights(corpora, bundled_tokenizer):
    a, c = corpora["a"], corpora["c"]
    blend = data_blend_per_split(_ns(train_data_path=("0.25", a, "0.75", c)))["train"]
    assert blend == [(0.25, a), (0.75, c)]
    kw = dict(tokenizer=bundled_tokenizer, seq_length=16, seed=5, cache_dir=corpora["cache"], name="train", salt=0)
    train = build_corpora_blend(blend, num_samples=400, **kw)
    for n in (1, 10, 99, 400):  # every prefix of the stream within one sample of its share
        counts = np.bincount(train.corpus[:n], minlength=2)
        assert np.all(np.abs(counts - np.array([0.25, 0.75]) * n) <= 1), (n, counts)
    parts = [build_dataset_from_path(p, bundled_tokenizer, 16, 5 + 7919 * d, corpora["cache"], None, "train", 0)
             for d, p in enumerate((a, c))]
    for i in range(0, 400, 7):  # each sample is its corpus's next one (later epochs reshuffled, none skipped)
        assert np.array_equal(_tokens(train, i), _tokens(parts[train.corpus[i]], train.sample[i]))
    again, shorter = build_corpora_blend(blend, num_samples=400, **kw), build_corpora_blend(blend, num_samples=50, **kw)
    assert all(np.array_equal(_tokens(again, i), _tokens(train, i)) for i in range(0, 400, 13))
    assert np.array_equal(shorter.corpus, train.corpus[:50]) and np.array_equal(shorter.sample, train.sample[:50])
    one = build_corpora_blend([(None, a)], num_samples=20, **kw)  # one corpus: the corpus itself, the run's seed
    plain = build_dataset_from_path(a, bundled_tokenizer, 16, 5, corpora["cache"], 20, "train", 0)
    assert all(np.array_equal(_tokens(one, i), _tokens(plain, i)) for i in range(20))


def test_prefixes_without_weights_are_weighted_by_size(corpora, bundled_tokenizer):
    """Megatron's blend without weights: each corpus in proportion to its length, so one epoch of the blend is one
    epoch of every corpus, each sample exactly once."""
    blend = data_blend_per_split(_ns(train_data_path=(corpora["a"], corpora["b"])))["train"]
    assert blend == [(None, corpora["a"]), (None, corpora["b"])]
    kw = dict(tokenizer=bundled_tokenizer, seq_length=16, seed=5, cache_dir=corpora["cache"], name="train", salt=0)
    epoch = build_corpora_blend(blend, num_samples=None, **kw)
    sizes = [len(build_dataset_from_path(corpora[k], bundled_tokenizer, 16, 5, corpora["cache"], None, "x", 0))
             for k in ("a", "b")]
    assert sizes[1] > 2 * sizes[0] and len(epoch) == sum(sizes)
    for d in range(2):
        assert np.array_equal(np.sort(epoch.sample[epoch.corpus == d]), np.arange(sizes[d]))
    assert np.allclose(epoch.weights, np.array(sizes) / sum(sizes))


def test_the_file_flags_train_as_the_command_line_they_stand_for(corpora):
    a, b, c, d = corpora["a"], corpora["b"], corpora["c"], corpora["dir"]
    common = TINY + ["--data-cache-dir", corpora["cache"], "--eval-interval", "3"]
    flags = pretrain(parse_args(common + ["--train-data-path", "0.3", a, "0.7", c, "--valid-data-path", b, a,
                                          "--test-data-path", b], world_size=1))
    (d / "split.json").write_text(json.dumps({"train": [0.3, a, 0.7, c], "valid": f"{b} {a}", "test": [b]}))
    as_json = pretrain(parse_args(common + ["--per-split-data-args-path", str(d / "split.json")], world_size=1))
    for key in ("losses", "valid_losses", "test_loss"):
        assert as_json[key] == flags[key], key
    assert sorted(flags["valid_losses"]) == [3, 6] and flags["test_loss"] is not None
    (d / "blend.txt").write_text(f"0.4 {a}\n0.6 {b}\n")
    in_file = pretrain(parse_args(common + ["--data-args-path", str(d / "blend.txt")], world_size=1))
    given = pretrain(parse_args(common + ["--data-path", "0.4", a, "0.6", b], world_size=1))
    assert in_file["losses"] == given["losses"] and in_file["valid_losses"] == given["valid_losses"]


def test_a_resumed_per_split_blend_continues_the_same_stream(corpora, tmp_path):
    argv = TINY + ["--data-cache-dir", corpora["cache"], "--train-data-path", "0.3", corpora["a"], "0.7",
                   corpora["c"], "--valid-data-path", corpora["b"], "--eval-interval", "2"]
    whole = pretrain(parse_args(argv, world_size=1))
    ck = ["--save", str(tmp_path / "ck"), "--load", str(tmp_path / "ck")]
    first = pretrain(parse_args(argv + ck + ["--exit-interval", "3"], world_size=1))["losses"]
    rest = pretrain(parse_args(argv + ck, world_size=1))
    assert sorted(first) == [1, 2, 3] and sorted(rest["losses"]) == [4, 5, 6]
    assert {**first, **rest["losses"]} == whole["losses"]
    assert rest["valid_losses"][6] == whole["valid_losses"][6]


@pytest.mark.parametrize("argv,says", [
    (["--train-data-path", "0.3", "{a}", "{b}"], "--train-data-path 0.3 {a} {b} is neither paths nor weight-path "
                                                 "pairs; write weight-path pairs"),
    (["--train-data-path", "{a}", "--valid-data-path", "0.5", "{a}", "-0.5", "{b}"],
     "--valid-data-path weights must be positive, got [0.5, -0.5]"),
    (["--train-data-path", "0.5", "{a}", "0.5", "{dir}/nope"], "--train-data-path: {dir}/nope not found; pass an "
                                                               "existing .jsonl file or the prefix of a .bin/.idx"),
    (["--data-args-path", "{dir}/empty.txt"], "--data-args-path {dir}/empty.txt is empty; write the --data-path value"),
    (["--data-args-path", "{dir}/none.txt"], "--data-args-path {dir}/none.txt: no such file"),
    (["--per-split-data-args-path", "{dir}/notrain.json"], '{dir}/notrain.json has no "train" blend; write {{"train"'),
    (["--per-split-data-args-path", "{dir}/broken.json"], "{dir}/broken.json is not JSON"),
    (["--per-split-data-args-path", "{dir}/typo.json"], "has keys validation; the keys are train, valid and test"),
    (["--data-path", "{a}", "--data-args-path", "{dir}/ok.txt"], "--data-path and --data-args-path {dir}/ok.txt both "
                                                                 "give the data; pass one"),
    (["--train-data-path", "{a}", "--per-split-data-args-path", "{dir}/ok.json"],
     "--train-data-path/--valid-data-path/--test-data-path and --per-split-data-args-path both give the per-split"),
    (["--data-args-path", "{dir}/ok.txt", "--per-split-data-args-path", "{dir}/ok.json"],
     "pass --data-args-path (split by --split) or --per-split-data-args-path, not both"),
    (["--train-data-path", "{a}", "--split", "90,10,0"], "--split divides --data-path's corpora, but"),
])
def test_bad_data_args_are_one_line(corpora, argv, says):
    d = corpora["dir"]
    (d / "empty.txt").write_text("  \n")
    (d / "ok.txt").write_text(corpora["a"])
    (d / "notrain.json").write_text(json.dumps({"valid": [corpora["a"]]}))
    (d / "broken.json").write_text('{"train": ')
    (d / "typo.json").write_text(json.dumps({"train": [corpora["a"]], "validation": [corpora["b"]]}))
    (d / "ok.json").write_text(json.dumps({"train": [corpora["a"]]}))
    fill = dict(a=corpora["a"], b=corpora["b"], dir=str(d))
    with pytest.raises(ConfigError, match=re.escape(says.format(**fill))) as e:
        resolve_data_args(parse_args(TINY + [x.format(**fill) for x in argv], world_size=1))
    assert "\n" not in str(e.value)


def test_a_megatron_line_validates_when_the_json_gives_a_valid_blend(corpora):
    """Megatron validates every 1000 iterations when there is validation data: a "valid" blend in the JSON file
    is that, a JSON file without one is not."""
    line = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--max-position-embeddings",
            "64", "--seq-length", "16", "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
            "--position-embedding-type", "rope", "--attention-dropout", "0", "--hidden-dropout", "0",
            "--micro-batch-size", "1", "--train-iters", "4", "--lr", "1e-3"]
    d = corpora["dir"]
    (d / "with_valid.json").write_text(json.dumps({"train": [corpora["a"]], "valid": [corpora["b"]], "test": None}))
    (d / "no_valid.json").write_text(json.dumps({"train": [corpora["a"]], "valid": None, "test": None}))
    for name, interval in (("with_valid", 1000), ("no_valid", None)):
        args = parse_args(line + ["--per-split-data-args-path", str(d / f"{name}.json")], world_size=1)
        assert args.eval_interval == interval, name
