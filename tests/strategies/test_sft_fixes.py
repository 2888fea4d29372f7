"""SFT data from a user-testing pass: bad chat files and tokenizers without a bos are one ConfigError line (were
UnicodeDecodeError, a pybind cast error, EOFError, a TypeError and an IndexError inside the model); packing is
first-fit as documented; later epochs are shuffled anew, the sample at an index independent of the run's history."""
import gzip
import json

import numpy as np
import pytest

from megallama.data.sft_dataset import (ChatTemplate, SFTDataset, build_sft_datasets, get_bundled_chat_path,
                                        read_chat_jsonl, tokenize_conversations)
from megallama.data.tokenizer import build_tokenizer
from megallama.errors import ConfigError

CHAT = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "2 plus 2 is 4."}]
LINE = json.dumps({"messages": CHAT})


def _one_line(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg


# ------------------------------------------------------------------ (6) bad chat files
def test_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes((LINE + "\n").encode() + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(ConfigError) as e:
        read_chat_jsonl(str(p))
    _one_line(e, f"{p} line 2 is not UTF-8", "0xe9", "re-save the file as UTF-8")


def test_lone_surrogate_escape_names_the_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(LINE + "\n" + '{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}\n')
    with pytest.raises(ConfigError) as e:
        read_chat_jsonl(str(p))
    _one_line(e, f"{p} line 2", "unpaired surrogate")
    p.write_text('{"messages": [{"role": "user", "content": "ok \\ud83d\\ude00"}, ' + LINE[14:] + "\n")
    assert read_chat_jsonl(str(p))[0][0]["content"] == "ok \U0001F600"  # a full pair is a character


def test_truncated_gzip_is_one_line(tmp_path):
    data = gzip.compress(("\n".join([LINE] * 200) + "\n").encode())
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError) as e:
        read_chat_jsonl(str(p))
    _one_line(e, str(p), "truncated or corrupt gzip", "re-create")
    p.write_bytes(b"not gzip at all\n")
    with pytest.raises(ConfigError, match="truncated or corrupt gzip"):
        read_chat_jsonl(str(p))


def test_chat_data_without_assistant_turns_says_so(tmp_path):
    """Only user turns: the error said no answer fits 'within --seq-length 64', and a longer one does not help."""
    p = tmp_path / "users.jsonl"
    p.write_text(json.dumps({"messages": CHAT[:1]}) + "\n")
    with pytest.raises(ConfigError) as e:
        build_sft_datasets(str(p), build_tokenizer("bundled"), 64, split="100,0,0")
    _one_line(e, "no train conversation has an assistant turn", "add assistant messages")
    p.write_text(LINE + "\n")
    with pytest.raises(ConfigError, match="within --seq-length 4"):  # answers there, cut off: as before
        build_sft_datasets(str(p), build_tokenizer("bundled"), 4, split="100,0,0")


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + (LINE + "\n").encode())
    assert read_chat_jsonl(str(p)) == [CHAT]


