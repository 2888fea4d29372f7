"""Megatron's ``--tokenizer-type GPT2BPETokenizer --vocab-file V --merge-file M``: GPT-2 byte-level BPE from local
files, with the ids of an independently built ``tokenizers`` reference (and of transformers' pure-Python GPT-2
port, Megatron's algorithm), through preprocess_data.py (eod-terminated documents), a pretrain run, generation
from its checkpoint and an HF export; bad input is one line."""
import gzip
import json
import os
import pickle
import sys

import pytest

import pretrain_llama
from megallama.data import get_bundled_corpus_path
from megallama.data.indexed_dataset import IndexedDataset, read_tokenizer_info
from megallama.data.tokenizer import build_tokenizer

from data_testlib import TEXTS, write_jsonl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from tools.preprocess_data import main as preprocess_main  # noqa: E402

EOD = "<|endoftext|>"
TINY = ["--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64", "--num-attention-heads", "2",
        "--num-query-groups", "1", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--no-progress-bar", "--device", "cpu", "--no-fused-kernels"]


def _corpus_texts(n):
    with gzip.open(get_bundled_corpus_path(), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny GPT-2-format vocab.json + merges.txt: byte-level BPE trained on the bundled corpus, <|endoftext|> a
    special token (as GPT-2's, the last id there; the first here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    folder = tmp_path_factory.mktemp("gpt2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(_corpus_texts(200), trainers.BpeTrainer(
        vocab_size=600, special_tokens=[EOD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    vocab, merges = tok.model.save(str(folder), "tiny")
    return {"vocab": vocab, "merges": merges, "model": f"{vocab}{os.pathsep}{merges}", "dir": folder}


def _reference(files):
    """The tokenizers pipeline of GPT-2's tokenizer.json, built here from the files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    ref = Tokenizer(models.BPE.from_file(files["vocab"], files["merges"]))
    ref.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.decoder = decoders.ByteLevel()
    return ref


def _flags(files):
    return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", files["vocab"], "--merge-file", files["merges"]]


def test_ids_round_trip_and_specials(files):
    tok = build_tokenizer("GPT2BPETokenizer", files["model"])
    vocab = json.load(open(files["vocab"], encoding="utf-8"))
    assert (tok.vocab_size, tok.eod, tok.eos_id, tok.pad_id, tok.bos_id) == (len(vocab), vocab[EOD], vocab[EOD],
                                                                              vocab[EOD], None)
    ref = _reference(files)
    texts = _corpus_texts(30) + [t for t in TEXTS if t] + ["  leading spaces", "tabs\tand\r\nCRLF", "x" * 3000]
    for text in texts:
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids and tok.decode(ids) == text
    assert tok.encode_batch(texts[:5]) == [tok.encode(t) for t in texts[:5]]
    # document text spelling the eod stays text, as in Megatron's encoder (a document cannot forge a boundary)
    assert tok.eod not in tok.encode(f"a{EOD}b") and tok.decode(tok.encode(f"a{EOD}b")) == f"a{EOD}b"
    assert tok.decode([tok.eod]) == EOD
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(texts[0]) == tok.encode(texts[0]) and clone.fingerprint == tok.fingerprint
    assert build_tokenizer("gpt2", files["model"]).fingerprint == tok.fingerprint  # the short name


def test_ids_are_those_of_gpt2s_python_encoder(files):
    """transformers' slow GPT2Tokenizer is OpenAI's encoder.py, as Megatron's gpt2_tokenization.py is."""
    transformers = pytest.importorskip("transformers")
    slow = transformers.GPT2Tokenizer(files["vocab"], files["merges"])
    tok = build_tokenizer("GPT2BPETokenizer", files["model"])
    for text in _corpus_texts(10) + [t for t in TEXTS if t]:
        assert tok.encode(text) == slow(text, add_special_tokens=False)["input_ids"]


def _run_preprocess(capsys, *argv):
    rc = preprocess_main(list(argv) + ["--no-progress-bar"])
    return rc, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    """preprocess_data.py then a 3-step pretrain_llama.py run, both with Megatron's GPT-2 flags."""
    tmp = tmp_path_factory.mktemp("run")
    texts = _corpus_texts(40)
    src = write_jsonl(tmp / "in.jsonl", texts)
    rc = preprocess_main(["--input", src, "--output-prefix", str(tmp / "gpt2"), "--append-eod", "--workers", "2",
                          "--no-progress-bar"] + _flags(files))
    assert rc == 0
    ck = str(tmp / "ck")
    rc = pretrain_llama.main(TINY + _flags(files) + ["--data-path", str(tmp / "gpt2_text_document"), "--train-iters",
                                                     "3", "--make-vocab-size-divisible-by", "128", "--save", ck])
    assert rc == 0
    return {"texts": texts, "prefix": str(tmp / "gpt2_text_document"), "ck": ck, "tmp": tmp}


def test_preprocess_documents_end_with_eod(files, trained):
    tok = build_tokenizer("GPT2BPETokenizer", files["model"])
    ds = IndexedDataset(trained["prefix"])
    assert len(ds) == len(trained["texts"])
    for i, text in enumerate(trained["texts"]):
        doc = ds[i].tolist()
        assert doc == tok.encode(text) + [tok.eod]  # Megatron's --append-eod
    info = read_tokenizer_info(trained["prefix"])
    assert info["fingerprint"] == tok.fingerprint and info["tokenizer_model"] == files["model"]


def test_pretrain_saves_and_generate_finds_the_tokenizer(files, trained, capsys):
    from megallama.checkpointing.full import open_checkpoint
    from megallama.generation_cli import main as generate_main  # tools/generate.py's main
    ckpt, common, reader = open_checkpoint(trained["ck"], verify=False)
    reader.close()
    saved, tok = common["args"], build_tokenizer("GPT2BPETokenizer", files["model"])
    assert os.path.basename(ckpt) == "iter_0000003", ckpt
    assert (saved["tokenizer_type"], saved["tokenizer_model"]) == ("GPT2BPETokenizer", files["model"])
    assert saved["tokenizer_fingerprint"] == tok.fingerprint
    assert saved["model_config"]["vocab_size"] == 640  # 600 padded to a multiple of 128, as Megatron pads
    capsys.readouterr()
    rc = generate_main(["--load", trained["ck"], "--device", "cpu", "--prompt", "The module", "--max-new-tokens", "4",
                        "--greedy"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "--- prompt:" in out.out and "The module" in out.out


def test_hf_export_writes_the_tokenizer(files, trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    from megallama.checkpointing.full import open_checkpoint
    from megallama.data.tokenizer_export import export_tokenizer
    saved = open_checkpoint(trained["ck"], verify=False)[1]["args"]
    bos, eos, line = export_tokenizer(saved, str(tmp_path))
    tok = build_tokenizer("GPT2BPETokenizer", files["model"])
    assert (bos, eos) == (tok.eod, tok.eod) and "GPT-2 BPE" in line
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in trained["texts"][:5]:
        assert hf(text)["input_ids"] == [tok.eod] + tok.encode(text)  # tools/generate.py's context: eod first


def _bad_files(tmp_path, files):
    no_eod = tmp_path / "no-eod.json"
    vocab = json.load(open(files["vocab"], encoding="utf-8"))
    vocab.pop(EOD)
    no_eod.write_text(json.dumps(vocab))
    bad_merges = tmp_path / "bad-merges.txt"
    bad_merges.write_text("#version: 0.2\nĠ t\nthree tokens here\n")
    not_json = tmp_path / "not.json"
    not_json.write_text("{'a': 1")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00merges")
    return str(no_eod), str(bad_merges), str(not_json), str(binary)


def _bad_cases(tmp_path, files):
    v, m = files["vocab"], files["merges"]
    no_eod, bad_merges, not_json, binary = _bad_files(tmp_path, files)
    missing = str(tmp_path / "missing.json")
    return [
        (["--tokenizer-type", "GPT2BPETokenizer"], "--tokenizer-type GPT2BPETokenizer needs --vocab-file VOCAB.json "
                                                   "and --merge-file MERGES.txt"),
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", v], "; add --merge-file MERGES.txt"),
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", missing, "--merge-file", m],
         f"--vocab-file {missing}: no such file"),
        (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", v, "--vocab-file", v],
         "--vocab-file is read by --tokenizer-type GPT2BPETokenizer only, not HuggingFaceTokenizer"),
        (["--merge-file", m], "--merge-file is read by --tokenizer-type GPT2BPETokenizer only"),
        (["--tokenizer-type", "GPT2BPETokenizer", "--tokenizer-model", files["model"], "--vocab-file", v],
         "--tokenizer-model and --vocab-file both name the GPT-2 files"),
        (["--tokenizer-type", "GPT2BPETokenizer", "--tokenizer-model", v],
         f"as one --tokenizer-model value write VOCAB.json{os.pathsep}MERGES.txt (got {v})"),
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", no_eod, "--merge-file", m],
         f"--vocab-file {no_eod} has no {EOD} token"),
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", v, "--merge-file", bad_merges],
         f"--merge-file {bad_merges} line 3 is not two tokens"),
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", not_json, "--merge-file", m],
         f"--vocab-file {not_json} is not JSON"),
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", v, "--merge-file", binary],
         f"--merge-file {binary} is not UTF-8 text"),
    ]


def test_bad_input_is_one_line_in_preprocess(files, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [t for t in TEXTS if t])
    for argv, says in _bad_cases(tmp_path, files):
        rc, err = _run_preprocess(capsys, "--input", src, "--output-prefix", str(tmp_path / "o"), *argv)
        assert rc == 2 and err.startswith("error: ") and says in err and "\n" not in err, (argv, err)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("o")]


def test_bad_input_is_one_line_in_pretrain(files, tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [t for t in TEXTS if t])
    capsys.readouterr()
    for argv, says in _bad_cases(tmp_path, files):
        rc = pretrain_llama.main(TINY + argv + ["--data-path", src, "--train-iters", "1"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error: ") and says in err and "\n" not in err, (argv, err)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # not installed
    rc = pretrain_llama.main(TINY + _flags(files) + ["--data-path", src, "--train-iters", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("error: --tokenizer-type GPT2BPETokenizer needs the 'tokenizers' package, which is "
                               "not installed; pip install tokenizers"), err
