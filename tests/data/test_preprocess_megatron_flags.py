"""tools/preprocess_data.py run with Megatron-LM's command line: each of its flags does what Megatron's does or is
refused in one line naming the alternative (nothing written), and the .bin/.idx bytes are those of Megatron's
documented MMapIndexedDataset layout, written here by an independent reference writer."""
import json
import os
import struct
import sys
import types

import numpy as np
import pytest

from megallama.data.indexed_dataset import IndexedDataset
from megallama.data.tokenizer import build_tokenizer

from data_testlib import TEXTS, write_jsonl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tools.preprocess_data import main  # noqa: E402

DOCS = [t for t in TEXTS if t]


def _run(capsys, *argv):
    rc = main(list(argv) + ["--no-progress-bar"])
    return rc, capsys.readouterr().err.strip()


def _reference_files(prefix, docs, vocab_size):
    """Megatron's format from its documentation: .bin = tokens back to back; .idx = b'MMIDIDX\\0\\0', <Q version 1,
    <B dtype code (8 uint16 while the vocabulary is < 65500, else 4 int32), <Q sequences, <Q documents + 1,
    int32 lengths, int64 byte pointers, int64 document index. ``docs``: per document, its sequences."""
    dtype, code = (np.uint16, 8) if vocab_size < 65500 else (np.int32, 4)
    seqs = [s for d in docs for s in d]
    lengths = [len(s) for s in seqs]
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) * np.dtype(dtype).itemsize
    doc_idx = np.cumsum([0] + [len(d) for d in docs]).astype(np.int64)
    with open(prefix + ".bin", "wb") as f:
        for s in seqs:
            f.write(np.asarray(s, dtype=dtype).tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(seqs), len(doc_idx)))
        f.write(np.asarray(lengths, dtype=np.int32).tobytes() + pointers.tobytes() + doc_idx.tobytes())


def _same_bytes(a, b):
    for ext in (".bin", ".idx"):
        with open(a + ext, "rb") as f, open(b + ext, "rb") as g:
            assert f.read() == g.read(), ext


def _sp_model(tmp_path):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 4), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2)
    return str(tmp_path / "sp.model")


@pytest.mark.parametrize("name", ["Llama2Tokenizer", "GPTSentencePieceTokenizer", "SentencePieceTokenizer"])
def test_sentencepiece_types_match_megatron_bytes(tmp_path, capsys, name):
    """Megatron's preprocess_data.py (megatron.core.tokenizers) encodes with all three alike: no bos, and
    --append-eod appends the model's eos."""
    model = _sp_model(tmp_path)
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    rc, _ = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "out"), "--tokenizer-type", name,
                 "--tokenizer-model", model, "--append-eod", "--workers", "1")
    assert rc == 0
    tok = build_tokenizer(name, model)
    assert tok.eod == 2 and tok.vocab_size == 400
    _reference_files(str(tmp_path / "ref"), [[tok.encode(t) + [2]] for t in DOCS], 400)
    _same_bytes(str(tmp_path / "out_text_document"), str(tmp_path / "ref"))


def test_reads_megatron_written_files_with_sentences_and_empty_documents(tmp_path):
    docs = [[[5, 6, 7], [8]], [], [[9, 10]], [[1]]]
    for vocab in (300, 70000):
        _reference_files(str(tmp_path / f"m{vocab}"), docs, vocab)
        ds = IndexedDataset(str(tmp_path / f"m{vocab}"))
        assert ds.dtype == (np.uint16 if vocab == 300 else np.int32)
        assert [ds[i].tolist() for i in range(len(ds))] == [[5, 6, 7], [8], [9, 10], [1]]
        assert ds.document_indices.tolist() == [0, 2, 2, 3, 4] and ds.num_documents == 4


