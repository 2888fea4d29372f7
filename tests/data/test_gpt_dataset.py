"""Packed pretraining samples: every token once per epoch, deterministic order, exact resume, disjoint dp slices,
the jsonl cache, and one-line errors for bad data."""
import os

import numpy as np
import pytest
import torch

from megallama.data.gpt_dataset import (GPTDataset, build_data_iterator, build_pretraining_datasets,
                                        split_document_ranges)
from megallama.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megallama.data.samplers import MegatronPretrainingSampler
from megallama.errors import ConfigError

from data_testlib import TEXTS, write_jsonl


@pytest.fixture()
def unique_tokens(tmp_path):
    """40 documents of 1..37 tokens whose ids are all distinct (a token's id tells where it came from)."""
    rng = np.random.default_rng(0)
    b = IndexedDatasetBuilder(str(tmp_path / "u.bin"), np.int32)
    nxt, docs = 0, []
    for _ in range(40):
        n = int(rng.integers(1, 38))
        docs.append(np.arange(nxt, nxt + n))
        nxt += n
        b.add_document(docs[-1])
    b.finalize(str(tmp_path / "u.idx"))
    return IndexedDataset(str(tmp_path / "u")), docs


def test_split_rounding_like_megatron():
    assert split_document_ranges(100, "98,2,0") == [(0, 98), (98, 100), (100, 100)]
    assert split_document_ranges(10, "1,1,1") == [(0, 4), (4, 7), (7, 10)]
    assert split_document_ranges(7, "100") == [(0, 7), (7, 7), (7, 7)]
    with pytest.raises(ConfigError, match="like 98,2,0"):
        split_document_ranges(10, "a,b")


def test_packing_covers_every_token_once_per_epoch(unique_tokens):
    indexed, docs = unique_tokens
    s = 16
    ds = GPTDataset(indexed, (0, 30), s, seed=7, num_samples=None)
    total = sum(len(d) for d in docs[:30])
    assert ds.num_tokens == total and len(ds) == (total - 1) // s
    for epoch in range(2):
        inputs = []
        for i in range(epoch * len(ds), (epoch + 1) * len(ds)):
            x = ds[i]
            assert torch.equal(x["labels"][:-1], x["input_ids"][1:]) and x["loss_mask"].sum() == s
            inputs.append(x["input_ids"].numpy())
        seen = np.concatenate(inputs)
        assert len(np.unique(seen)) == len(seen) == len(ds) * s  # no token twice
        assert set(seen) <= set(np.concatenate(docs[:30]).tolist())  # only this split's documents
        assert total - len(seen) < s + 1  # at most the tail is dropped
        order, offsets, _ = ds.epoch_index(epoch)
        stream = np.concatenate([docs[j] for j in order])
        assert sorted(seen.tolist()) == sorted(stream[: len(seen)].tolist())  # the epoch's stream, in order


def test_order_is_deterministic_and_extends_across_epochs(unique_tokens):
    indexed, _ = unique_tokens
    a = GPTDataset(indexed, (0, 40), 8, seed=1, num_samples=None)
    b = GPTDataset(indexed, (0, 40), 8, seed=1, num_samples=5 * len(a))
    c = GPTDataset(indexed, (0, 40), 8, seed=2)
    n = len(a)
    assert len(b) == 5 * n and b.num_epochs == 5
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(n))
    assert all(torch.equal(a[i]["input_ids"], b[i]["input_ids"]) for i in range(3 * n, 3 * n + 5))  # any index
    assert not all(torch.equal(a[i]["input_ids"], c[i]["input_ids"]) for i in range(n))
    assert not all(torch.equal(b[i]["input_ids"], b[n + i]["input_ids"]) for i in range(n))  # reshuffled per epoch


def test_resume_gives_exactly_the_next_batches(unique_tokens):
    indexed, _ = unique_tokens
    ds = GPTDataset(indexed, (0, 40), 8, seed=3, num_samples=200)
    mbs, dp = 2, 2
    for rank in range(dp):
        full = build_data_iterator(ds, mbs, 0, rank, dp)
        ref = [next(full) for _ in range(12)]
        resumed = build_data_iterator(ds, mbs, 5 * mbs * dp, rank, dp)  # stopped after 5 micro-steps
        for k in range(5, 12):
            got = next(resumed)
            assert all(torch.equal(got[key], ref[k][key]) for key in ref[k])


def test_dp_slices_are_disjoint_and_cover_each_step(unique_tokens):
    indexed, _ = unique_tokens
    ds = GPTDataset(indexed, (0, 40), 8, seed=3, num_samples=60)
    mbs, dp = 3, 4
    its = [iter(MegatronPretrainingSampler(len(ds), 6, mbs, r, dp)) for r in range(dp)]
    for step in range(10):
        idx = [next(it) for it in its]
        flat = [i for part in idx for i in part]
        start = 6 + step * mbs * dp
        assert flat == [(start + j) % len(ds) for j in range(mbs * dp)]  # disjoint, in rank order, no gap
    batches = [next(build_data_iterator(ds, mbs, 0, r, dp)) for r in range(dp)]
    with_workers = next(build_data_iterator(ds, mbs, 0, 1, dp, num_workers=1))  # DataLoader path, same batch
    assert all(torch.equal(with_workers[k], batches[1][k]) for k in batches[1])
    rows = torch.cat([b["input_ids"] for b in batches])
    assert torch.equal(rows, torch.stack([ds[i]["input_ids"] for i in range(mbs * dp)]))
    assert batches[0]["input_ids"].shape == (mbs, 8) and batches[0]["input_ids"].dtype == torch.long


