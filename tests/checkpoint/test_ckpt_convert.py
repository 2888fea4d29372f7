"""HF <-> megallama conversion: bit-exact round trips both ways, HF logits equal ours on the converted model."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megallama.checkpointing import load_checkpoint, save_checkpoint
from megallama.checkpointing.full import open_checkpoint
from megallama.config import ModelConfig, RopeScaling
from megallama.errors import ConfigError
from megallama.model import build_model

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_checkpoint as conv  # noqa: E402

# HF configs as a user would write them (transformers' own kwargs), covering our variants.
HF_CASES = {
    "gqa_untied": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "mha_llama2": dict(vocab_size=320, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                       rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False),
    "llama31_rope": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_theta=500000.0, tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=64)),
    "llama32_tied": dict(vocab_size=512, hidden_size=48, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0, original_max_position_embeddings=32)),
}


def _hf_model(kw, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**kw)
    cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1: perturb them so a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _our_model_from(ckpt_dir):
    _, common, _ = open_checkpoint(ckpt_dir)
    cfg = ModelConfig.from_dict(common["args"]["model_config"])
    model = build_model(cfg, seed=99).eval()
    it, consumed = load_checkpoint(ckpt_dir, [model], None, SimpleNamespace(model_config=cfg))
    assert (it, consumed) == (0, 0)
    return model, cfg


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_to_megallama_to_hf(tmp_path, case):
    hf = _hf_model(HF_CASES[case])
    src = tmp_path / "hf"
    hf.save_pretrained(src, safe_serialization=True)
    conv.hf_to_megallama(str(src), str(tmp_path / "meg"))
    ours, cfg = _our_model_from(str(tmp_path / "meg"))
    assert cfg.tie_word_embeddings == HF_CASES[case]["tie_word_embeddings"]
    assert (cfg.rope_scaling is not None) == ("rope_scaling" in HF_CASES[case])
    seq = 160 if cfg.rope_scaling else 40  # past original_max_position_embeddings: scaling matters
    ids = torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids)
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-5, err
    # ... and back: every tensor bit-identical, config equivalent, HF logits identical.
    conv.megallama_to_hf(str(tmp_path / "meg"), str(tmp_path / "hf2"))
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    if cfg.tie_word_embeddings:
        a.pop("lm_head.weight", None)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", attn_implementation="eager").eval()
    c1, c2 = hf.config, hf2.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(c1, key) == getattr(c2, key), key
    assert c1.rope_parameters == c2.rope_parameters
    with torch.no_grad():
        assert torch.equal(hf2(ids).logits, ref)


def test_megallama_to_hf_to_megallama_bit_exact(tmp_path):
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                      vocab_size=256, max_position_embeddings=4096,
                      rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64))
    model = build_model(cfg, seed=5)
    args = SimpleNamespace(model="custom", model_config=cfg)
    save_checkpoint(str(tmp_path / "run"), 7, [model], None, args, consumed_samples=28)
    conv.megallama_to_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
    conv.hf_to_megallama(str(tmp_path / "hf"), str(tmp_path / "back"))
    _, c1, r1 = open_checkpoint(str(tmp_path / "run"))
    _, c2, r2 = open_checkpoint(str(tmp_path / "back"))
    names = sorted(n for n in c1["index"] if "/" not in n)
    assert names == sorted(c2["index"]) and len(names) == 2 + 9 * 2 + 1
    for n in names:
        x, y = r1.read(n), r2.read(n)
        assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y), n
    assert ModelConfig.from_dict(c2["args"]["model_config"]).to_dict() == dict(cfg.to_dict(), name="hf")
    # HF reads the exported model and computes our logits.
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = hf(ids).logits, model(ids)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def _logits_match(model, hf_dir, vocab):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = torch.randint(0, vocab, (1, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = hf(ids).logits, model(ids)
    return ((out - ref).norm() / ref.norm()).item()


def test_lora_run_exports_merged_and_moe_run_is_refused(tmp_path):
    """A LoRA run's adapters are merged into their weights (HF computes the adapted model's logits); a MoE run
    has no HF Llama form: one clear error, nothing written."""
    from megallama.strategies import TrainingStrategy, apply_strategy
    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                      vocab_size=256, max_position_embeddings=128)
    model = build_model(cfg, seed=5)
    apply_strategy([model], TrainingStrategy("lora", {"lora_rank": 4, "lora_alpha": 16, "target_modules": "all"}))
    with torch.no_grad():  # B starts at zero: give the adapters something to merge
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.05)
    args = SimpleNamespace(model="custom", model_config=cfg, strategy="lora", lora_rank=4, lora_alpha=16.0,
                           lora_target_modules="all")
    save_checkpoint(str(tmp_path / "lora"), 3, [model], None, args, consumed_samples=12)
    notes = []
    conv.megallama_to_hf(str(tmp_path / "lora"), str(tmp_path / "hf"), notes=notes)
    assert any("merged the LoRA adapters of 14 weights (scaling alpha/r = 4)" in n for n in notes), notes
    assert _logits_match(model.eval(), tmp_path / "hf", 256) < 1e-5
    moe = build_model(cfg, seed=5)
    apply_strategy([moe], TrainingStrategy("moe", {"num_experts": 4, "experts_per_token": 2}))
    save_checkpoint(str(tmp_path / "moe"), 3, [moe], None, SimpleNamespace(model="custom", model_config=cfg,
                                                                        strategy="moe", num_experts=4), 12)
    with pytest.raises(ConfigError, match="mixture-of-experts run"):
        conv.megallama_to_hf(str(tmp_path / "moe"), str(tmp_path / "hf_moe"))
    assert not os.path.exists(tmp_path / "hf_moe")


def test_export_writes_the_runs_tokenizer(tmp_path):
    """The bundled sentencepiece tokenizer becomes tokenizer.model for HF's LlamaTokenizer (the same ids on
    ordinary text; the eod first, as megallama's generation does), bos/eos ids land in config.json; an imported HF
    model's tokenizer.json and tokenizer_config.json are copied as they are."""
    from megallama.data.tokenizer import build_tokenizer
    tok = build_tokenizer("bundled")
    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      vocab_size=tok.vocab_size, max_position_embeddings=64)
    save_checkpoint(str(tmp_path / "run"), 1, [build_model(cfg, seed=1)], None,
                    SimpleNamespace(model="custom", model_config=cfg, tokenizer_type="bundled"), consumed_samples=1)
    conv.megallama_to_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "The module os provides a portable way of using operating system dependent functionality."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.eod, tok.eos_id)
    assert hf_tok.bos_token_id == tok.eod and hf_tok.eos_token_id == tok.eos_id
    # an imported HF model (here: that export, with a tokenizer.json saved by HF) exports its tokenizer.json
    hf_tok.save_pretrained(tmp_path / "hf")
    conv.hf_to_megallama(str(tmp_path / "hf"), str(tmp_path / "meg"))
    conv.megallama_to_hf(str(tmp_path / "meg"), str(tmp_path / "hf2"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert open(tmp_path / "hf2" / name).read() == open(tmp_path / "hf" / name).read(), name


def test_sharded_bf16_hf_checkpoint(tmp_path):
    """A multi-file HF checkpoint (index json) in bf16 converts, keeps bf16, and re-exports bit-exact."""
    hf = _hf_model(HF_CASES["gqa_untied"]).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="40KB")
    files = [f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]
    assert len(files) > 1
    conv.hf_to_megallama(str(tmp_path / "hf"), str(tmp_path / "meg"), max_file_bytes=30_000)
    _, common, reader = open_checkpoint(str(tmp_path / "meg"))
    assert len({p["file"] for e in common["index"].values() for p in e["pieces"]}) > 1
    assert all(e["dtype"] == "bfloat16" for e in common["index"].values())
    conv.megallama_to_hf(str(tmp_path / "meg"), str(tmp_path / "hf2"), max_shard_bytes=50_000)
    idx = json.load(open(tmp_path / "hf2" / "model.safetensors.index.json"))
    orig = {}
    for f in files:
        orig.update(load_file(tmp_path / "hf" / f))
    back = {}
    for f in set(idx["weight_map"].values()):
        back.update(load_file(tmp_path / "hf2" / f))
    assert sorted(orig) == sorted(back)
    for k in orig:
        assert back[k].dtype == torch.bfloat16 and torch.equal(orig[k], back[k]), k


def test_cli_round_trip_and_errors(tmp_path, capsys):
    hf = _hf_model(HF_CASES["gqa_untied"])
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    # As a script once (the sys.path bootstrap), then in-process for speed.
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), "hf-to-megallama",
                        "--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "meg")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--num-layers 2 --hidden-size 64" in r.stdout
    assert conv.main(["megallama-to-hf", "--load", str(tmp_path / "meg"), "--output", str(tmp_path / "hf2"),
                      "--dtype", "bf16"]) == 0
    assert load_file(tmp_path / "hf2" / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
    # Bad inputs: one line, exit 2, nothing written.
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(dict(cfg, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                            "rope_theta": 1e4})))
    (bad / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    cases = [(["hf-to-megallama", "--hf-dir", str(tmp_path / "nope"), "--output", str(tmp_path / "o1")], "config.json"),
             (["hf-to-megallama", "--hf-dir", str(bad), "--output", str(tmp_path / "o2")], "yarn"),
             (["hf-to-megallama", "--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "meg")], "not empty"),
             (["megallama-to-hf", "--load", str(tmp_path / "hf"), "--output", str(tmp_path / "o3")], "is an HF model folder"),
             (["hf-to-megallama", "--hf-dir", str(tmp_path / "meg"), "--output", str(tmp_path / "o4")],
              "is a megallama checkpoint, not an HF model folder; convert it with megallama-to-hf")]
    capsys.readouterr()
    for argv, needle in cases:
        code = conv.main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and needle in lines[0], (argv, lines)
    assert not any(os.path.exists(tmp_path / o) for o in ("o1", "o2", "o3", "o4"))


@pytest.mark.parametrize("mode", ["--load", "--finetune"])
def test_train_from_converted_hf_checkpoint(tmp_path, mode):
    """pretrain --load/--finetune of a converted HF model (tied, Llama 3.2 rope scaling) with
    --use-checkpoint-args: the first step's loss is HF's loss on the same batch, and training proceeds."""
    from megallama.arguments import parse_args
    from megallama.data.mock_dataset import MockGPTDataset
    from megallama.training import pretrain
    hf = _hf_model(HF_CASES["llama32_tied"])
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    conv.hf_to_megallama(str(tmp_path / "hf"), str(tmp_path / "meg"))
    argv = ["--load", str(tmp_path / "meg"), "--use-checkpoint-args", "--mock-data", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-3",
            "--device", "cpu", "--no-progress-bar", "--no-fused-kernels"]
    if mode == "--finetune":  # Megatron's way to start from a model: it keeps the HF lineage as
        argv += ["--finetune", "--save", str(tmp_path / "ft")]  # --pretrained-checkpoint does (bos, token ids)
    args = parse_args(argv, world_size=1)
    assert args.model_config.tie_word_embeddings and args.model_config.rope_scaling.factor == 32.0
    out = pretrain(args)
    ds = MockGPTDataset(512, 32, 8, args.seed)
    batch = [ds[i] for i in range(4)]
    ids = torch.stack([b["input_ids"] for b in batch])
    labels = torch.stack([b["labels"] for b in batch])
    with torch.no_grad():
        logits = hf(ids).logits
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), labels.reshape(-1)).item()
    assert abs(out["losses"][1] - ref) <= 1e-5 * ref, (out["losses"][1], ref)
    assert out["iteration"] == 2 and math.isfinite(out["losses"][2])
    if mode == "--finetune":
        saved = open_checkpoint(str(tmp_path / "ft"), verify=False)[1]["args"]
        converted = open_checkpoint(str(tmp_path / "meg"), verify=False)[1]["args"]
        assert saved["inherited_prompt_prefix"] == "bos" and saved["hf_token_ids"] == converted["hf_token_ids"]


def test_finetune_from_hf_folder_takes_its_shape_and_tokenizer(tmp_path):
    """finetune_llama.py --pretrained-checkpoint HF_FOLDER --use-checkpoint-args, no tokenizer flags: the shape
    (rope scaling included) is the folder's config.json and the tokenizer its tokenizer.json, not the bundled one
    (whose ids would mean other words to the model); a megallama run fine-tunes with the run's tokenizer."""
    import finetune_llama
    from megallama.arguments import parse_args
    from megallama.data.tokenizer import build_tokenizer
    from megallama.training import pretrain
    kw = dict(HF_CASES["llama31_rope"], vocab_size=build_tokenizer("bundled").vocab_size)
    hf = _hf_model(kw)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    bundled = tmp_path / "bundled_hf"
    bundled.mkdir()
    from megallama.data.tokenizer_export import export_tokenizer
    export_tokenizer({"tokenizer_type": "bundled"}, str(bundled))
    transformers.AutoTokenizer.from_pretrained(bundled).save_pretrained(tmp_path / "hf")  # writes tokenizer.json
    common = ["--use-checkpoint-args", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "2",
              "--train-iters", "4", "--device", "cpu", "--no-progress-bar", "--no-fused-kernels", "--split", "100,0,0"]
    sft = str(tmp_path / "sft")  # --load = --save (README): the first launch starts from the HF folder

    def finetune(pretrained, save, *extra):
        return finetune_llama.prepare_finetune_args(parse_args(
            common + ["--pretrained-checkpoint", pretrained, "--save", save, "--load", save, *extra], world_size=1))
    args = finetune(str(tmp_path / "hf"), sft, "--exit-interval", "2")
    own = os.path.join(args.pretrained_checkpoint, "iter_0000000", "tokenizer")  # the conversion's copy of it
    assert (args.tokenizer_type, args.tokenizer_model) == ("hf", own)
    assert args.model_config.rope_scaling.factor == 8.0 and args.model_config.num_layers == 2
    out = pretrain(args)
    assert out["iteration"] == 2 and math.isfinite(out["losses"][2])
    out = pretrain(finetune(str(tmp_path / "hf"), sft))  # the second launch resumes it
    assert sorted(out["losses"]) == [3, 4]
    # the fine-tuned run's checkpoint records that tokenizer, so fine-tuning it in turn picks it up
    again = finetune(sft, str(tmp_path / "sft2"))
    assert (again.tokenizer_type, again.tokenizer_model) == ("hf", own)
    # and the HF model's prompt convention (bos, not a megallama run's eod), resumed launch included
    from megallama.checkpointing.full import open_checkpoint
    from megallama.data.tokenizer_export import auto_prompt_prefix
    assert auto_prompt_prefix(open_checkpoint(sft, verify=False)[1]["args"]) == "bos"


def test_an_existing_output_is_refused_before_any_work(tmp_path):
    """Both directions, from Python too: a non-empty directory or a file as output is refused before the source is
    read (not after a 405B export was written beside it), and an existing run is never written into."""
    hf = _hf_model(HF_CASES["gqa_untied"])
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest_checkpointed_iteration.txt").write_text("100")
    (tmp_path / "file").write_text("x")
    for out, needle in ((run, "not empty"), (tmp_path / "file", "is a file")):
        with pytest.raises(ConfigError, match=needle):
            conv.hf_to_megallama(str(tmp_path / "hf"), str(out))
        with pytest.raises(ConfigError, match=needle):  # the missing --load is not even looked at
            conv.megallama_to_hf(str(tmp_path / "no_such_run"), str(out))
    assert sorted(os.listdir(run)) == ["latest_checkpointed_iteration.txt"]
    assert (run / "latest_checkpointed_iteration.txt").read_text() == "100"


def test_export_does_not_write_a_tokenizer_larger_than_the_model(tmp_path):
    """A --mock-data run records no tokenizer: the bundled one (8192 tokens) is not written beside a 256-token
    embedding (HF would index past it); the weights still export and the line says why."""
    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      vocab_size=256, max_position_embeddings=64)
    save_checkpoint(str(tmp_path / "run"), 1, [build_model(cfg, seed=1)], None,
                    SimpleNamespace(model="custom", model_config=cfg, mock_data=True), consumed_samples=1)
    notes = []
    conv.megallama_to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), notes=notes)
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    assert any(n.startswith("tokenizer: not written") and "8192 tokens but the model only 256" in n for n in notes)


def test_import_hint_names_the_models_tokenizer(tmp_path, capsys):
    """The printed 'train from it with' line carries the folder's tokenizer: pretrain_llama.py without tokenizer
    flags tokenizes with the bundled one, whose ids mean other words to an imported model."""
    hf = _hf_model(HF_CASES["gqa_untied"])
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert conv.main(["hf-to-megallama", "--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "m1")]) == 0
    assert "(the folder has no tokenizer: name the model's)" in capsys.readouterr().out
    import shutil
    from megallama.data.tokenizer import build_tokenizer
    model_file = str(tmp_path / "hf" / "tokenizer.model")
    shutil.copy(build_tokenizer("bundled").path, model_file)  # a sentencepiece model, as Llama 2's releases
    assert conv.main(["hf-to-megallama", "--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "m2")]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    own = os.path.join(tmp_path, "m2", "iter_0000000", "tokenizer", "tokenizer.model")  # copied into the checkpoint
    assert line.endswith(f"--finetune] --tokenizer-type sentencepiece --tokenizer-model {own}"), line
