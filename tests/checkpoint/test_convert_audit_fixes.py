"""convert_checkpoint.py on bad or moved inputs: a cut safetensors file is one error line; a converted checkpoint
carries its tokenizer (so it outlives, and moves without, the HF folder); a failed import leaves nothing that
refuses a re-run; --tokenizer-type bundled needs no file; an export past a missing tracked iteration says so (as
training's --load does)."""
import os
import shutil
import sys

import pytest
import torch

import pretrain_llama
from ckpt_helpers import TINY

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_checkpoint as conv  # noqa: E402

from megallama.config import ModelConfig  # noqa: E402

# the bundled tokenizer's 8192 tokens fit the embedding, so exports write it
CFG = ModelConfig(name="tiny", num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                  num_query_groups=2, vocab_size=8192, max_position_embeddings=64, tie_word_embeddings=True)


def _tensors(cfg=CFG):
    from megallama.checkpointing.hf_config import hf_shapes
    g = torch.Generator().manual_seed(0)
    shapes = {k: v for k, v in hf_shapes(cfg).items() if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    return {k: torch.randn(*s, generator=g) * 0.02 for k, s in sorted(shapes.items())}


def hf_folder(path, sharded=False):
    """A tiny HF Llama folder: config.json, safetensors (two shards and an index if ``sharded``), and the bundled
    sentencepiece model as its tokenizer.model with a tokenizer_config.json (what an export writes)."""
    import json
    from safetensors.torch import save_file
    from megallama.checkpointing.hf_config import model_config_to_hf_config
    from megallama.data import get_bundled_tokenizer_path
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model_config_to_hf_config(CFG, torch.float32, {"bos_token_id": 1, "eos_token_id": 2}), f)
    t = _tensors()
    if sharded:
        names = sorted(t)
        parts = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
        for fname, ns in parts.items():
            save_file({n: t[n] for n in ns}, os.path.join(path, fname), metadata={"format": "pt"})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": {n: fn for fn, ns in parts.items() for n in ns}}, f)
    else:
        save_file(t, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(get_bundled_tokenizer_path(), os.path.join(path, "tokenizer.model"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>"}, f)
    return str(path)


# ------------------------------------------------------------------ (1) a cut safetensors file
def test_truncated_safetensors_is_one_error_line(tmp_path, capsys):
    hf = hf_folder(tmp_path / "hf")
    st = os.path.join(hf, "model.safetensors")
    with open(st, "r+b") as f:
        f.truncate(100)  # a download cut inside the header
    out = str(tmp_path / "out")
    # was: SafetensorError: Error while deserializing header: incomplete metadata (a traceback)
    assert conv.main(["hf-to-megallama", "--hf-dir", hf, "--output", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {st} is corrupt or incomplete") and err.endswith("re-download it"), err
    assert "\n" not in err and not os.path.exists(out)


# ------------------------------------------------------------------ (2) the tokenizer travels with the checkpoint
def test_converted_checkpoint_keeps_its_tokenizer_after_the_hf_folder_and_itself_move(tmp_path, capsys):
    import megallama
    from megallama.checkpointing.full import saved_args
    from megallama.data.tokenizer import checkpoint_tokenizer
    hf = hf_folder(tmp_path / "hf")
    assert conv.main(["hf-to-megallama", "--hf-dir", hf, "--output", str(tmp_path / "ck")]) == 0
    shutil.rmtree(hf)  # the download cleaned off scratch
    moved = str(tmp_path / "elsewhere")
    os.rename(tmp_path / "ck", moved)  # and the checkpoint moved
    own = os.path.join(moved, "iter_0000000", "tokenizer")
    # was: ("sentencepiece", .../hf/tokenizer.model), a file that is gone
    assert checkpoint_tokenizer(saved_args(moved)) == ("sentencepiece", os.path.join(own, "tokenizer.model"))
    assert sorted(os.listdir(own)) == ["tokenizer.model", "tokenizer_config.json"]
    loaded = megallama.load_for_generation(moved, device="cpu")  # tools/generate.py --load
    assert loaded.tokenizer.vocab_size == 8192
    capsys.readouterr()
    assert conv.main(["megallama-to-hf", "--load", moved, "--output", str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "not written" not in out and os.path.isfile(tmp_path / "back" / "tokenizer.model"), out


def test_pretrained_checkpoint_conversion_records_the_copied_tokenizer(tmp_path):
    """finetune_llama.py --pretrained-checkpoint HF_DIR converts once, with the same copy."""
    import finetune_llama
    from megallama.checkpointing.full import saved_args
    from megallama.data.tokenizer import checkpoint_tokenizer
    hf = hf_folder(tmp_path / "hf")
    out = finetune_llama.convert_hf_once(hf, str(tmp_path / "save"))
    t, path = checkpoint_tokenizer(saved_args(out))
    assert (t, path) == ("sentencepiece", os.path.join(out, "iter_0000000", "tokenizer", "tokenizer.model"))


def test_old_checkpoint_with_an_absolute_tokenizer_path_still_loads(tmp_path):
    from megallama.checkpointing.full import saved_args, write_full_checkpoint
    from megallama.data.tokenizer import checkpoint_tokenizer
    hf = hf_folder(tmp_path / "hf")
    args = {"model": "tiny", "model_config": CFG.to_dict(), "converted_from": hf, "tokenizer_type": "sentencepiece",
            "tokenizer_model": os.path.join(hf, "tokenizer.model")}  # what the converter recorded before
    write_full_checkpoint(str(tmp_path / "ck"), _tensors().items(), args)
    assert checkpoint_tokenizer(saved_args(str(tmp_path / "ck"))) == ("sentencepiece",
                                                                      os.path.join(hf, "tokenizer.model"))


# ------------------------------------------------------------------ (3) a failed import leaves nothing behind
def test_failed_import_leaves_nothing_that_refuses_a_rerun(tmp_path, capsys):
    hf = hf_folder(tmp_path / "hf", sharded=True)
    shard = os.path.join(hf, "model-00002-of-00002.safetensors")
    os.rename(shard, shard + ".part")
    out, kept = str(tmp_path / "out"), str(tmp_path / "kept")
    os.makedirs(kept)  # an empty --output that existed before the run stays
    for output in (out, kept):
        assert conv.main(["hf-to-megallama", "--hf-dir", hf, "--output", output]) == 2
        assert "is missing; the download is incomplete" in capsys.readouterr().err
    assert not os.path.exists(out) and os.listdir(kept) == []  # was: out/iter_0000000.tmp
    os.rename(shard + ".part", shard)
    assert conv.main(["hf-to-megallama", "--hf-dir", hf, "--output", out]) == 0  # was: "exists and is not empty"


# ------------------------------------------------------------------ (4) --tokenizer-type bundled needs no file
def test_export_with_bundled_tokenizer_needs_no_file(tmp_path, capsys):
    from megallama.checkpointing.full import write_full_checkpoint
    from megallama.data import get_bundled_tokenizer_path
    args = {"model": "tiny", "model_config": CFG.to_dict(), "tokenizer_type": "sentencepiece",
            "tokenizer_model": str(tmp_path / "gone" / "tokenizer.model")}  # a file of another machine
    write_full_checkpoint(str(tmp_path / "ck"), _tensors().items(), args)
    out = str(tmp_path / "hf")
    # was: exit 2, "tokenizer model file not found: .../gone/tokenizer.model"
    assert conv.main(["megallama-to-hf", "--load", str(tmp_path / "ck"), "--output", out, "--tokenizer-type",
                      "bundled"]) == 0, capsys.readouterr().err
    with open(os.path.join(out, "tokenizer.model"), "rb") as a, open(get_bundled_tokenizer_path(), "rb") as b:
        assert a.read() == b.read()


# ------------------------------------------------------------------ (5) a missing tracked iteration is said
def test_export_and_resume_say_when_the_tracked_iteration_is_missing(tmp_path, capsys):
    base = TINY + ["--micro-batch-size", "2", "--global-batch-size", "4"]
    ck = str(tmp_path / "ck")
    assert pretrain_llama.main(base + ["--train-iters", "2", "--save", ck, "--save-interval", "1"]) == 0
    shutil.rmtree(os.path.join(ck, "iter_0000002"))  # the tracker still says 2
    capsys.readouterr()
    said = (f"warning: {ck}/latest_checkpointed_iteration.txt names iteration 2, but iter_0000002 is missing; using "
            f"iteration 1 ({ck}/iter_0000001)")
    assert conv.main(["megallama-to-hf", "--load", ck, "--output", str(tmp_path / "hf")]) == 0
    out, err = capsys.readouterr()
    assert said in err and f"exported iteration 1 ({ck}/iter_0000001)" in out, err  # was: silent
    # training's --load keeps its rule (the newest present) and says the same
    assert pretrain_llama.main(base + ["--train-iters", "2", "--load", ck, "--save", str(tmp_path / "ck2")]) == 0
    assert said in capsys.readouterr().err


# ------------------------------------------------------------------ (7) session-23 audit: shapes, eos lists
def test_weights_that_do_not_match_config_json_are_refused_before_writing(tmp_path, capsys):
    import json
    hf = hf_folder(tmp_path / "hf")
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 96  # the weights hold 128
    with open(os.path.join(hf, "config.json"), "w") as f:
        json.dump(cfg, f)
    out = str(tmp_path / "out")
    # was: exit 0, and a checkpoint that failed only when training or generate.py loaded it
    assert conv.main(["hf-to-megallama", "--hf-dir", hf, "--output", out]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.layers.0.mlp.down_proj.weight has shape [64, 128], but config.json implies [64, 96]" in err, err
    assert "\n" not in err and not os.path.exists(out)


def test_a_list_of_eos_ids_survives_training_and_stops_generation():
    """Llama 3.x Instruct configs list several eos ids: a dict holding a list was dropped from the saved
    arguments (the export then wrote eos 2 alone), and generation stopped at the tokenizer's eos only."""
    import argparse
    from megallama.checkpointing.save_load import args_to_dict
    from megallama.generation_cli import model_eos_ids
    ids = {"bos_token_id": 1, "eos_token_id": [2, 3]}
    saved = args_to_dict(argparse.Namespace(hf_token_ids=ids, bad={"x": object()}, nested={"a": {"b": [1]}}))
    assert saved == {"hf_token_ids": ids}
    assert model_eos_ids(saved) == [2, 3] and model_eos_ids({"hf_token_ids": {"eos_token_id": 2}}) == [2]
    assert model_eos_ids({}) == []
