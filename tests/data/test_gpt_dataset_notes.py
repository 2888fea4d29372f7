"""What building the pretraining datasets tells the user: a split left without samples is one ``warning:`` line
(not a Python warning echoing a source line), documents without an eod between them are named with the fix, and a
run that reads its training split more than once says how many epochs it takes."""
import warnings

import numpy as np

from megallama.data.gpt_dataset import build_pretraining_datasets, build_test_split
from megallama.data.indexed_dataset import IndexedDatasetBuilder

from data_testlib import TEXTS, write_jsonl


def _corpus(tmp_path, eod, n_docs=50, n_tokens=20, name="c"):
    """``n_docs`` documents of ``n_tokens`` tokens, each ending in ``eod`` (None: no eod, as preprocess_data.py
    without --append-eod writes them)."""
    b = IndexedDatasetBuilder(str(tmp_path / f"{name}.bin"), np.int32)
    for d in range(n_docs):
        body = 3 + (np.arange(n_tokens) + d) % 200
        if eod is not None:
            body[-1] = eod
        b.add_document(body)
    b.finalize(str(tmp_path / f"{name}.idx"))
    return str(tmp_path / name)


def test_a_too_small_validation_or_test_split_is_one_warning_line(tmp_path, bundled_tokenizer, capsys):
    data = _corpus(tmp_path, bundled_tokenizer.eod)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # --epochs builds the datasets twice: the line is still said once
            train, valid = build_pretraining_datasets(data, bundled_tokenizer, 32, 1234, "98,2,0")
        test = build_test_split(data, bundled_tokenizer, 32, 1234, "90,8,2", None, None)
    assert valid is None and test is None and len(train) == 30
    assert [str(w.message) for w in caught] == []  # not warnings.warn (it echoes a source line and file path)
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: no validation set: the valid split of {data} holds 20 tokens, fewer than --seq-length "
                   "+ 1 = 33; use a shorter --seq-length or more data",
                   f"warning: no test set: the test split of {data} holds 20 tokens, fewer than --seq-length + 1 = 33; "
                   "use a shorter --seq-length or more data"]


def test_documents_without_eod_are_one_warning_naming_the_fix(tmp_path, bundled_tokenizer, capsys):
    no_eod = _corpus(tmp_path, None, name="no_eod")
    build_pretraining_datasets(no_eod, bundled_tokenizer, 32, 1234, "100,0,0")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {no_eod}: 50 of 50 documents checked do not end in the "
                                               f"eod token (id {bundled_tokenizer.eod})"), err
    assert err[0].endswith("re-run tools/preprocess_data.py with --append-eod")
    # ends in eod: a .bin/.idx made with --append-eod, and a jsonl (megallama's cache appends the eod itself)
    build_pretraining_datasets(_corpus(tmp_path, bundled_tokenizer.eod, name="eod"), bundled_tokenizer, 32, 1, "1")
    jsonl = write_jsonl(tmp_path / "docs.jsonl", TEXTS * 4)
    build_pretraining_datasets(jsonl, bundled_tokenizer, 32, 1, "1", cache_dir=str(tmp_path / "cache"),
                               progress=False)
    assert "warning" not in capsys.readouterr().err


def test_a_run_reading_its_train_split_more_than_once_says_how_many_epochs(tmp_path, bundled_tokenizer, capsys):
    data = _corpus(tmp_path, bundled_tokenizer.eod)
    train, _ = build_pretraining_datasets(data, bundled_tokenizer, 32, 1234, "100,0,0", num_train_samples=100)
    assert train.samples_per_epoch == 31
    assert capsys.readouterr().out.splitlines() == [
        "train split: 31 samples of seq 32 per epoch; the run's 100 samples take 3.2 epochs"]
    build_pretraining_datasets(data, bundled_tokenizer, 32, 1234, "100,0,0", num_train_samples=31)  # one epoch
    assert capsys.readouterr().out == ""
