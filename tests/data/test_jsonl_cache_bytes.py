"""``--data-path x.jsonl`` (tokenized once into the data cache) and ``tools/preprocess_data.py --append-eod`` write
the same .bin/.idx bytes for the same tokenizer and file: an HF tokenizer.json's bos (Megatron's
HuggingFaceTokenizer data) starts every document by both routes; the cache route left it out. A cache made that
way is rebuilt, not reused."""
import os
import sys

import pytest

from megallama.data.gpt_dataset import tokenize_jsonl_cached
from megallama.data.indexed_dataset import IndexedDataset, read_tokenizer_info
from megallama.data.preprocess import preprocess_jsonl
from megallama.data.tokenizer import build_tokenizer

from data_testlib import TEXTS, write_jsonl
from test_preprocess_megatron_flags import _llama3_style_json, _same_bytes

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tools.preprocess_data import main  # noqa: E402


def _tool(tmp_path, capsys, src, flags) -> str:
    assert main(["--input", src, "--output-prefix", str(tmp_path / "tool"), "--append-eod", "--no-progress-bar",
                 *flags]) == 0, capsys.readouterr().err
    return str(tmp_path / "tool_text_document")


def _tokenizer(tmp_path, kind):
    if kind == "bundled":
        return build_tokenizer("bundled"), []
    folder = _llama3_style_json(tmp_path / "tok")
    return build_tokenizer("hf", folder), ["--tokenizer-type", "hf", "--tokenizer-model", folder]


@pytest.mark.parametrize("kind", ["hf", "bundled"])
def test_the_cache_holds_preprocess_datas_bytes(tmp_path, capsys, kind):
    tok, flags = _tokenizer(tmp_path, kind)
    src = write_jsonl(tmp_path / "in.jsonl", [t for t in TEXTS if t])
    tool = _tool(tmp_path, capsys, src, flags)
    cached = tokenize_jsonl_cached(src, tok, str(tmp_path / "cache"), progress=False)
    _same_bytes(cached, tool)
    starts = [int(IndexedDataset(cached).get(i)[0]) for i in range(len(IndexedDataset(cached)))]
    if kind == "hf":  # every document starts with <|begin_of_text|> (id 0), as tokenizer(text).input_ids does
        assert starts == [tok.bos_id] * len(starts) and tok.bos_id == 0
    else:  # sentencepiece adds no bos by either route (Megatron's preprocess_data.py neither)
        assert tok.bos_id not in starts


def test_an_hf_cache_without_the_bos_is_rebuilt_not_reused(tmp_path, capsys):
    tok, flags = _tokenizer(tmp_path, "hf")
    src = write_jsonl(tmp_path / "in.jsonl", [t for t in TEXTS if t])
    cached = tokenize_jsonl_cached(src, tok, str(tmp_path / "cache"), progress=False)
    # what megallama wrote there before the fix: the same path, documents without the bos, a record without the
    # add_special_tokens field
    preprocess_jsonl(src, cached[: -len("_text_document")], tok, append_eod=True, progress=False, overwrite=True,
                     caller="pretrain")
    assert "add_special_tokens" not in read_tokenizer_info(cached)
    assert tokenize_jsonl_cached(src, tok, str(tmp_path / "cache"), progress=False) == cached
    _same_bytes(cached, _tool(tmp_path, capsys, src, flags))
    assert read_tokenizer_info(cached)["add_special_tokens"] is True
