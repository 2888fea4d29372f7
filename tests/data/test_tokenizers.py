"""Tokenizers: exact round trips, special-token ids, pickling, and one-line errors for bad input."""
import base64
import gzip
import json
import pickle

import pytest

from megallama.data import get_bundled_corpus_path, get_bundled_tokenizer_path
from megallama.data.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, build_tokenizer
from megallama.errors import ConfigError

from data_testlib import TEXTS


def _corpus_texts(n=40):
    with gzip.open(get_bundled_corpus_path(), "rt", encoding="utf-8") as f:
        return [json.loads(next(f))["text"] for _ in range(n)]


def test_bundled_round_trip_and_ids(bundled_tokenizer):
    tok = bundled_tokenizer
    assert tok.vocab_size == 8192 and tok.name == "bundled-bpe-8192"
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eod) == (1, 2, 3, 2)
    for text in _corpus_texts() + [t for t in TEXTS if t]:
        ids = tok.encode(text)
        assert ids and tok.bos_id not in ids and tok.eos_id not in ids  # encode adds no bos/eos
        assert max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
    assert tok.encode_batch(TEXTS[:3]) == [tok.encode(t) for t in TEXTS[:3]]
    # a small vocabulary still compresses English text (several characters per token)
    text = "\n\n".join(_corpus_texts())
    assert len(text) / len(tok.encode(text)) > 3.0


def test_sentencepiece_type_and_pickle(tmp_path):
    tok = build_tokenizer("llama2", get_bundled_tokenizer_path())
    ref = build_tokenizer("bundled")
    assert build_tokenizer("Llama2Tokenizer", get_bundled_tokenizer_path()).vocab_size == 8192  # Megatron spelling
    assert tok.encode(TEXTS[4]) == ref.encode(TEXTS[4]) and tok.fingerprint == ref.fingerprint
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TEXTS[2]) == tok.encode(TEXTS[2]) and clone.name == tok.name
    assert pickle.loads(pickle.dumps(ref)).name == "bundled-bpe-8192"


def test_sentencepiece_without_pad_falls_back_to_eos(tmp_path):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 4), model_prefix=str(tmp_path / "m"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2)
    tok = build_tokenizer("sentencepiece", str(tmp_path / "m.model"))  # Llama 2 layout: unk 0, bos 1, eos 2, no pad
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 400)
    assert tok.decode(tok.encode("The lazy fox.")) == "The lazy fox."


def _write_ranks(path, merges):
    ranks = [bytes([i]) for i in range(256)] + [m.encode() for m in merges]
    with open(path, "w") as f:
        for r, tok in enumerate(ranks):
            f.write(f"{base64.b64encode(tok).decode()} {r}\n")
    return len(ranks)


def test_llama3_tiktoken_special_ids_and_round_trip(tmp_path):
    merges = ["th", "he", "the", " t", " the", "in", "ing", "12", "123", "1234", "12345", "'s"]
    n = _write_ranks(tmp_path / "tokenizer.model", merges)
    tok = build_tokenizer("llama3", str(tmp_path / "tokenizer.model"))
    assert tok.vocab_size == n + 256 and len(LLAMA3_SPECIAL_TOKENS) == 256
    assert tok.bos_id == n and tok.eos_id == n + 1 and tok.eot_id == n + 9
    assert tok.special_tokens["<|start_header_id|>"] == n + 6
    assert tok.special_tokens["<|reserved_special_token_4|>"] == n + 8
    assert tok.special_tokens["<|reserved_special_token_250|>"] == n + 255
    # Meta's real file has 128000 base tokens, so these land on 128000..128255
    for text in TEXTS + ["the thing's 12345 in\r\n\tthe  end", "x" * 30_000 + " y"]:
        assert tok.decode(tok.encode(text)) == text
    # the pre-tokenizer splits digits in threes, so the 5-digit merge is never used
    assert tok.encode("12345") == [n - len(merges) + merges.index("123"), ord("4"), ord("5")]
    assert tok.encode(" the") == [n - len(merges) + merges.index(" the")]
    # special-token text inside a document is plain text, never a control token
    ids = tok.encode("<|end_of_text|>")
    assert tok.eos_id not in ids and tok.decode(ids) == "<|end_of_text|>"
    assert tok.decode([tok.bos_id]) == "<|begin_of_text|>"
    assert r"\p{N}{1,3}" in LLAMA3_PATTERN and LLAMA3_PATTERN.startswith(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)")
    assert pickle.loads(pickle.dumps(tok)).encode("the 123") == tok.encode("the 123")


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path / "tokenizer.json", tmp_path):  # the file or its folder
        tok = build_tokenizer("hf", str(path))
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
        for text in TEXTS:
            assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind,model,match", [
    ("bundled", "/nonexistent/tok.model", "not found: /nonexistent/tok.model"),
    ("sentencepiece", "/nonexistent/tok.model", "not found: /nonexistent/tok.model"),
    ("llama3", "/nonexistent/tokenizer.model", "not found: /nonexistent/tokenizer.model"),
    ("hf", "/nonexistent/tokenizer.json", "not found: /nonexistent/tokenizer.json"),
    ("llama3", None, "needs --tokenizer-model"),
    ("gpt2", None, "needs --vocab-file VOCAB.json and --merge-file MERGES.txt"),
    ("bert", None, "unknown --tokenizer-type 'bert'"),
])
def test_bad_tokenizer_input_is_one_clear_error(kind, model, match):
    with pytest.raises(ConfigError, match=match) as e:
        build_tokenizer(kind, model)
    assert "\n" not in str(e.value)


def test_wrong_file_kind(tmp_path):
    (tmp_path / "bad.model").write_text("hello\n")
    with pytest.raises(ConfigError, match="not a sentencepiece model"):
        build_tokenizer("sentencepiece", str(tmp_path / "bad.model"))
    with pytest.raises(ConfigError, match="line 1 is not 'base64-token rank'"):
        build_tokenizer("llama3", str(tmp_path / "bad.model"))


def test_a_converted_folder_with_only_tokenizer_model_names_it(tmp_path):
    """An HF folder exported from a sentencepiece run has tokenizer.model, no tokenizer.json: a checkpoint converted
    from it (or a fine-tune reading it) takes that file as its tokenizer."""
    import shutil

    from megallama.data import get_bundled_tokenizer_path
    from megallama.data.tokenizer import checkpoint_tokenizer
    shutil.copy(get_bundled_tokenizer_path(), tmp_path / "tokenizer.model")
    assert checkpoint_tokenizer({"converted_from": str(tmp_path)}) == ("sentencepiece",
                                                                       str(tmp_path / "tokenizer.model"))
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(ConfigError, match="has no tokenizer.json or tokenizer.model"):
        checkpoint_tokenizer({"converted_from": str(tmp_path)})
