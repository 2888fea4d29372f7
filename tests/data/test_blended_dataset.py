"""Weighted blends of corpora (Megatron's ``--data-path 0.3 a 0.7 b``): the interleaving keeps every prefix within
one sample of the weights and does not depend on the run length; a one-corpus blend is the corpus itself; the loop
trains on a blend given on the command line."""
import numpy as np
import pytest

from data_testlib import TEXTS, write_jsonl
from megallama.data.blended_dataset import BlendedDataset, blend_index, build_blended_datasets, parse_data_blend
from megallama.data.gpt_dataset import build_pretraining_datasets
from megallama.errors import ConfigError


def test_parse_weights_paths_and_errors():
    assert parse_data_blend(["0.3", "a", "0.7", "b"]) == [(0.3, "a"), (0.7, "b")]
    assert parse_data_blend(["2", "a", "6", "b"]) == [(0.25, "a"), (0.75, "b")]
    assert parse_data_blend(["a", "b"]) == [(None, "a"), (None, "b")]  # Megatron's: weighted by size
    with pytest.raises(ConfigError, match="neither paths nor weight-path pairs"):
        parse_data_blend(["0.3", "a", "b"])
    with pytest.raises(ConfigError, match="weights must be positive"):
        parse_data_blend(["0", "a", "1", "b"])


def test_blend_index_follows_the_weights_and_is_prefix_stable():
    w = [0.2, 0.5, 0.3]
    corpus, sample = blend_index(w, 1000)
    for n in (1, 7, 100, 333, 1000):  # every prefix within one sample of its share
        counts = np.bincount(corpus[:n], minlength=3)
        assert np.all(np.abs(counts - np.array(w) * n) <= 1), (n, counts)
    short = blend_index(w, 333)
    assert np.array_equal(short[0], corpus[:333]) and np.array_equal(short[1], sample[:333])
    for d in range(3):  # each corpus's samples in order, none skipped
        assert np.array_equal(sample[corpus == d], np.arange((corpus == d).sum()))


def test_blend_samples_come_from_their_corpora(tmp_path, bundled_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    b = write_jsonl(tmp_path / "b.jsonl", [t.upper() for t in TEXTS])
    kw = dict(tokenizer=bundled_tokenizer, seq_length=16, seed=3, split="80,20,0", cache_dir=str(tmp_path / "c"))
    one, one_valid = build_blended_datasets([(1.0, a)], num_train_samples=40, **kw)
    plain, plain_valid = build_pretraining_datasets(a, num_train_samples=40, progress=False, **kw)
    assert all(np.array_equal(one[i]["input_ids"], plain[i]["input_ids"]) for i in range(40))
    train, valid = build_blended_datasets([(0.25, a), (0.75, b)], num_train_samples=40, **kw)
    assert isinstance(train, BlendedDataset) and len(train) == 40 and valid is not None
    pa, _ = build_pretraining_datasets(a, num_train_samples=10, progress=False, **kw)
    pb, _ = build_pretraining_datasets(b, seq_length=16, seed=3 + 7919, split="80,20,0", cache_dir=kw["cache_dir"],
                                       tokenizer=bundled_tokenizer, num_train_samples=30, progress=False)
    got = {0: [], 1: []}
    for i in range(40):
        got[int(train.corpus[i])].append(train[i]["input_ids"])
    assert len(got[0]) == 10 and len(got[1]) == 30
    assert all(np.array_equal(x, pa[k]["input_ids"]) for k, x in enumerate(got[0]))
    assert all(np.array_equal(x, pb[k]["input_ids"]) for k, x in enumerate(got[1]))


def test_paths_without_weights_blend_by_size(tmp_path, bundled_tokenizer):
    """Megatron's ``--data-path a b``: each corpus's split weighted by its length, so one epoch of the train blend
    is one epoch of each corpus's train split (the valid blend likewise), each sample once."""
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    b = write_jsonl(tmp_path / "b.jsonl", [t.upper() for t in TEXTS * 3])
    kw = dict(tokenizer=bundled_tokenizer, seq_length=16, seed=3, split="80,20,0", cache_dir=str(tmp_path / "c"))
    train, valid = build_blended_datasets(parse_data_blend([a, b]), num_train_samples=None, **kw)
    rest = {k: v for k, v in kw.items() if k != "seed"}
    (ta, va), (tb, vb) = (build_pretraining_datasets(p, seed=3 + 7919 * d, progress=False, **rest)
                          for d, p in enumerate((a, b)))
    for blend, parts in ((train, (ta, tb)), (valid, (va, vb))):
        assert len(blend) == sum(len(p) for p in parts)
        for d, part in enumerate(parts):
            assert np.array_equal(np.sort(blend.sample[blend.corpus == d]), np.arange(len(part)))


def test_pretrain_on_a_blend_from_the_command_line(tmp_path):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    b = write_jsonl(tmp_path / "b.jsonl", [t.upper() for t in TEXTS])
    argv = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "16", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--train-iters", "3", "--device", "cpu", "--no-progress-bar",
            "--data-cache-dir", str(tmp_path / "c"), "--data-path", "0.3", a, "0.7", b]
    args = parse_args(argv, world_size=1)
    assert args.data_blend == [(0.3, a), (0.7, b)]
    out = pretrain(args)
    assert out["iteration"] == 3 and all(np.isfinite(v) for v in out["losses"].values())
    args = parse_args(argv[:-4] + [a], world_size=1)  # one path: as before
    assert args.data_path == a and args.data_blend is None


def test_a_blend_keeps_its_test_share(tmp_path, bundled_tokenizer):
    """--split's third share of each blended corpus is the test blend, evaluated at the end of training (it was held
    out and never used)."""
    from megallama.arguments import parse_args
    from megallama.data.blended_dataset import build_blended_test_dataset
    from megallama.data.gpt_dataset import build_test_split
    from megallama.training import pretrain
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS * 2)
    b = write_jsonl(tmp_path / "b.jsonl", [t.upper() for t in TEXTS * 2])
    kw = dict(tokenizer=bundled_tokenizer, seq_length=16, seed=3, split="80,10,10", cache_dir=str(tmp_path / "c"))
    test = build_blended_test_dataset([(0.5, a), (0.5, b)], num_samples=20, **kw)
    only_a = build_test_split(a, bundled_tokenizer, 16, 3, "80,10,10", str(tmp_path / "c"), None)
    assert len(test) == 20 and sorted(set(test.corpus.tolist())) == [0, 1]
    first_a = next(i for i in range(20) if test.corpus[i] == 0)
    assert np.array_equal(test[first_a]["input_ids"], only_a[0]["input_ids"])
    assert build_blended_test_dataset([(1.0, a)], num_samples=4, **dict(kw, split="90,10,0")) is None
    argv = ["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
            "--train-iters", "2", "--device", "cpu", "--no-progress-bar", "--data-cache-dir", str(tmp_path / "c"),
            "--split", "80,10,10", "--data-path", "0.5", a, "0.5", b]
    out = pretrain(parse_args(argv, world_size=1))
    assert out["test_loss"] is not None and np.isfinite(out["test_loss"])
