"""tools/preprocess_data.py: jsonl -> .bin/.idx; same bytes for any worker count; malformed input is one error line
with its line number, exit 2, and nothing written or overwritten."""
import gzip
import json
import os
import sys

import numpy as np

from megallama.data.indexed_dataset import IndexedDataset
from megallama.data.preprocess import preprocess_jsonl

from data_testlib import TEXTS, write_jsonl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tools.preprocess_data import main  # noqa: E402


def _read(prefix):
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def test_cli_writes_megatron_files(tmp_path, bundled_tokenizer, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS)
    rc = main(["--input", src, "--output-prefix", str(tmp_path / "out"), "--append-eod"])
    assert rc == 0
    docs = _read(str(tmp_path / "out_text_document"))
    expected = [bundled_tokenizer.encode(t) + [bundled_tokenizer.eod] for t in TEXTS if t]  # empty texts skipped
    assert docs == expected
    assert "100%" in capsys.readouterr().err  # the progress bar


def test_workers_and_gzip_give_identical_bytes(tmp_path, bundled_tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", TEXTS * 3)
    with open(src, "rb") as f, gzip.open(tmp_path / "in.jsonl.gz", "wb") as g:
        g.write(f.read())
    preprocess_jsonl(src, str(tmp_path / "one"), bundled_tokenizer, workers=1, progress=False, chunk_lines=5)
    preprocess_jsonl(str(tmp_path / "in.jsonl.gz"), str(tmp_path / "two"), bundled_tokenizer, workers=2,
                     progress=False, chunk_lines=5)
    for ext in (".bin", ".idx"):
        a = open(tmp_path / f"one_text_document{ext}", "rb").read()
        assert a == open(tmp_path / f"two_text_document{ext}", "rb").read()


def test_json_keys_and_no_eod(tmp_path, bundled_tokenizer):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"q": f"question {i}", "a": f"answer {i}"}) for i in range(4)) + "\n\n")
    prefixes = preprocess_jsonl(str(src), str(tmp_path / "o"), bundled_tokenizer, json_keys=("q", "a"),
                                append_eod=False, progress=False)
    assert _read(prefixes["a"])[2] == bundled_tokenizer.encode("answer 2")
    assert len(_read(prefixes["q"])) == 4


def test_malformed_line_reports_line_number_and_writes_nothing(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", TEXTS)
    out = str(tmp_path / "out")
    assert main(["--input", good, "--output-prefix", out, "--append-eod", "--no-progress-bar"]) == 0
    before = {ext: open(f"{out}_text_document{ext}", "rb").read() for ext in (".bin", ".idx")}
    lines = open(good).read().splitlines()
    lines[16] = '{"text": "unterminated'
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["--input", good, "--output-prefix", out, "--no-progress-bar"]) == 2  # outputs exist
    assert capsys.readouterr().err.strip() == (f"error: {out}_text_document.bin already exists; pass --overwrite "
                                               "to replace it or choose another --output-prefix")
    for workers in ("1", "2"):
        assert main(["--input", str(bad), "--output-prefix", out, "--workers", workers, "--no-progress-bar",
                     "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {bad} line 17: not valid JSON") and "\n" not in err
    after = {ext: open(f"{out}_text_document{ext}", "rb").read() for ext in (".bin", ".idx")}
    assert after == before  # not overwritten
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "good.jsonl", "out_text_document.bin",
                                           "out_text_document.idx", "out_text_document.tokenizer-info.json"]
    # (no temp files left)
    (tmp_path / "nokey.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    assert main(["--input", str(tmp_path / "nokey.jsonl"), "--output-prefix", str(tmp_path / "n")]) == 2
    assert "line 2: no 'text' key (keys: body); pass --json-keys" in capsys.readouterr().err


def test_missing_and_empty_input(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "o")]) == 2
    assert f"data file not found: {tmp_path / 'nope.jsonl'}" in capsys.readouterr().err
    write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    assert main(["--input", str(tmp_path / "empty.jsonl"), "--output-prefix", str(tmp_path / "o")]) == 2
    assert "holds no non-empty 'text' texts" in capsys.readouterr().err
    assert not any(n.startswith("o_") for n in os.listdir(tmp_path))


def test_bundled_corpus_tokenizes_fast(tmp_path, bundled_tokenizer):
    import time
    from megallama.data import get_bundled_corpus_path
    t0 = time.time()
    p = preprocess_jsonl(get_bundled_corpus_path(), str(tmp_path / "c"), bundled_tokenizer, progress=False)["text"]
    elapsed = time.time() - t0
    ds = IndexedDataset(p)
    assert ds.num_documents > 500 and ds.num_tokens > 1_000_000 and ds.dtype == np.uint16
    assert elapsed < 20, f"tokenizing the bundled corpus took {elapsed:.1f}s"