# ------------------------------------------------------------------ (6) tokenizers without a bos
def _gpt2_style(tmp_path):
    """A byte-level BPE tokenizer.json whose only special token is <|endoftext|> (GPT-2, Qwen): no bos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    texts = [m["content"] for m in CHAT] * 20 + ["<|start_header_id|>user<|end_header_id|>"] * 5
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(tmp_path / "tokenizer.json"))
    return str(tmp_path / "tokenizer.json")


def _sentencepiece(tmp_path, **ids):
    import sentencepiece as spm
    text = tmp_path / "text.txt"
    text.write_text("\n".join([m["content"] for m in CHAT] * 50 + ["user assistant header id"] * 20))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", minloglevel=2, **ids)
    return str(tmp_path / "sp.model")


def test_tokenizer_without_bos_starts_at_the_first_header(tmp_path):
    """GPT-2/Qwen style tokenizer.json (bos None) and a sentencepiece model with bos_id=-1: the conversation starts
    at its first header (Qwen's own chat format has no bos), never with None or -1 as a token."""
    hf = build_tokenizer("hf", _gpt2_style(tmp_path))
    sp = build_tokenizer("sentencepiece", _sentencepiece(tmp_path, bos_id=-1, eos_id=1, unk_id=0))
    for tok in (hf, sp):
        assert tok.bos_id in (None, -1)
        tpl = ChatTemplate(tok)
        tokens, mask = tpl.encode_dialog(CHAT)
        assert tpl.bos is None and tokens[:len(tpl.header("user"))] == tpl.header("user")
        assert min(tokens) >= 0 and tokens[-1] == tok.eos_id and len(mask) == len(tokens)
        assert tok.decode([t for t, m in zip(tokens, mask) if m][:-1]) == "2 plus 2 is 4."
        train, _ = build_sft_datasets(None, tok, 128, split="100,0,0", packing=True)
        assert int(train[0]["input_ids"].min()) >= 0 and train[0]["loss_mask"].sum() > 0


def test_tokenizer_without_eos_is_one_line(tmp_path):
    sp = build_tokenizer("sentencepiece", _sentencepiece(tmp_path, bos_id=1, eos_id=-1, unk_id=0))
    with pytest.raises(ConfigError) as e:
        ChatTemplate(sp)
    _one_line(e, "has no end-of-text token", "tokenizer that has an eos")


def test_finetune_with_a_bos_less_hf_tokenizer_trains(tmp_path, one_thread):
    """finetune_llama.py --tokenizer-type hf --tokenizer-model <GPT-2 style tokenizer.json> crashed with a TypeError."""
    import finetune_llama
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    argv = ["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64", "--micro-batch-size",
            "2", "--global-batch-size", "2", "--train-iters", "2", "--device", "cpu", "--no-progress-bar",
            "--no-fused-kernels", "--split", "100,0,0", "--tokenizer-type", "hf", "--tokenizer-model",
            _gpt2_style(tmp_path)]
    out = pretrain(finetune_llama.prepare_finetune_args(parse_args(argv, world_size=1)))
    assert sorted(out["losses"]) == [1, 2] and all(np.isfinite(v) for v in out["losses"].values())


# ------------------------------------------------------------------ (12) first-fit packing, epochs reshuffled
def _brute_first_fit(lengths, capacity):
    free, bins = [], []
    for pos, ln in enumerate(lengths):
        for b, f in enumerate(free):
            if f >= ln:
                free[b] -= ln
                bins[b].append(pos)
                break
        else:
            free.append(capacity - ln)
            bins.append([pos])
    return bins


def test_first_fit_is_first_fit():
    from megallama.data.sft_dataset import first_fit
    rng = np.random.RandomState(0)
    for cap in (17, 129, 257):
        lengths = rng.randint(1, cap + 1, 2000).tolist()
        assert first_fit(lengths, cap) == _brute_first_fit(lengths, cap)
    assert first_fit([], 8) == []


def test_packing_the_bundled_sample_fills_89_percent():
    """The docstring said first-fit but the code was next-fit: 1038 samples at 78 % fill; first-fit gives 909 at
    89 %, every conversation exactly once, none over seq_length + 1."""
    tok = build_tokenizer("bundled")
    train, _ = build_sft_datasets(get_bundled_chat_path(), tok, 256, split="100,0,0", packing=True)
    lens = [len(t) for t, _ in train.convs]
    fill = sum(lens) / (len(train) * 257)
    assert len(train) == 909 and fill > 0.88, (len(train), fill)
    assert sorted(i for s in train.samples for i in s) == list(range(len(lens)))
    assert max(sum(lens[i] for i in s) for s in train.samples) <= 257


def test_later_epochs_are_reshuffled_and_independent_of_history():
    """--epochs 2 repeated epoch 0's order; now each epoch is its own permutation of the samples (seed, epoch), and
    sample i read first by a fresh dataset (a resume at i) equals sample i read after all before it."""
    tok = build_tokenizer("bundled")
    convs = tokenize_conversations(read_chat_jsonl(get_bundled_chat_path())[:60], ChatTemplate(tok))
    for packing in (False, True):
        ds = SFTDataset(convs, 256, tok.pad_id, packing=packing, seed=7, num_samples=10 ** 6)
        n = ds.samples_per_epoch
        epochs = [[tuple(ds.sample_conversations(e * n + k)) for k in range(n)] for e in range(3)]
        assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])
        assert epochs[0] != epochs[1] != epochs[2] and epochs[0] == [tuple(s) for s in ds.samples]
        for i in (2 * n + 3, n + 1, 5 * n - 1, 0):  # out of order, each on a fresh dataset
            fresh = SFTDataset(convs, 256, tok.pad_id, packing=packing, seed=7)
            a, b = fresh[i], ds[i]
            assert all(bool((a[k] == b[k]).all()) for k in a)
    one = SFTDataset(convs, 256, tok.pad_id)
    assert len(one) == one.samples_per_epoch == len(list(one))  # iterating reads one epoch, not forever
    train, _ = build_sft_datasets(get_bundled_chat_path(), tok, 256, split="100,0,0", num_train_samples=5000)
    assert len(train) == 5000 and train.samples_per_epoch == 2000 and len(list(train)) == 5000


def test_a_multi_epoch_run_reads_each_epoch_in_its_own_order():
    """build_data sizes the chat train set for the whole run, so the sampler reads epoch 2 in its own order instead
    of wrapping to epoch 1's."""
    import torch

    from megallama.arguments import parse_args
    from megallama.training_setup import build_data
    argv = ["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64",
            "--num-attention-heads", "4", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size",
            "8", "--epochs", "2", "--device", "cpu", "--split", "100,0,0"]
    args = parse_args(argv, world_size=1)
    args.chat_template = True
    _, train, _ = build_data(args)
    per_epoch = train.samples_per_epoch
    assert len(train) >= 2 * per_epoch - 8 and args.train_iters * 8 == len(train)
    first = [train[i]["input_ids"] for i in range(4)]
    second = [train[per_epoch + i]["input_ids"] for i in range(4)]
    assert not all(torch.equal(a, b) for a, b in zip(first, second))


def test_truncation_warning_counts_each_conversation_once(capsys):
    """A conversation cut to --seq-length that then has no answer left is dropped, not also counted as kept-truncated
    (the warning used to say "2 truncated, 1 dropped" for one kept and one dropped conversation)."""
    import numpy as np
    answer_late = (np.arange(12), np.array([0] * 10 + [1, 1]))  # answer beyond seq 7 + 1: dropped
    answer_early = (np.arange(12), np.array([0] * 3 + [1] * 9))  # cut but keeps answer tokens
    short = (np.arange(5), np.array([0, 0, 1, 1, 1]))
    ds = SFTDataset([answer_late, answer_early, short], 7, 0)
    assert len(ds.convs) == 2
    msg = capsys.readouterr().err
    assert "1 conversations truncated" in msg and "1 dropped whose answer was truncated away" in msg, msg
