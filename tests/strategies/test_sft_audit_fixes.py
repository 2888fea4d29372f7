"""Fine-tuning and HF export, from a user audit: --lora-rank 0 is refused as a rank (it read as an alpha error); SFT
data warnings are one ``warning:`` line each, telling conversations without an assistant turn from answers cut by
--seq-length; --sft-packing that packs nothing says so; the export's tokenizer limit is the model's context (was
the run's --seq-length, below config.json's max_position_embeddings); the strategy line names the process rank
apart from the LoRA rank and shows the alpha in use."""
import json
import os
import sys
import warnings

import numpy as np
import pytest

from megallama.data.sft_dataset import SFTDataset, build_sft_datasets
from megallama.data.tokenizer import build_tokenizer
from megallama.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
         "--num-attention-heads", "4", "--num-query-groups", "2", "--micro-batch-size", "2", "--global-batch-size",
         "2", "--no-fused-kernels", "--no-progress-bar", "--device", "cpu", "--seed", "3", "--vocab-size", "8192"]


def _chat(user, answer=None):
    msgs = [{"role": "user", "content": user}]
    return {"messages": msgs + ([{"role": "assistant", "content": answer}] if answer is not None else [])}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ------------------------------------------------------------------ (1) --lora-rank 0
def test_lora_rank_zero_is_refused_as_a_rank():
    """The check of alpha (default 2 x rank = 0) ran first and blamed --lora-alpha."""
    from megallama.arguments import parse_args
    with pytest.raises(ConfigError) as e:
        parse_args(SMALL + ["--strategy", "lora", "--lora-rank", "0"], world_size=1)
    msg = str(e.value)
    assert "--lora-rank 0" in msg and "lora-alpha" not in msg and "\n" not in msg, msg


# ------------------------------------------------------------------ (2) warnings: what was dropped, and how said
def test_user_only_conversation_is_counted_apart_from_truncated_answers(capsys):
    user_only = (np.arange(5), np.zeros(5, dtype=np.int64))  # no assistant turn: a longer sequence won't help
    answer_late = (np.arange(12), np.array([0] * 10 + [1, 1]))  # answer past seq 7 + 1: --seq-length would help
    short = (np.arange(5), np.array([0, 0, 1, 1, 1]))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ds = SFTDataset([user_only, short], 7, 0)
    assert len(ds.convs) == 1 and not rec, [str(w.message) for w in rec]  # no warnings.warn (it echoed source)
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: train: 1 conversations without an assistant turn dropped (only assistant answers are "
                   "trained on)"], err  # no --seq-length advice: a longer sequence keeps nothing more
    SFTDataset([answer_late, short], 7, 0)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "1 dropped whose answer was truncated away" in err[0] and "raise --seq-length" in err[0]
    assert err[0].startswith("warning: train: ") and "assistant turn" not in err[0], err


def _chat_warnings(rank, world, path):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), warnings.catch_warnings():
        warnings.simplefilter("error")  # a warnings.warn fails the test
        build_sft_datasets(path, build_tokenizer("bundled"), 64, split="60,40,0")
    return buf.getvalue()


def test_sft_warnings_print_once_on_rank_0(tmp_path):
    """Every rank reads the data: each warning (here a user-only conversation, and a validation split with no
    answer, whose "no validation set" went through warnings.warn on every rank) is one line from rank 0."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from dist_utils import run_distributed
    path = _jsonl(tmp_path / "c.jsonl", [_chat("What is 2 plus 2?", "4."), _chat("Hi"), _chat("Name a color", "Red."),
                                         _chat("Bye"), _chat("Why?")])
    out = run_distributed(_chat_warnings, 2, path)
    lines = out[0].splitlines()
    assert out[1] == "", out[1]
    assert lines == ["warning: train: 1 conversations without an assistant turn dropped (only assistant answers are "
                     "trained on)",
                     "warning: no validation set: no valid conversation has an assistant turn, and only assistant "
                     "answers are trained on; add assistant messages to the chat data"], lines


# ------------------------------------------------------------------ (3) packing that packs nothing
def test_sft_packing_that_packs_nothing_says_so(tmp_path, capsys):
    long = "count the words in this sentence please " * 3
    path = _jsonl(tmp_path / "c.jsonl", [_chat(long + str(i), f"{i} words.") for i in range(4)])
    tok = build_tokenizer("bundled")
    train = build_sft_datasets(path, tok, 1024, split="100,0,0", packing=True)[0]
    n = max(len(t) for t, _ in train.convs)  # each conversation alone fits seq n; two do not
    capsys.readouterr()
    train = build_sft_datasets(path, tok, n, split="100,0,0", packing=True)[0]
    assert train.samples_per_epoch == len(train.convs) == 4
    notes = [x for x in capsys.readouterr().out.splitlines() if x.startswith("note:")]
    assert len(notes) == 1 and f"--seq-length {n}" in notes[0] and "longer --seq-length" in notes[0], notes
    build_sft_datasets(path, tok, 2 * n, split="100,0,0", packing=True)  # packs: no note
    assert "note:" not in capsys.readouterr().out


# ------------------------------------------------------------------ (4, 5) a LoRA fine-tuning run, its log and export
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Pretrain 1 step, fine-tune 1 LoRA step (rank 4, alpha left to its default) from it: (run dir, stdout)."""
    import contextlib
    import io
    import finetune_llama
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    tmp = tmp_path_factory.mktemp("lora")
    ck, run = str(tmp / "pre"), str(tmp / "sft")
    pretrain(parse_args(SMALL + ["--mock-data", "--seq-length", "32", "--train-iters", "1", "--save", ck,
                                 "--save-interval", "1"], world_size=1))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(finetune_llama.prepare_finetune_args(parse_args(
            SMALL + ["--seq-length", "128", "--train-iters", "1", "--pretrained-checkpoint", ck, "--strategy", "lora",
                     "--lora-rank", "4", "--split", "100,0,0", "--save", run, "--save-interval", "1"],
            world_size=1)))
    return run, out.getvalue()


def test_strategy_line_names_the_process_rank_and_alpha(lora_run):
    """It read "strategy lora: rank 0 trains ..." (the LoRA rank?) and left out the default alpha."""
    line = next(x for x in lora_run[1].splitlines() if x.startswith("strategy lora"))
    assert "this process (global rank 0) trains" in line and ": rank 0" not in line, line
    assert "'lora_rank': 4" in line and "'lora_alpha': 8" in line, line


def test_hf_export_tokenizer_limit_is_the_model_context(lora_run, tmp_path):
    """tokenizer_config.json said model_max_length 128 (the run's --seq-length) beside config.json's 2048 positions,
    so HF warned on longer prompts and users truncated there; HF's Llama checkpoints give the context."""
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import convert_checkpoint as conv
    hf = str(tmp_path / "hf")
    conv.megallama_to_hf(lora_run[0], hf)
    ctx = json.load(open(os.path.join(hf, "config.json")))["max_position_embeddings"]
    assert ctx == 2048
    assert json.load(open(os.path.join(hf, "tokenizer_config.json")))["model_max_length"] == ctx
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert tok.model_max_length == ctx
    assert len(tok("word " * 200).input_ids) > 128  # a prompt past --seq-length is within the limit
