"""An empty text is an empty document in Megatron's preprocess_data.py (Encoder.encode gives no ids and no eod,
builder.add_document([], []) still ends a document): the same bytes here with one --json-keys key or several, any
worker count and --partitions; training's --split ignores empty documents (Megatron splits GPT data by sequence) and
a run trains on such data."""
import json
import os
import struct
import sys

import numpy as np
import pytest

from megallama.data.gpt_dataset import build_pretraining_datasets
from megallama.data.indexed_dataset import IndexedDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tools.preprocess_data import main  # noqa: E402

ROWS = [{"text": "hello world", "title": "a"}, {"text": "", "title": "b"}, {"text": "second one", "title": ""}]


def _idx_bytes(lengths, doc_idx, code=8, itemsize=2):
    """Megatron's .idx written out by hand: magic, version, dtype code, counts, lengths, byte pointers, doc index."""
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * itemsize if lengths else []
    return (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(lengths), len(doc_idx))
            + np.asarray(lengths, dtype=np.int32).tobytes() + np.asarray(pointers, dtype=np.int64).tobytes()
            + np.asarray(doc_idx, dtype=np.int64).tobytes())


@pytest.mark.parametrize("extra,order", [([], [0, 1, 2]), (["--json-keys", "text", "title"], [0, 1, 2]),
                                         (["--workers", "2"], [0, 1, 2]),
                                         (["--workers", "2", "--partitions", "2"], [0, 2, 1])])
def test_empty_row_is_a_document_with_no_sequences(tmp_path, capsys, bundled_tokenizer, extra, order):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "a"), "--append-eod", "--no-progress-bar"]
                + extra) == 0, capsys.readouterr().err
    tok = bundled_tokenizer
    ids = [tok.encode(ROWS[i]["text"]) + [tok.eod] if ROWS[i]["text"] else [] for i in order]  # partitions: i % 2
    lengths = [len(d) for d in ids if d]
    doc_idx = np.cumsum([0] + [1 if d else 0 for d in ids]).tolist()
    assert doc_idx == ([0, 1, 1, 2] if order == [0, 1, 2] else [0, 1, 2, 2])
    with open(tmp_path / "a_text_document.idx", "rb") as f:
        assert f.read() == _idx_bytes(lengths, doc_idx)
    with open(tmp_path / "a_text_document.bin", "rb") as f:
        assert f.read() == np.asarray([t for d in ids for t in d], dtype=np.uint16).tobytes()
    ds = IndexedDataset(str(tmp_path / "a_text_document"))
    assert ds.num_documents == 3 and len(ds) == 2


def _corpus(n_empty, n_full):
    return [""] * n_empty + [f"document {i} says " + "word " * (5 + i % 7) for i in range(n_full)]


def test_split_ignores_empty_documents(tmp_path, bundled_tokenizer):
    """Empty documents move no --split boundary (Megatron counts sequences): the splits equal those of the data
    without them, sample for sample."""
    sets = {}
    for name, texts in (("with", _corpus(10, 20)), ("without", _corpus(0, 20))):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        assert main(["--input", str(src), "--output-prefix", str(tmp_path / name), "--append-eod",
                     "--no-progress-bar"]) == 0
        assert IndexedDataset(str(tmp_path / f"{name}_text_document")).num_documents == len(texts)
        sets[name] = build_pretraining_datasets(str(tmp_path / f"{name}_text_document"), bundled_tokenizer, 8, 1,
                                                "70,30,0", progress=False)
    for a, b in zip(sets["with"], sets["without"]):
        assert a.num_tokens == b.num_tokens and len(a) == len(b)
        assert all(np.array_equal(a.sample_tokens(i), b.sample_tokens(i)) for i in range(len(a)))


def test_training_runs_on_data_with_empty_documents(tmp_path, capsys):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    src = tmp_path / "e.jsonl"
    texts = [t if i % 3 else "" for i, t in enumerate(_corpus(0, 40))]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "e"), "--append-eod",
                 "--no-progress-bar"]) == 0
    assert IndexedDataset(str(tmp_path / "e_text_document")).num_documents == 40
    args = parse_args(["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size",
                       "64", "--num-attention-heads", "2", "--num-query-groups", "1", "--seq-length", "16",
                       "--micro-batch-size", "2", "--train-iters", "2", "--no-progress-bar", "--device", "cpu",
                       "--data-path", str(tmp_path / "e_text_document"), "--split", "80,20,0"], world_size=1)
    out = pretrain(args)
    assert sorted(out["losses"]) == [1, 2] and all(np.isfinite(v) for v in out["losses"].values())
