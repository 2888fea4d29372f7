"""finetune_llama.py's start: an HF folder's cached conversion is keyed by the folder's path and content (a
same-named folder or an in-place re-export was trained from the first model's stale weights), and a tokenizer named
by flags must be the one the pretrained checkpoint was trained with."""
import os
from types import SimpleNamespace

import pytest
import torch

from megallama.checkpointing import load_checkpoint
from megallama.checkpointing.full import open_checkpoint
from megallama.config import ModelConfig
from megallama.errors import ConfigError
from megallama.model import build_model

transformers = pytest.importorskip("transformers")

HF_KW = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def _export(folder, seed):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_KW))
    model.save_pretrained(folder, safe_serialization=True)
    return model.model.embed_tokens.weight.detach().clone()


def _embedding(ckpt):
    cfg = ModelConfig.from_dict(open_checkpoint(ckpt, verify=False)[1]["args"]["model_config"])
    model = build_model(cfg, seed=99)
    load_checkpoint(ckpt, [model], None, SimpleNamespace(model_config=cfg), quiet=True)
    return model.model.embed_tokens.weight.detach()


def _pretrained(argv):
    import finetune_llama
    from megallama.arguments import parse_args
    return finetune_llama.prepare_finetune_args(parse_args(argv, world_size=1)).pretrained_checkpoint


def test_same_named_hf_folders_and_in_place_reexport_are_converted_anew(tmp_path, monkeypatch):
    """a/model then b/model from one directory (the repro): each run trains from its own folder's weights; a
    re-export in place converts again; the older conversions are left where they were."""
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    emb_a, emb_b = _export(tmp_path / "a" / "model", 1), _export(tmp_path / "b" / "model", 2)
    flags = ["--use-checkpoint-args", "--mock-data", "--device", "cpu", "--pretrained-checkpoint"]
    ck_a, ck_b = _pretrained(flags + ["../a/model"]), _pretrained(flags + ["../b/model"])
    assert ck_a != ck_b and os.path.dirname(ck_a) == os.path.dirname(ck_b) == str(run / "pretrained_from_hf")
    assert torch.equal(_embedding(ck_a), emb_a) and torch.equal(_embedding(ck_b), emb_b)
    assert _pretrained(flags + [str(tmp_path / "a" / "model")]) == ck_a  # unchanged: converted once, reused
    emb_a2 = _export(tmp_path / "a" / "model", 3)  # re-exported in place
    ck_a2 = _pretrained(flags + ["../a/model"])
    assert ck_a2 not in (ck_a, ck_b) and torch.equal(_embedding(ck_a2), emb_a2)
    assert torch.equal(_embedding(ck_a), emb_a)  # nothing of the older conversion was overwritten


def test_a_cache_dir_holding_another_source_is_refused(tmp_path):
    import json

    import finetune_llama
    _export(tmp_path / "model", 1)
    out = finetune_llama.convert_hf_once(str(tmp_path / "model"), str(tmp_path / "cache"))
    with open(os.path.join(out, "SOURCE.json"), "w") as f:
        json.dump({"source": "/elsewhere/model"}, f)
    with pytest.raises(ConfigError, match="conversion of another HF folder"):
        finetune_llama.convert_hf_once(str(tmp_path / "model"), str(tmp_path / "cache"))


# ------------------------------------------------------------------ (8) the tokenizer named by flags
TINY = ["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32", "--micro-batch-size", "1",
        "--global-batch-size", "1", "--device", "cpu", "--no-progress-bar", "--no-fused-kernels", "--split",
        "100,0,0"]


