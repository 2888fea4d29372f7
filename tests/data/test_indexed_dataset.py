"""Megatron .bin/.idx: the header parsed by hand (struct + numpy, not our reader), and writer/reader round trips."""
import struct

import numpy as np
import pytest

from megallama.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, optimal_dtype
from megallama.errors import ConfigError


def _build(prefix, docs, dtype):
    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype)
    for d in docs:
        if isinstance(d, tuple):  # (tokens, sentence lengths): a document of several sequences
            b.add_document(np.array(d[0]), d[1])
        else:
            b.add_document(np.array(d))
    b.finalize(f"{prefix}.idx")


def _parse_idx_independently(path):
    raw = open(path, "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, = struct.unpack("<Q", raw[9:17])
    code, = struct.unpack("<B", raw[17:18])
    n_seq, n_doc = struct.unpack("<QQ", raw[18:34])
    off = 34
    lengths = np.frombuffer(raw, np.int32, n_seq, off)
    off += 4 * n_seq
    pointers = np.frombuffer(raw, np.int64, n_seq, off)
    off += 8 * n_seq
    docs = np.frombuffer(raw, np.int64, n_doc, off)
    assert off + 8 * n_doc == len(raw)  # nothing else in the file
    return version, code, lengths, pointers, docs


@pytest.mark.parametrize("dtype,code", [(np.uint16, 8), (np.int32, 4)])
def test_header_matches_megatron_layout(tmp_path, dtype, code):
    docs = [[5, 6, 7], [1], ([9, 8, 7, 6, 5], [2, 3]), [4, 4]]
    _build(tmp_path / "d", docs, dtype)
    version, got_code, lengths, pointers, doc_idx = _parse_idx_independently(tmp_path / "d.idx")
    assert version == 1 and got_code == code
    assert lengths.tolist() == [3, 1, 2, 3, 2]
    item = np.dtype(dtype).itemsize
    assert pointers.tolist() == [0, 3 * item, 4 * item, 6 * item, 9 * item]
    assert doc_idx.tolist() == [0, 1, 2, 4, 5]
    flat = np.fromfile(tmp_path / "d.bin", dtype=dtype)
    assert flat.tolist() == [5, 6, 7, 1, 9, 8, 7, 6, 5, 4, 4]


def test_reader_round_trip_and_slices(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, rng.integers(1, 50)).tolist() for _ in range(30)]
    _build(tmp_path / "r", docs, optimal_dtype(60000))
    ds = IndexedDataset(str(tmp_path / "r"))
    assert len(ds) == 30 and ds.num_documents == 30 and ds.dtype == np.uint16
    assert ds.num_tokens == sum(map(len, docs))
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d
    assert [x.tolist() for x in ds[3:7]] == docs[3:7]
    long_doc = next(i for i, d in enumerate(docs) if len(d) >= 3)
    assert ds.get(long_doc, 1, 2).tolist() == docs[long_doc][1:3]
    assert optimal_dtype(128256) == np.int32 and optimal_dtype(32000) == np.uint16


def test_builder_add_index_merges_shards(tmp_path):
    _build(tmp_path / "a", [[1, 2], [3]], np.int32)
    _build(tmp_path / "b", [[4, 5, 6], ([7, 8], [1, 1])], np.int32)
    b = IndexedDatasetBuilder(str(tmp_path / "m.bin"), np.int32)
    b.add_index(str(tmp_path / "a"))
    b.add_index(str(tmp_path / "b"))
    b.finalize(str(tmp_path / "m.idx"))
    ds = IndexedDataset(str(tmp_path / "m"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[1, 2], [3], [4, 5, 6], [7], [8]]
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 5]


def test_reader_rejects_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        IndexedDataset(str(tmp_path / "missing"))
    _build(tmp_path / "t", [[1, 2, 3], [4, 5]], np.int32)
    with open(tmp_path / "t.bin", "r+b") as f:
        f.truncate(8)
    with pytest.raises(ConfigError, match="does not match"):
        IndexedDataset(str(tmp_path / "t"))
    (tmp_path / "x.idx").write_bytes(b"NOTMEGATRON" * 4)
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="bad magic"):
        IndexedDataset(str(tmp_path / "x"))
    with pytest.raises(ValueError, match="does not fit"):
        IndexedDatasetBuilder(str(tmp_path / "o.bin"), np.uint16).add_document(np.array([70000]))
