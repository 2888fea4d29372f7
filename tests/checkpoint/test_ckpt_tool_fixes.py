"""Tools around checkpoints say what they did: an export past a corrupt newest checkpoint warns and names the
iteration it wrote; an HF folder holding a sentencepiece tokenizer.model (what an export writes) imports with it;
--save-adapter writes atomically, refuses another run's adapter, and names the base checkpoint."""
import json
import os
import sys

import pytest
import torch

import pretrain_llama
from ckpt_helpers import TINY, snapshot

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_checkpoint as conv  # noqa: E402

# the bundled tokenizer's 8192 tokens fit the embedding, so an export writes it (a larger tokenizer is not written)
BASE = TINY + ["--micro-batch-size", "2", "--global-batch-size", "4", "--vocab-size", "8192"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A dense run with checkpoints at iterations 1 and 2."""
    ck = str(tmp_path_factory.mktemp("run") / "ck")
    assert pretrain_llama.main(BASE + ["--train-iters", "2", "--save", ck, "--save-interval", "1"]) == 0
    return ck


# ------------------------------------------------------------------ (5) an export never falls back unsaid
def test_export_past_a_corrupt_newest_checkpoint_warns_and_names_the_iteration(run, tmp_path, capsys):
    import shutil
    ck = str(tmp_path / "ck")
    shutil.copytree(run, ck)
    path = os.path.join(ck, "iter_0000002", "rank_00000.pt")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size: only the CRC tells
    open(path, "wb").write(bytes(data))
    capsys.readouterr()
    assert conv.main(["megallama-to-hf", "--load", ck, "--output", str(tmp_path / "hf")]) == 0
    out, err = capsys.readouterr()
    assert f"warning: skipping checkpoint {ck}/iter_0000002: rank_00000.pt fails its CRC-32 check" in err, err
    assert f"exported iteration 1 ({ck}/iter_0000001)" in out, out


# ------------------------------------------------------------------ (8) an export's tokenizer.model re-imports
def test_exported_sentencepiece_tokenizer_reimports(run, tmp_path, capsys):
    from megallama.data.tokenizer import checkpoint_tokenizer
    from megallama.data.tokenizer_export import auto_prompt_prefix, run_tokenizer
    hf = str(tmp_path / "hf")
    assert conv.main(["megallama-to-hf", "--load", run, "--output", hf]) == 0
    assert os.path.isfile(os.path.join(hf, "tokenizer.model")) and not os.path.isfile(os.path.join(hf,
                                                                                               "tokenizer.json"))
    back = conv.hf_to_megallama(hf, str(tmp_path / "back"))
    saved = torch.load(os.path.join(back, "common.pt"), weights_only=True)["args"]
    # was: "... which has no tokenizer.json; pass the model's tokenizer"
    assert checkpoint_tokenizer(saved) == ("sentencepiece", os.path.join(hf, "tokenizer.model"))
    assert run_tokenizer(saved).vocab_size == run_tokenizer({}).vocab_size  # the bundled tokenizer it was
    assert auto_prompt_prefix(saved) == "eod"  # the exported run's documents follow an eod, as before the export


# ------------------------------------------------------------------ (8) --save-adapter
LORA = ["--strategy", "lora", "--lora-rank", "2", "--train-iters", "1"]


def test_save_adapter_refuses_another_runs_adapter_up_front(run, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    assert pretrain_llama.main(BASE + LORA + ["--pretrained-checkpoint", run, "--save-adapter", str(adapter)]) == 0
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == os.path.abspath(run)  # was: the preset name
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary folder left behind
    before = snapshot(str(tmp_path))
    capsys.readouterr()
    assert pretrain_llama.main(BASE + LORA + ["--pretrained-checkpoint", run, "--save-adapter", str(adapter)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "already holds an adapter" in lines[0] and "Traceback" not in err, err[-2000:]
    assert snapshot(str(tmp_path)) == before


def test_save_adapter_keeps_the_old_adapter_when_a_write_fails(tmp_path, monkeypatch):
    import safetensors.torch

    from megallama.errors import ConfigError
    from megallama.model import build_model
    from megallama.strategies import TrainingStrategy, apply_strategy, save_adapter
    from megallama.config import ModelConfig
    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      vocab_size=128, max_position_embeddings=64)
    m = build_model(cfg, seed=1)
    apply_strategy([m], TrainingStrategy("lora", {"lora_rank": 2}))
    path = str(tmp_path / "adapter")
    save_adapter(path, [m], lora_cfg=TrainingStrategy("lora", {"lora_rank": 2}).lora_config())
    before = snapshot(path)
    with pytest.raises(ConfigError, match="already holds an adapter"):  # not this run's: refused
        save_adapter(path, [m], lora_cfg=TrainingStrategy("lora", {"lora_rank": 2}).lora_config())

    def half(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", half)
    with pytest.raises(ConfigError, match="No space left on device"):
        save_adapter(path, [m], lora_cfg=TrainingStrategy("lora", {"lora_rank": 2}).lora_config(), overwrite=True)
    assert snapshot(path) == before and sorted(os.listdir(tmp_path)) == ["adapter"]
