"""Several --json-keys: an empty text in one key must not shift that key's documents against the others' (document i
of every key's file comes from line i), and the empty document it leaves is read and packed like Megatron's."""
import json

import numpy as np
import pytest

from megallama.data.gpt_dataset import GPTDataset, build_pretraining_datasets
from megallama.data.indexed_dataset import IndexedDataset
from megallama.data.preprocess import preprocess_jsonl

ROWS = [("doc one", "title one"), ("", "title two"), ("doc three", "title three"), ("doc four", ""),
        ("", "title five"), ("doc six is the last one", "title six"), ("", "")]


def _document(ds, i):
    di = ds.document_indices
    parts = [ds[j] for j in range(int(di[i]), int(di[i + 1]))]
    return np.concatenate(parts).tolist() if parts else []


@pytest.mark.parametrize("workers", [1, 2])
def test_keys_stay_row_aligned_when_a_text_is_empty(tmp_path, bundled_tokenizer, workers):
    src = tmp_path / "mk.jsonl"
    src.write_text("".join(json.dumps({"text": t, "title": h}) + "\n" for t, h in ROWS * 3))
    prefixes = preprocess_jsonl(str(src), str(tmp_path / "mk"), bundled_tokenizer, workers=workers,
                                json_keys=("text", "title"), progress=False, chunk_lines=2)
    tok = bundled_tokenizer
    for col, key in enumerate(("text", "title")):
        ds = IndexedDataset(prefixes[key])
        assert ds.num_documents == len(ROWS) * 3
        for i, row in enumerate(ROWS * 3):
            want = tok.encode(row[col]) + [tok.eod] if row[col] else []  # an empty text: no tokens, not even eod
            assert _document(ds, i) == want
    # the empty documents hold no sequence (Megatron's layout), and packing skips them
    text = IndexedDataset(prefixes["text"])
    assert len(text) == sum(1 for t, _ in ROWS * 3 if t) and text.num_tokens == sum(
        len(tok.encode(t)) + 1 for t, _ in ROWS * 3 if t)
    ds = GPTDataset(text, (0, text.num_documents), 4, seed=1)
    seen = np.concatenate([ds[i]["input_ids"].numpy() for i in range(len(ds))])
    assert len(seen) == len(ds) * 4 and ds.num_tokens == text.num_tokens
    train, valid = build_pretraining_datasets(prefixes["text"], tok, 4, 1, "5,2,0")  # split over empty documents
    assert len(train) > 0 and valid is not None and len(valid) > 0


def test_one_key_keeps_empty_texts_as_megatron(tmp_path, bundled_tokenizer):
    src = tmp_path / "one.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in ROWS))
    p = preprocess_jsonl(str(src), str(tmp_path / "one"), bundled_tokenizer, progress=False)["text"]
    assert IndexedDataset(p).num_documents == len(ROWS) and len(IndexedDataset(p)) == sum(1 for t, _ in ROWS if t)