def test_jsonl_is_tokenized_once_and_cached(tmp_path, bundled_tokenizer):
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS * 4)
    cache = str(tmp_path / "cache")
    tr, va = build_pretraining_datasets(src, bundled_tokenizer, 16, 1234, "90,10,0", cache, progress=False)
    files = sorted(os.listdir(cache))
    assert len(files) == 3 and files[0].startswith("c-") and files[0].endswith("_text_document.bin")
    assert files[2].endswith("_text_document.tokenizer-info.json")  # the tokenizer record preprocess writes
    stamp = os.stat(os.path.join(cache, files[0])).st_mtime_ns
    tr2, _ = build_pretraining_datasets(src, bundled_tokenizer, 16, 1234, "90,10,0", cache, progress=False)
    assert os.stat(os.path.join(cache, files[0])).st_mtime_ns == stamp  # reused
    assert torch.equal(tr[3]["input_ids"], tr2[3]["input_ids"]) and va is not None
    assert bundled_tokenizer.eod in torch.cat([tr[i]["input_ids"] for i in range(len(tr))])  # docs end with eod
    write_jsonl(tmp_path / "c.jsonl", TEXTS * 5)  # edited file -> a new cache entry
    build_pretraining_datasets(src, bundled_tokenizer, 16, 1234, "90,10,0", cache, progress=False)
    assert len(os.listdir(cache)) == 6
    prefix = os.path.join(cache, files[0][: -len(".bin")])  # a .bin/.idx prefix works as data too
    tr3, _ = build_pretraining_datasets(prefix, bundled_tokenizer, 16, 1234, "90,10,0", progress=False)
    assert torch.equal(tr3[5]["input_ids"], tr[5]["input_ids"])
    tr4, va4 = build_pretraining_datasets(prefix + ".bin", bundled_tokenizer, 16, 1234, "100,0,0",
                                          num_train_samples=1000)
    assert len(tr4) == 1000 and va4 is None


def test_bad_data_is_one_clear_error(tmp_path, bundled_tokenizer):
    cache = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match=f"data not found: {tmp_path}/nope"):
        build_pretraining_datasets(str(tmp_path / "nope"), bundled_tokenizer, 16, 1, cache_dir=cache)
    with pytest.raises(ConfigError, match=f"data file not found: {tmp_path}/nope.jsonl"):
        build_pretraining_datasets(str(tmp_path / "nope.jsonl"), bundled_tokenizer, 16, 1, cache_dir=cache)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": 3\n')
    with pytest.raises(ConfigError, match=f"{bad} line 3: not valid JSON"):
        build_pretraining_datasets(str(bad), bundled_tokenizer, 16, 1, cache_dir=cache)
    assert os.listdir(cache) == []  # nothing half-written
    write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(ConfigError, match="no non-empty 'text' texts"):
        build_pretraining_datasets(str(tmp_path / "empty.jsonl"), bundled_tokenizer, 16, 1, cache_dir=cache)
    short = write_jsonl(tmp_path / "short.jsonl", ["a few words"] * 3)
    with pytest.raises(ConfigError, match="fewer than --seq-length \\+ 1 = 2049; use a shorter --seq-length"):
        build_pretraining_datasets(short, bundled_tokenizer, 2048, 1, "100,0,0", cache_dir=cache)


def test_tokens_beyond_the_vocabulary_are_rejected(tmp_path, bundled_tokenizer):
    b = IndexedDatasetBuilder(str(tmp_path / "big.bin"), np.int32)
    b.add_document(np.arange(9000, 9100))
    b.finalize(str(tmp_path / "big.idx"))
    with pytest.raises(ConfigError, match="token id 9099 but tokenizer 'bundled-bpe-8192' has only 8192"):
        build_pretraining_datasets(str(tmp_path / "big"), bundled_tokenizer, 16, 1)


def _build_on_rank(rank, world_size, src, cache):
    from megallama.data.tokenizer import build_tokenizer
    tr, _ = build_pretraining_datasets(src, build_tokenizer(), 16, 5, "90,10,0", cache, progress=False)
    return [tr[i]["input_ids"].tolist() for i in range(4)], sorted(os.listdir(cache))


def test_distributed_ranks_share_one_cache(tmp_path):
    from dist_utils import run_distributed
    src = write_jsonl(tmp_path / "d.jsonl", TEXTS * 4)
    out = run_distributed(_build_on_rank, 2, src, str(tmp_path / "cache"))
    assert out[0] == out[1] and len(out[0][1]) == 3