@pytest.mark.parametrize("vocab,code", [(65498, 8), (65499, 4), (70000, 4)])
def test_null_tokenizer_ids_eod_and_dtype(tmp_path, capsys, vocab, code):
    """NullTokenizer: the text is the ids; the eod is --vocab-size, so the vocabulary (and Megatron's dtype choice)
    counts one more id."""
    src = write_jsonl(tmp_path / "in.jsonl", ["1 2 3", "65497 0"])
    rc, _ = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer",
                 "--vocab-size", str(vocab), "--append-eod")
    assert rc == 0
    _reference_files(str(tmp_path / "ref"), [[[1, 2, 3, vocab]], [[65497, 0, vocab]]], vocab + 1)
    _same_bytes(str(tmp_path / "o_text_document"), str(tmp_path / "ref"))
    with open(tmp_path / "o_text_document.idx", "rb") as f:
        assert f.read(18)[17] == code


def test_null_tokenizer_data_trains_with_megatrons_vocab_size(tmp_path, capsys):
    """pretrain --tokenizer-type NullTokenizer --vocab-size V (Megatron's): V is the tokenizer's, the model's
    vocabulary is V + 1 (the eod), and the run trains on the preprocessed ids."""
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    src = write_jsonl(tmp_path / "in.jsonl", [" ".join(str((7 * i + j) % 50) for j in range(40)) for i in range(40)])
    assert _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "NullTokenizer",
                "--vocab-size", "50", "--append-eod")[0] == 0
    args = parse_args(["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size",
                       "64", "--num-attention-heads", "2", "--num-query-groups", "1", "--seq-length", "16",
                       "--micro-batch-size", "2", "--train-iters", "2", "--no-progress-bar", "--device", "cpu",
                       "--data-path", str(tmp_path / "o_text_document"), "--tokenizer-type", "NullTokenizer",
                       "--vocab-size", "50"], world_size=1)
    out = pretrain(args)
    assert args.model_config.vocab_size == 51 and sorted(out["losses"]) == [1, 2]


def test_null_tokenizer_bad_ids_name_the_line(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", ["1 2", "7 500"])
    rc, err = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type",
                   "NullTokenizer", "--vocab-size", "100")
    assert rc == 2 and err.startswith(f"error: {src} line 2: tokenizer 'null-100' cannot encode its 'text' value "
                                      "(ValueError: id 500 is outside [0, 100)")
    rc, err = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type",
                   "NullTokenizer")
    assert rc == 2 and err == ("error: --tokenizer-type NullTokenizer needs its vocabulary size "
                               "(tools/preprocess_data.py --vocab-size N: ids 0..N-1, the eod is N, as in Megatron)")
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def _docs(prefix):
    ds = IndexedDataset(prefix)
    di = ds.document_indices.tolist()
    return [[ds[j].tolist() for j in range(di[i], di[i + 1])] for i in range(len(di) - 1)]


def test_partitions_order_the_documents_as_megatron_merges_them(tmp_path, capsys, bundled_tokenizer):
    """Megatron deals line i to partition i % N and concatenates the partitions; --keep-sequential-samples cuts
    the file into N contiguous runs, which is the input order."""
    texts = [f"document number {i}" for i in range(7)]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    for extra, name in (([], "rr"), (["--keep-sequential-samples"], "seq")):
        rc, _ = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / name), "--partitions", "3",
                     "--workers", "3", *extra)
        assert rc == 0
    order = [0, 3, 6, 1, 4, 2, 5]
    assert _docs(str(tmp_path / "rr_text_document")) == [[bundled_tokenizer.encode(texts[i])] for i in order]
    assert _docs(str(tmp_path / "seq_text_document")) == [[bundled_tokenizer.encode(t)] for t in texts]
    assert sorted(os.listdir(tmp_path)) == sorted(["in.jsonl"] + [f"{n}_text_document{e}" for n in ("rr", "seq")
                                                                  for e in (".bin", ".idx", ".tokenizer-info.json")])
    rc, err = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "x"), "--partitions", "2",
                   "--workers", "3")
    assert rc == 2 and err.startswith("error: --workers 3 is not divisible by --partitions 2")


def test_log_interval_prints_megatron_lines(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    rc, err = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "o"), "--log-interval", "2")
    lines = err.splitlines()
    assert rc == 0 and [ln.split(" (")[0] for ln in lines if ln.startswith("Processed")] == [
        f"Processed {n} documents" for n in range(2, len(DOCS) + 1, 2)]
    assert not any("%" in ln for ln in lines)  # no progress bar


