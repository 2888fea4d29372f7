"""Input that no tokenizer or decompressor can read (a JSON lone surrogate, a truncated or fake .gz) is one error
line naming the file and line, exit 2, nothing written: from tools/preprocess_data.py and from pretraining on a
jsonl, which tokenizes through the same code."""
import gzip
import json
import os
import sys

import pytest

from megallama.data.gpt_dataset import build_pretraining_datasets
from megallama.data.preprocess import preprocess_jsonl
from megallama.errors import ConfigError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tools.preprocess_data import main  # noqa: E402

SURROGATE = '{"text": "ok"}\n{"text": "fine too"}\n{"text": "a \\ud800 b"}\n{"text": "after"}\n'


def _run(capsys, *argv):
    capsys.readouterr()
    rc = main(["--no-progress-bar", *argv])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return rc, err


def _hf_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(["some text", "more words"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(tmp_path / "tokenizer.json"))
    return ["--tokenizer-type", "hf", "--tokenizer-model", str(tmp_path / "tokenizer.json")]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_lone_surrogate_names_the_line(tmp_path, capsys, workers):
    src = tmp_path / "sur.jsonl"
    src.write_text(SURROGATE)
    for tok in ([], _hf_tokenizer(tmp_path)):  # sentencepiece and HF both raised TypeError
        rc, err = _run(capsys, "--input", str(src), "--output-prefix", str(tmp_path / "o"), "--workers", workers,
                       *tok)
        assert rc == 2 and err.startswith(f"error: {src} line 3: its 'text' value holds '\\ud800', a lone UTF-16 "
                                          "surrogate") and err.endswith("fix or remove that line")
    assert not [n for n in os.listdir(tmp_path) if n.startswith("o_") or ".tmp-" in n]


def test_pretraining_on_a_jsonl_with_a_surrogate(tmp_path, bundled_tokenizer):
    src = tmp_path / "sur.jsonl"
    src.write_text(SURROGATE)
    with pytest.raises(ConfigError, match=f"{src} line 3: its 'text' value holds '\\\\ud800'"):
        build_pretraining_datasets(str(src), bundled_tokenizer, 4, 1, cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []


def test_broken_gzip_is_one_line(tmp_path, capsys, bundled_tokenizer):
    data = gzip.compress("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(3000)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "fake.jsonl.gz").write_text('{"text": "plain"}\n')
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.jsonl.gz").write_bytes(bytes(flipped))
    for workers in ("1", "2"):
        out = ["--output-prefix", str(tmp_path / "o"), "--workers", workers]
        rc, err = _run(capsys, "--input", str(tmp_path / "cut.jsonl.gz"), *out)
        assert rc == 2 and err.startswith(f"error: {tmp_path / 'cut.jsonl.gz'} is cut short after line ")
        assert err.endswith("re-download or re-compress it")
        rc, err = _run(capsys, "--input", str(tmp_path / "fake.jsonl.gz"), *out)
        assert rc == 2 and err.startswith(f"error: {tmp_path / 'fake.jsonl.gz'} is named .gz but is not gzip data")
        rc, err = _run(capsys, "--input", str(tmp_path / "bad.jsonl.gz"), *out)
        assert rc == 2 and f"{tmp_path / 'bad.jsonl.gz'} is corrupt after line " in err
    assert not [n for n in os.listdir(tmp_path) if n.startswith("o_") or ".tmp-" in n]
    with pytest.raises(ConfigError, match="cut.jsonl.gz is cut short after line"):
        build_pretraining_datasets(str(tmp_path / "cut.jsonl.gz"), bundled_tokenizer, 4, 1,
                                   cache_dir=str(tmp_path / "c"))


class _Fussy:
    """A tokenizer whose library raises on one text: the error names that text's line, not a traceback."""
    name, vocab_size, eod, fingerprint = "fussy", 100, 0, "fussy"

    def encode(self, text):
        if "boom" in text:
            raise RuntimeError("cannot handle this\nsecond line")
        return [1]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]


def test_any_tokenizer_failure_names_the_line(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a"}\n\n{"text": "b boom"}\n')
    with pytest.raises(ConfigError) as e:
        preprocess_jsonl(str(src), str(tmp_path / "o"), _Fussy(), progress=False)
    assert str(e.value) == (f"{src} line 3: tokenizer 'fussy' cannot encode its 'text' value (RuntimeError: cannot "
                            "handle this); fix or remove that line")


def test_repeated_json_key_or_a_folder_prefix_is_one_line(tmp_path, capsys):
    """--json-keys text text wrote every document twice into one file; --output-prefix DIR/ wrote DIR/_text_document
    (a hidden-looking name nobody asked for). Both are refused before any work."""
    src = tmp_path / "two.jsonl"
    src.write_text('{"text": "a b", "title": "t"}\n{"text": "c d", "title": "u"}\n')
    rc, err = _run(capsys, "--input", str(src), "--output-prefix", str(tmp_path / "o"), "--json-keys", "text",
                   "title", "text")
    assert rc == 2 and err == "error: --json-keys names 'text' more than once; name each key once"
    rc, err = _run(capsys, "--input", str(src), "--output-prefix", str(tmp_path) + os.sep)
    assert rc == 2 and err.startswith(f"error: --output-prefix {tmp_path}{os.sep} names a folder, not a file prefix")
    assert sorted(os.listdir(tmp_path)) == ["two.jsonl"]