def _word_level_tokenizer(path):
    """A GPT-2-like tokenizer.json: a few words, <|endoftext|> its only special token (no bos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "[UNK]", "the", "module", "file", "open"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return str(path)


def test_a_tokenizer_other_than_the_checkpoints_is_refused(tmp_path, one_thread):
    """--tokenizer-type hf --tokenizer-model tok.json on a checkpoint trained with the bundled tokenizer trained
    silently (ids meaning other words); now one error naming both, and the checkpoint's own tokenizer named
    explicitly still passes."""
    import json

    from megallama.arguments import parse_args
    from megallama.training import pretrain
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"The module number {i} opens a file."}) + "\n" for i in range(40)))
    ck = str(tmp_path / "base")
    pretrain(parse_args(TINY + ["--data-path", str(data), "--data-cache-dir", str(tmp_path / "cache"),
                                "--train-iters", "1", "--save", ck], world_size=1))
    tok = _word_level_tokenizer(tmp_path / "tok.json")
    sft = TINY + ["--use-checkpoint-args", "--pretrained-checkpoint", ck, "--save", str(tmp_path / "sft")]
    with pytest.raises(ConfigError) as e:
        _pretrained(sft + ["--tokenizer-type", "hf", "--tokenizer-model", tok])
    msg = str(e.value)
    assert "hf:tok.json" in msg and "trained with tokenizer bundled" in msg and "drop --tokenizer-type" in msg, msg
    assert "\n" not in msg
    assert _pretrained(sft + ["--tokenizer-type", "bundled"]) == ck


# ------------------------------------------------------------------ (13) --dry-run plans the fine-tuning run
def test_dry_run_resolves_the_finetuning_flags_and_converts_nothing(tmp_path, monkeypatch, capsys):
    import finetune_llama
    monkeypatch.chdir(tmp_path)
    _export(tmp_path / "model", 1)
    rc = finetune_llama.main(["--pretrained-checkpoint", "model", "--use-checkpoint-args", "--mock-data", "--device",
                              "cpu", "--seq-length", "64", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "resolved configuration:" in out and "1 GPU = tp 1 x pp 1 x dp 1" in out, out[-2000:]
    assert "'num_layers': 1, 'hidden_size': 32" in out and " chat_template                            True" in out
    assert sorted(os.listdir(tmp_path)) == ["model"]  # the HF folder was read, not converted


# ------------------------------------------------------------------ --load X --finetune --save X
def test_finetune_from_the_save_dir_itself_is_told_to_drop_finetune(tmp_path, one_thread):
    """--load X --finetune became --pretrained-checkpoint X before the --save check, which then told the user to
    'pass --load X', the flag already given: now it names --finetune as what keeps the run from resuming."""
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    run = str(tmp_path / "run")
    pretrain(parse_args(TINY + ["--mock-data", "--train-iters", "1", "--save", run], world_size=1))
    with pytest.raises(ConfigError, match=f"drop --finetune and pass --load {run} to resume it"):
        _pretrained(TINY + ["--mock-data", "--load", run, "--finetune", "--save", run])
    assert _pretrained(TINY + ["--mock-data", "--load", run, "--finetune", "--save", str(tmp_path / "new")]) == run


def test_dry_run_refuses_a_pretrained_model_of_another_shape(tmp_path, monkeypatch, capsys):
    """The plan printed a memory table for 2 layers over a 1-layer checkpoint (examples/finetune_lora.sh with
    another BASE): the run then failed on its first load. Now the plan fails the same way."""
    import finetune_llama
    monkeypatch.chdir(tmp_path)
    _export(tmp_path / "model", 1)
    flags = ["--pretrained-checkpoint", "model", "--model", "tiny_llama3_50m", "--hidden-size", "32",
             "--ffn-hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size",
             "256", "--untie-embeddings-and-output-weights", "--mock-data", "--device", "cpu", "--seq-length", "64",
             "--dry-run"]
    assert finetune_llama.main(flags + ["--num-layers", "1"]) == 0
    capsys.readouterr()
    assert finetune_llama.main(flags + ["--num-layers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint model is for a different model") and "num_layers=1, this run has 2" \
        in err and err.count("\n") == 1, err


def test_save_adapter_without_adapters_is_refused_before_training(tmp_path):
    """--save-adapter without --strategy lora trained the whole run and failed when writing the adapter at the end."""
    with pytest.raises(ConfigError, match="--save-adapter .* needs --strategy lora or hybrid"):
        _pretrained(TINY + ["--mock-data", "--save-adapter", str(tmp_path / "adapter")])
    assert _pretrained(TINY + ["--mock-data", "--strategy", "lora", "--save-adapter", str(tmp_path / "a")]) is None


def test_a_file_or_an_adapter_folder_as_pretrained_checkpoint_names_the_flag(tmp_path):
    """A rank file was refused as '--load X is a file' (a flag not given) and an adapter folder as 'holds no
    checkpoint'; each now names --pretrained-checkpoint and what to pass."""
    (tmp_path / "rank_00000.pt").write_bytes(b"")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"--pretrained-checkpoint .*rank_00000.pt is a file"):
        _pretrained(TINY + ["--mock-data", "--pretrained-checkpoint", str(tmp_path / "rank_00000.pt")])
    with pytest.raises(ConfigError, match="holds LoRA adapters only .* pass the base model"):
        _pretrained(TINY + ["--mock-data", "--pretrained-checkpoint", str(tmp_path / "adapter")])