@pytest.mark.parametrize("argv,line", [
    (["--tokenizer-type", "BertWordPieceCase", "--vocab-file", "v.txt"],
     "error: --vocab-file is read by --tokenizer-type GPT2BPETokenizer only, not BertWordPieceCase"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "error: --tokenizer-type GPT2BPETokenizer needs --vocab-file"),
    (["--tokenizer-type", "BertWordPieceLowerCase"], "error: --tokenizer-type BertWordPieceLowerCase is not supp"),
    (["--tokenizer-type", "TikTokenizer", "--tiktoken-pattern", "v2"],
     "error: --tiktoken-pattern selects Megatron's own JSON-vocabulary TikTokenizer"),
    (["--vocab-size", "100"], "error: --vocab-size is read by NullTokenizer only"),
    (["--tokenizer-type", "HuggingFaceTokenizer"], "error: --tokenizer-type HuggingFaceTokenizer needs "
                                                   "--tokenizer-model PATH"),
    (["--split-sentences"], "error: --split-sentences needs NLTK"),
    (["--partitions", "0"], "error: --partitions 0 must be at least 1"),
    (["--input", "shard_*.jsonl", "--partitions", "1"], "error: --input shard_*.jsonl is a pattern"),
])
def test_unsupported_megatron_flags_are_one_line(tmp_path, capsys, monkeypatch, argv, line):
    monkeypatch.setitem(sys.modules, "nltk", None)  # not installed
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    rc, err = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "o"), *argv)
    assert rc == 2 and err.startswith(line) and "\n" not in err, err
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_megatron_tiktoken_json_vocabulary_is_named(tmp_path, capsys):
    vocab = tmp_path / "tok.json"
    vocab.write_text(json.dumps([{"rank": 0, "token_bytes": "AA==", "token_str": "\x00"}]))
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    rc, err = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "TikTokenizer",
                   "--tokenizer-model", str(vocab))
    assert rc == 2 and err.startswith(f"error: {vocab} is a JSON vocabulary (Megatron's own TikTokenizer format)")


def test_keep_newlines_without_split_is_a_note(tmp_path, capsys, bundled_tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    rc, err = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "o"), "--keep-newlines")
    assert rc == 0 and err.splitlines()[0] == ("note: --keep-newlines only applies with --split-sentences (as in "
                                               "Megatron); documents are not split")


def test_a_list_value_is_sentences(tmp_path, capsys, bundled_tokenizer):
    """Megatron's encode: a list of strings is a document's sentences, one sequence each (empty ones dropped), the
    eod at the end of the last."""
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": ["One sentence.", "", "Two sentences."]}) + "\n"
                   + json.dumps({"text": "Whole."}) + "\n")
    rc, _ = _run(capsys, "--input", str(src), "--output-prefix", str(tmp_path / "o"), "--append-eod")
    enc, eod = bundled_tokenizer.encode, bundled_tokenizer.eod
    assert rc == 0 and _docs(str(tmp_path / "o_text_document")) == [
        [enc("One sentence."), enc("Two sentences.") + [eod]], [enc("Whole.") + [eod]]]


def _fake_nltk():
    """Stands in for NLTK + punkt data (neither is installed here): splits after '. '."""
    import re

    class Punkt:
        def __init__(self, lang):
            if lang != "english":
                raise LookupError(f"Resource punkt_tab/{lang} not found.")

        def tokenize(self, text):
            return [s for s in re.split(r"(?<=\.) ", text) if s]

    nltk = types.ModuleType("nltk")
    nltk.tokenize = types.SimpleNamespace(punkt=types.SimpleNamespace(PunktTokenizer=Punkt))
    return nltk


def test_split_sentences_writes_sentence_files(tmp_path, capsys, monkeypatch, bundled_tokenizer):
    monkeypatch.setitem(sys.modules, "nltk", _fake_nltk())
    src = write_jsonl(tmp_path / "in.jsonl", ["First one. Second one.", "Alone."])
    rc, _ = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "o"), "--split-sentences", "--append-eod")
    enc, eod = bundled_tokenizer.encode, bundled_tokenizer.eod
    assert rc == 0 and _docs(str(tmp_path / "o_text_sentence")) == [
        [enc("First one."), enc("Second one.") + [eod]], [enc("Alone.") + [eod]]]
    rc, err = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "p"), "--split-sentences",
                   "--lang", "klingon")
    assert rc == 2 and err.startswith("error: --split-sentences: NLTK's punkt data for --lang klingon is not "
                                      "installed (Resource punkt_tab/klingon not found.)")


