"""tools/train_tokenizer.py, make_corpus.py, make_chat_sample.py: an existing output (the bundled assets by default)
is replaced only with --overwrite, refused before any work; bad input is one error line (exit 2), not a traceback."""
import gzip
import hashlib
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tools import make_chat_sample, make_corpus, train_tokenizer  # noqa: E402

ASSETS = os.path.join(REPO, "megallama", "assets")
LINES = ["the quick brown fox jumps over the lazy dog", "a module is a file of python code 12345",
         "generation decodes one token at a time", "sentencepiece learns pieces from sentences"]


def _corpus(path, n=60):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"{LINES[i % 4]} {i}\n{LINES[(i + 1) % 4]}"}) + "\n")
    return str(path)


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _one_error(capsys, says):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and says in err, err


def test_train_tokenizer_keeps_existing_files(tmp_path, capsys):
    corpus = _corpus(tmp_path / "a.jsonl")
    bundled = os.path.join(ASSETS, "tokenizer.model")
    before = _sha(bundled)
    assert train_tokenizer.main(["--corpus", corpus, "--vocab-size", "300"]) == 2  # default --output: the bundled one
    _one_error(capsys, "tokenizer.model already exists; pass --overwrite")
    assert _sha(bundled) == before
    victim = tmp_path / "victim.jsonl"
    victim.write_text('{"text": "precious"}\n')
    assert train_tokenizer.main(["--corpus", corpus, "--vocab-size", "300", "--output", str(victim)]) == 2
    _one_error(capsys, "already exists")
    assert victim.read_text() == '{"text": "precious"}\n'
    out = str(tmp_path / "tok.model")
    assert train_tokenizer.main(["--corpus", corpus, "--vocab-size", "300", "--output", out]) == 0
    first = _sha(out)
    assert train_tokenizer.main(["--corpus", corpus, "--vocab-size", "300", "--output", out, "--overwrite"]) == 0
    assert _sha(out) == first  # deterministic
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "tok.model", "victim.jsonl"]  # no tmp left


def test_train_tokenizer_bad_input_is_one_line(tmp_path, capsys):
    out = str(tmp_path / "tok.model")
    assert train_tokenizer.main(["--corpus", str(tmp_path / "missing.jsonl"), "--output", out]) == 2
    _one_error(capsys, "missing.jsonl not found")
    assert train_tokenizer.main(["--corpus", _corpus(tmp_path / "a.jsonl"), "--vocab-size", "100000",
                                 "--output", out]) == 2
    _one_error(capsys, "lower --vocab-size")
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe\x00\x81binary\n" * 10)
    assert train_tokenizer.main(["--corpus", str(binary), "--output", out]) == 2
    _one_error(capsys, "not UTF-8")
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": []}\n')
    assert train_tokenizer.main(["--corpus", str(chat), "--output", out]) == 2
    _one_error(capsys, "line 1: no string 'text' key (messages)")
    assert not os.path.exists(out)


def test_make_chat_sample_refuses_existing_and_regenerates_the_asset_byte_for_byte(tmp_path, capsys):
    bundled = os.path.join(ASSETS, "chat_sample.jsonl.gz")
    before = _sha(bundled)
    assert make_chat_sample.main([]) == 2
    _one_error(capsys, "chat_sample.jsonl.gz already exists; pass --overwrite")
    assert _sha(bundled) == before
    victim = tmp_path / "existing.jsonl"
    victim.write_text("keep me\n")
    assert make_chat_sample.main(["--output", str(victim), "--num", "3"]) == 2
    _one_error(capsys, "already exists")
    assert victim.read_text() == "keep me\n"
    out = tmp_path / "chat_sample.jsonl.gz"  # the asset's name: the gzip header holds it
    assert make_chat_sample.main(["--output", str(out)]) == 0
    assert make_chat_sample.main(["--output", str(out), "--overwrite"]) == 0
    assert _sha(out) == before and len(gzip.open(out).read().splitlines()) == 2000
    with pytest.raises(SystemExit) as e:  # was: "wrote 0 conversations", an empty file finetuning refuses
        make_chat_sample.main(["--output", str(tmp_path / "none.jsonl.gz"), "--num", "0"])
    assert e.value.code == 2 and not os.path.exists(tmp_path / "none.jsonl.gz")
    _one_error(capsys, "--num must be >= 1, got 0")


def test_make_corpus_refuses_existing_before_any_work(tmp_path, capsys, monkeypatch):
    def boom():
        raise AssertionError("work started before the output was checked")
    monkeypatch.setattr(make_corpus, "stdlib_documents", boom)
    before = _sha(os.path.join(ASSETS, "corpus.jsonl.gz"))
    assert make_corpus.main([]) == 2
    _one_error(capsys, "corpus.jsonl.gz already exists; pass --overwrite")
    assert _sha(os.path.join(ASSETS, "corpus.jsonl.gz")) == before
    victim = tmp_path / "data.jsonl.gz"
    victim.write_bytes(b"keep")
    assert make_corpus.main(["--output", str(victim)]) == 2
    _one_error(capsys, "already exists")
    assert victim.read_bytes() == b"keep"
    assert make_corpus.main(["--output", str(tmp_path / "no" / "dir.gz")]) == 2
    _one_error(capsys, "does not exist")
    monkeypatch.setattr(make_corpus, "stdlib_documents", lambda: [("python-stdlib:x", "some text " * 40)])
    monkeypatch.setattr(make_corpus, "pydoc_topic_documents", lambda: [])
    monkeypatch.setattr(make_corpus, "license_documents", lambda: [])
    monkeypatch.setattr(make_corpus, "man_documents", lambda rng, budget: [])
    assert make_corpus.main(["--output", str(victim), "--overwrite"]) == 0
    assert json.loads(gzip.open(victim).read())["source"] == "python-stdlib:x"
    assert sorted(os.listdir(tmp_path)) == ["data.jsonl.gz"]
