"""tools/train_tokenizer.py: a bad corpus (lone surrogate, cut-short .gz) is one line naming it and the line; and
sentencepiece's two vocabulary-size errors get the hint that fixes them (raise the size when the corpus has more
characters than pieces, lower it when the corpus is too small), never both at once."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tools.train_tokenizer import main  # noqa: E402


def _corpus(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def test_too_few_pieces_for_the_characters_says_raise(tmp_path, capsys):
    chars = "".join(chr(0x4E00 + i) for i in range(120))  # 120 distinct characters, each needs a piece
    src = _corpus(tmp_path / "c.jsonl", [chars[i:] + chars[:i] for i in range(0, 120, 3)] * 3)
    assert main(["--corpus", src, "--output", str(tmp_path / "t.model"), "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "raise --vocab-size to at least" in err and "lower --vocab-size" not in err
    need = int(err.rsplit(" ", 1)[1])
    assert need > 300 and not os.path.exists(tmp_path / "t.model")
    assert main(["--corpus", src, "--output", str(tmp_path / "t.model"), "--vocab-size", str(need)]) == 0


def test_too_many_pieces_for_a_small_corpus_says_lower(tmp_path, capsys):
    src = _corpus(tmp_path / "c.jsonl", ["a few words", "and a few more"])
    assert main(["--corpus", src, "--output", str(tmp_path / "t.model"), "--vocab-size", "4000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "lower --vocab-size to at most" in err and "raise --vocab-size" not in err


def test_surrogate_and_truncated_corpus_are_one_line(tmp_path, capsys):
    import gzip
    (tmp_path / "sur.jsonl").write_text('{"text": "ok"}\n{"text": "a \\ud800 b"}\n')
    assert main(["--corpus", str(tmp_path / "sur.jsonl"), "--output", str(tmp_path / "t.model")]) == 2
    assert f"{tmp_path / 'sur.jsonl'} line 2: its 'text' holds a lone UTF-16 surrogate" in capsys.readouterr().err
    data = gzip.compress("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(3000)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    assert main(["--corpus", str(tmp_path / "cut.jsonl.gz"), "--output", str(tmp_path / "t.model")]) == 2
    assert "cut.jsonl.gz is cut short after line" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "t.model")