def test_non_utf8_line_is_one_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    rc, err = _run(capsys, "--input", str(src), "--output-prefix", str(tmp_path / "o"))
    assert rc == 2 and err.startswith(f"error: {src} line 2: not UTF-8 text (") and \
        err.endswith("re-encode the file as UTF-8 (e.g. iconv -t UTF-8)")


def _llama3_style_json(folder):
    """A tokenizer.json shaped like Llama 3's: byte-level BPE, its special tokens, and a post-processor that puts
    <|begin_of_text|> before every text (what transformers' tokenizer(text) does, and so Megatron's data)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                     special_tokens=[("<|begin_of_text|>", 0)])
    os.makedirs(folder, exist_ok=True)
    t.save(os.path.join(folder, "tokenizer.json"))
    return str(folder)


def test_hf_documents_start_with_the_tokenizers_bos_as_megatrons(tmp_path, capsys):
    """Megatron's HuggingFaceTokenizer tokenizes with tokenizer(text).input_ids: Llama 3's post-processor puts
    <|begin_of_text|> first; --tokenizer-hf-no-include-special-tokens leaves it out. Special-token text inside a
    document stays plain text either way."""
    folder = _llama3_style_json(tmp_path / "tok")
    tok = build_tokenizer("HuggingFaceTokenizer", folder)
    assert (tok.bos_id, tok.eod) == (0, 1)
    texts = ["Plain text here.", "spelled <|end_of_text|> inside"]
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    rc, err = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type",
                   "HuggingFaceTokenizer", "--tokenizer-model", folder, "--append-eod")
    assert rc == 0 and "each document starts with '<|begin_of_text|>'" in err
    assert _docs(str(tmp_path / "o_text_document")) == [[[0] + tok.encode(t) + [1]] for t in texts]
    assert all(i > 2 for t in texts for i in tok.encode(t))
    rc, _ = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "p"), "--tokenizer-type",
                 "HuggingFaceTokenizer", "--tokenizer-model", folder, "--append-eod",
                 "--tokenizer-hf-no-include-special-tokens")
    assert rc == 0 and _docs(str(tmp_path / "p_text_document")) == [[tok.encode(t) + [1]] for t in texts]


def test_hf_vocabulary_covers_its_largest_id(tmp_path, capsys):
    """A tokenizer.json whose ids have gaps: the vocabulary (the embedding, the .bin dtype) must hold the largest
    id (counting tokens gave 4, a uint16 file, and a traceback on id 70000)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    t = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1, "</s>": 2, "b": 70000}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "gap.json"))
    assert build_tokenizer("hf", str(tmp_path / "gap.json")).vocab_size == 70001
    src = write_jsonl(tmp_path / "in.jsonl", ["a b"])
    rc, _ = _run(capsys, "--input", src, "--output-prefix", str(tmp_path / "o"), "--tokenizer-type", "hf",
                 "--tokenizer-model", str(tmp_path / "gap.json"), "--append-eod")
    assert rc == 0 and _docs(str(tmp_path / "o_text_document")) == [[[0, 70000, 2]]]


class _Liar:
    """A tokenizer whose ids run past its vocab_size."""
    name, vocab_size, eod, fingerprint = "liar", 100, 0, "liar"

    def encode_batch(self, texts):
        return [[70000] for _ in texts]


def test_an_id_past_the_dtype_is_one_line(tmp_path):
    from megallama.data.preprocess import preprocess_jsonl
    from megallama.errors import ConfigError
    src = write_jsonl(tmp_path / "in.jsonl", DOCS)
    with pytest.raises(ConfigError) as e:
        preprocess_jsonl(src, str(tmp_path / "o"), _Liar(), progress=False)
    assert str(e.value).startswith(f"{src} line 1: token id 70000 does not fit uint16")
    assert os.listdir(tmp_path) == ["in.jsonl"]
