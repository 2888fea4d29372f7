"""Bad input, one table: each case prints one ``error:`` line, exits 2, and leaves every file already on disk
(a previous run's checkpoint, the data) exactly as it was. Cases the lead's tests/test_training.py covers (missing
data, malformed jsonl, unknown model, huge --seq-length, zero micro-batch, tp=3, another model's hidden size) are
not repeated."""
import errno
import os
import shutil

import pytest
import torch

import pretrain_llama
from ckpt_helpers import TINY, corpus, snapshot

BASE = TINY + ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4"]
REAL_DATA = {"empty_data", "no_text_field", "vocab_smaller_than_tokenizer", "missing_tokenizer_model",
             "vocab_of_converted_checkpoint"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A good checkpoint of the tiny model (iteration 2) that every case starts from."""
    root = tmp_path_factory.mktemp("base")
    ck = str(root / "ck")
    assert pretrain_llama.main(BASE + ["--exit-interval", "2", "--save", ck, "--save-interval", "2"]) == 0
    return ck


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _case(name, tmp, ck, monkeypatch):
    """(argv, substring the error line must contain) for one case; may prepare files or patch."""
    data = tmp / "data"
    data.mkdir()
    if name == "empty_data":
        (data / "empty.jsonl").write_text("")
        return ["--data-path", str(data / "empty.jsonl"), "--data-cache-dir", str(tmp / "cache")], "empty"
    if name == "no_text_field":
        (data / "notext.jsonl").write_text('{"content": "hello"}\n{"content": "world"}\n')
        return ["--data-path", str(data / "notext.jsonl"), "--data-cache-dir", str(tmp / "cache")], "text"
    if name == "vocab_smaller_than_tokenizer":
        return ["--vocab-size", "100", "--data-path", corpus(data / "c.jsonl"), "--data-cache-dir",
                str(tmp / "cache")], "--vocab-size is 100"
    if name == "missing_tokenizer_model":
        return ["--tokenizer-type", "sentencepiece", "--tokenizer-model", str(tmp / "nope.model")], "nope.model"
    if name == "batch_not_dividing":
        return ["--micro-batch-size", "4", "--global-batch-size", "6"], "6"
    if name == "negative_global_batch":
        return ["--global-batch-size", "-4"], "-4"
    if name == "world_size_mismatch":
        monkeypatch.setenv("WORLD_SIZE", "2")
        return ["--gpus", "4"], "world size"
    if name == "seq_longer_than_context":
        return ["--max-position-embeddings", "16"], "context"
    if name == "checkpoint_of_untied_model":
        return ["--load", ck, "--untie-embeddings-and-output-weights"], \
            "tie_word_embeddings=True, this run has False) (its output layer is the input embedding: drop " \
            "--untie-embeddings-and-output-weights)"
    if name == "vocab_of_converted_checkpoint":  # --use-checkpoint-args: the tokenizer has more tokens
        from megallama.checkpointing import open_checkpoint
        from megallama.checkpointing.full import write_full_checkpoint
        _, common, reader = open_checkpoint(ck)
        tensors = [(n, reader.read(n)[:256] if n == "model.embed_tokens.weight" else reader.read(n))
                   for n in common["index"] if "/" not in n]
        small = dict(common["args"], model_config=dict(common["args"]["model_config"], vocab_size=256))
        write_full_checkpoint(str(tmp / "conv"), tensors, small)
        return ["--load", str(tmp / "conv"), "--use-checkpoint-args", "--data-path", corpus(data / "c.jsonl"),
                "--data-cache-dir", str(tmp / "cache")], "8192 tokens but --vocab-size is 256"
    if name == "truncated_checkpoint_named":
        _truncate(os.path.join(ck, "iter_0000002", "rank_00000.pt"))
        return ["--load", os.path.join(ck, "iter_0000002")], "truncated"
    if name == "only_checkpoint_corrupt":
        _truncate(os.path.join(ck, "iter_0000002", "common.pt"))
        return ["--load", ck], "no usable checkpoint"
    if name == "missing_manifest":
        os.remove(os.path.join(ck, "iter_0000002", "manifest.json"))
        return ["--load", os.path.join(ck, "iter_0000002")], "manifest"
    if name == "load_dir_missing":
        return ["--load", str(tmp / "no_such_run")], "does not exist"
    if name == "unwritable_save":
        (tmp / "afile").write_text("x")
        return ["--save", str(tmp / "afile" / "ck"), "--save-interval", "1"], "not writable"
    if name == "disk_full_during_save":
        def full(*a, **k):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(torch, "save", full)
        return ["--load", ck, "--save", ck, "--save-interval", "1"], "No space left on device"
    if name == "keep_last_zero":
        return ["--save", ck, "--save-interval", "1", "--keep-last", "0"], "--keep-last"
    if name == "save_interval_zero":
        return ["--save", ck, "--save-interval", "0"], "--save-interval"
    if name == "negative_train_iters":
        return ["--train-iters", "-3"], "--train-iters"
    if name == "use_checkpoint_args_without_load":
        return ["--use-checkpoint-args"], "--load"
    if name == "save_into_existing_run":  # would overwrite its iter_* and reset its tracker
        return ["--save", ck, "--save-interval", "1"], f"{ck} already holds a run at iteration 2; pass --load {ck}"
    if name == "finetune_into_existing_run":  # --finetune restarts at iteration 0: the same overwrite
        return ["--load", ck, "--finetune", "--save", ck], "drop --finetune"
    if name == "resume_with_another_lr_schedule":  # decay follows --train-iters: 4 when saved
        return ["--load", ck, "--save", ck, "--train-iters", "8"], \
            "--lr-decay-iters (default --train-iters, or --train-samples in global batches) 4 in the checkpoint, " \
            "8 now); pass --override-opt-param-scheduler"
    if name == "both_lr_schedule_flags":
        return ["--load", ck, "--override-opt-param-scheduler", "--use-checkpoint-opt_param-scheduler"], "at most one"
    if name == "gpus_without_launcher":  # one process, --gpus 2: would train on one silently
        return ["--gpus", "2"], "torchrun --nproc_per_node 2"
    if name == "lora_onto_dense_checkpoint":  # adapters are added to dense weights by --pretrained-checkpoint
        return ["--load", ck, "--strategy", "lora"], "pass it as --pretrained-checkpoint"
    if name == "warmup_longer_than_decay":  # Megatron asserts warmup < decay
        return ["--lr-warmup-iters", "5", "--lr-decay-iters", "2"], "the LR warmup (5 iterations) is longer"
    if name == "resume_without_optimizer_state":  # a --no-save-optim checkpoint: a fresh Adam must be asked for
        slim = str(tmp / "slim")
        assert pretrain_llama.main(BASE + ["--exit-interval", "2", "--save", slim, "--save-interval", "2",
                                           "--no-save-optim"]) == 0
        return ["--load", slim], "holds no optimizer state (saved with --no-save-optim?); pass --no-load-optim"
    raise KeyError(name)


CASES = ["empty_data", "no_text_field", "vocab_smaller_than_tokenizer", "missing_tokenizer_model",
         "batch_not_dividing", "negative_global_batch", "world_size_mismatch", "seq_longer_than_context",
         "checkpoint_of_untied_model", "vocab_of_converted_checkpoint", "truncated_checkpoint_named",
         "only_checkpoint_corrupt", "missing_manifest", "load_dir_missing", "unwritable_save",
         "disk_full_during_save", "keep_last_zero", "save_interval_zero", "negative_train_iters",
         "use_checkpoint_args_without_load", "save_into_existing_run", "finetune_into_existing_run",
         "resume_with_another_lr_schedule", "both_lr_schedule_flags", "gpus_without_launcher",
         "lora_onto_dense_checkpoint", "warmup_longer_than_decay",
         "resume_without_optimizer_state"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name, saved, tmp_path, monkeypatch, capsys):
    ck = str(tmp_path / "ck")
    shutil.copytree(saved, ck)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    extra, needle = _case(name, tmp_path, ck, monkeypatch)
    before = snapshot(str(tmp_path))
    capsys.readouterr()
    base = [a for a in BASE if a != "--mock-data"] if name in REAL_DATA else BASE
    if name in REAL_DATA:  # the tokenizer decides the vocabulary
        i = base.index("--vocab-size")
        base = base[:i] + base[i + 2:]
    code = pretrain_llama.main(base + extra)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert needle in lines[0], lines[0]
    after = snapshot(str(tmp_path))
    assert {p: h for p, h in after.items() if p in before} == before, "a file on disk was changed or lost"
    assert not [p for p in after if p not in before and p.startswith(ck)], "files appeared in the checkpoint dir"


def test_eval_interval_without_a_validation_split_trains_and_says_so(tmp_path, monkeypatch, capsys):
    """Megatron trains a --split 100,0,0 line that also carries --eval-interval (its templates do) without
    validation; so does this, with a warning line (it used to be refused)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    base = [a for a in BASE if a != "--mock-data"]
    i = base.index("--vocab-size")
    base = base[:i] + base[i + 2:]
    code = pretrain_llama.main(base + ["--data-path", corpus(tmp_path / "c.jsonl"), "--data-cache-dir",
                                       str(tmp_path / "cache"), "--split", "100,0,0", "--eval-interval", "2"])
    out = capsys.readouterr()
    assert code == 0 and "warning: --eval-interval 2 but there is no validation data; no evaluation" in out.out
    assert "validation loss at" not in out.out
