"""A .bin/.idx pair made by tools/preprocess_data.py records its tokenizer (.tokenizer-info.json): training it with
another tokenizer is one error line naming both and the fix, even when every id is below the run's vocabulary size
(which is all the token-id check of a pair without the record, e.g. made by Megatron, can see)."""
import json
import os
import sys

import pytest

from megallama.data.gpt_dataset import build_pretraining_datasets
from megallama.data.tokenizer import build_tokenizer
from megallama.errors import ConfigError

from data_testlib import TEXTS, write_jsonl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tools.preprocess_data import main  # noqa: E402


def get_tokenizer_info_path(prefix):
    return prefix + ".tokenizer-info.json"


def _hf_file(folder, vocab_size):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers
    os.makedirs(folder, exist_ok=True)
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = os.path.join(folder, "tokenizer.json")
    t.save(path)
    return path


def test_pair_made_with_another_tokenizer_is_refused(tmp_path, bundled_tokenizer, capsys):
    hf = _hf_file(str(tmp_path / "a"), 1000)
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS * 4)
    prefix = str(tmp_path / "c_text_document")
    assert main(["--input", src, "--output-prefix", str(tmp_path / "c"), "--append-eod", "--no-progress-bar",
                 "--tokenizer-type", "hf", "--tokenizer-model", hf]) == 0
    hf_tok = build_tokenizer("hf", hf)
    assert (f"tokenized with hf:tokenizer.json ({hf_tok.vocab_size} tokens: --tokenizer-type hf --tokenizer-model "
            f"{hf}), recorded in {prefix}.tokenizer-info.json") in capsys.readouterr().err
    info = json.load(open(get_tokenizer_info_path(prefix)))
    assert info["fingerprint"] == hf_tok.fingerprint and info["tokenizer_model"] == hf
    # every id is below the bundled tokenizer's 8192: only the record can tell
    with pytest.raises(ConfigError) as e:
        build_pretraining_datasets(prefix, bundled_tokenizer, 16, 1)
    assert str(e.value) == (f"{prefix} was tokenized with 'hf:tokenizer.json' but this run uses 'bundled-bpe-8192'; "
                            "re-run tools/preprocess_data.py with this run's tokenizer, or train with the one it "
                            f"was made with (--tokenizer-type hf --tokenizer-model {hf})")
    train, _ = build_pretraining_datasets(prefix, hf_tok, 16, 1)  # the tokenizer it was made with
    assert len(train) > 0
    # same name, other file: the fingerprints tell them apart
    other = build_tokenizer("hf", _hf_file(str(tmp_path / "b"), 300))
    with pytest.raises(ConfigError, match=r"tokenized with 'hf:tokenizer.json \[hf:[0-9a-f]+\]' but this run uses "
                                          r"'hf:tokenizer.json \[hf:[0-9a-f]+\]'"):
        build_pretraining_datasets(prefix, other, 16, 1)
    # a pair without the record (Megatron's) keeps the token-id range check only
    os.remove(get_tokenizer_info_path(prefix))
    assert len(build_pretraining_datasets(prefix, bundled_tokenizer, 16, 1)[0]) > 0


def test_jsonl_cache_shares_the_record(tmp_path, bundled_tokenizer):
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS * 4)
    cache = tmp_path / "cache"
    build_pretraining_datasets(src, bundled_tokenizer, 16, 1, cache_dir=str(cache), progress=False)
    records = [n for n in os.listdir(cache) if n.endswith(".tokenizer-info.json")]
    assert len(records) == 1
    info = json.load(open(cache / records[0]))
    assert info["fingerprint"] == bundled_tokenizer.fingerprint and info["tokenizer_type"] == "bundled"
    prefix = str(cache / records[0][: -len(".tokenizer-info.json")])
    hf_tok = build_tokenizer("hf", _hf_file(str(tmp_path / "a"), 1000))
    with pytest.raises(ConfigError, match="was tokenized with 'bundled-bpe-8192' but this run uses "
                                          "'hf:tokenizer.json'.*\\(--tokenizer-type bundled\\)$"):
        build_pretraining_datasets(prefix, hf_tok, 16, 1)


def test_unreadable_record_is_one_line(tmp_path, bundled_tokenizer):
    src = write_jsonl(tmp_path / "c.jsonl", TEXTS * 4)
    assert main(["--input", src, "--output-prefix", str(tmp_path / "c"), "--no-progress-bar"]) == 0
    prefix = str(tmp_path / "c_text_document")
    with open(get_tokenizer_info_path(prefix), "w") as f:
        f.write("{not json")
    with pytest.raises(ConfigError, match="tokenizer-info.json is not a tokenizer record of tools/preprocess_data.py"
                                          ".*delete it to fall back to the token-id range check") as e:
        build_pretraining_datasets(prefix, bundled_tokenizer, 16, 1)
    assert "\n" not in str(e.value)
