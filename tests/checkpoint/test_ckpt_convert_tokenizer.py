"""megallama -> HF exports keep megallama's generation convention and the token ids: HF ``generate`` through the
exported tokenizer gives tools/generate.py's greedy tokens; an HF model's bos/eos ids survive a round trip; the
tokenizer flags of megallama-to-hf write the tokenizer its "not written" note asks for."""
import json
import os
import sys

import pytest
import torch

from ckpt_helpers import corpus

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tools"))
import convert_checkpoint as conv  # noqa: E402

PROMPT = "the quick brown"


def _hf_greedy(hf_dir, prompt, n):
    """HF's tokenizer ids for ``prompt`` and its greedy continuation, cut before the first eos (as ours is)."""
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    return ids[0].tolist(), new[:new.index(eos)] if eos in new else new


def _train(tmp_path, *flags):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    run = str(tmp_path / "run")
    pretrain(parse_args(["--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size", "128",
                         "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "4",
                         "--global-batch-size", "4", "--train-iters", "60", "--lr", "3e-3", "--device", "cpu",
                         "--no-progress-bar", "--no-fused-kernels", "--data-path", corpus(tmp_path / "c.jsonl"),
                         "--data-cache-dir", str(tmp_path / "cache"), "--save", run, "--split", "100,0,0", *flags],
                        world_size=1))
    return run


def _generate_py_greedy(run, prompts, monkeypatch):
    import megallama
    import megallama.generation as generation
    ours = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: ours.extend(real(*a, **k)) or ours)
    loaded = megallama.load_for_generation(run, device="cpu")
    megallama.generate_text(loaded, prompts, megallama.SamplingConfig(max_new_tokens=12, temperature=0),
                            batch_size=1)
    assert len(ours) == len(prompts)
    return ours


def test_hf_generate_on_the_export_equals_generate_py_greedy(tmp_path, monkeypatch):
    """A run trained on eod-separated documents with the bundled tokenizer: its export's tokenizer starts the
    prompt with the eod (as tools/generate.py does), so HF greedy decoding gives megallama's tokens."""
    from megallama.data.tokenizer import build_tokenizer
    run = _train(tmp_path)
    conv.megallama_to_hf(run, str(tmp_path / "hf"))
    config = json.load(open(tmp_path / "hf" / "config.json"))
    tok = build_tokenizer("bundled")
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.eod, tok.eos_id)
    prompts = [PROMPT, ""]  # "": the context is the prefix alone, so a wrong one changes the whole answer
    for prompt, mine in zip(prompts, _generate_py_greedy(run, prompts, monkeypatch)):
        hf_ids, hf_new = _hf_greedy(tmp_path / "hf", prompt, 12)
        assert hf_ids == [tok.eod] + tok.encode(prompt)
        assert len(hf_new) >= 3 and list(mine) == hf_new, prompt


def _bpe_tokenizer(tmp_path, bos_first=True):
    """A 300-token byte-level BPE tokenizer.json (HF's format) trained on the test corpus, in tmp_path/tok; its
    template prepends <s> unless ``bos_first`` is False."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    text = [json.loads(line)["text"] for line in open(corpus(tmp_path / "words.jsonl"))]
    t.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos_first:
        t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    (tmp_path / "tok").mkdir()
    t.save(str(tmp_path / "tok" / "tokenizer.json"))
    json.dump({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"},
              open(tmp_path / "tok" / "tokenizer_config.json", "w"))
    return str(tmp_path / "tok")


def test_resume_without_tokenizer_flags_takes_the_checkpoints(tmp_path, capsys):
    """A resume (or --finetune) that names no tokenizer reads the data with the checkpoint's, not the bundled one,
    whose ids mean other words to the model (before: the 8192-token bundled tokenizer, refused here only because
    the vocabulary sizes differ; silent where they agree)."""
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    run = _train(tmp_path, "--tokenizer-type", "hf", "--tokenizer-model", _bpe_tokenizer(tmp_path), "--train-iters",
                 "2")
    capsys.readouterr()
    out = pretrain(parse_args(["--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size", "128",
                               "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "4",
                               "--global-batch-size", "4", "--train-iters", "3", "--device", "cpu",
                               "--no-progress-bar", "--no-fused-kernels", "--data-path", corpus(tmp_path / "c.jsonl"),
                               "--data-cache-dir", str(tmp_path / "cache"), "--load", run, "--split", "100,0,0",
                               "--use-checkpoint-opt-param-scheduler"], world_size=1))
    assert sorted(out["losses"]) == [3]
    text = capsys.readouterr().out
    assert f"tokenizer: hf {tmp_path / 'tok'} (the --load checkpoint's" in text and "(hf:tok tokenizer)" in text


def test_scratch_hf_tokenizer_run_keeps_its_bos_first(tmp_path, monkeypatch):
    """A run trained from scratch with --tokenizer-type hf whose tokenizer.json prepends <s>: its documents began
    with <s> (preprocess_data and the jsonl cache keep the tokenizer's special tokens), so tools/generate.py prompts
    with <s> and the export keeps the tokenizer as it is; HF greedy decoding gives megallama's tokens. (Before, both
    put the eod first: a context the model never saw after an eod-less document start.)"""
    from megallama.data.tokenizer import build_tokenizer
    run = _train(tmp_path, "--tokenizer-type", "hf", "--tokenizer-model", _bpe_tokenizer(tmp_path))
    conv.megallama_to_hf(run, str(tmp_path / "hf"))
    tok = build_tokenizer("hf", str(tmp_path / "tok"))
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id) == (0, 1)
    assert open(tmp_path / "hf" / "tokenizer.json").read() == open(tmp_path / "tok" / "tokenizer.json").read()
    prompts = [PROMPT, ""]
    for prompt, mine in zip(prompts, _generate_py_greedy(run, prompts, monkeypatch)):
        hf_ids, hf_new = _hf_greedy(tmp_path / "hf", prompt, 12)
        assert hf_ids == [tok.bos_id] + tok.encode(prompt)
        assert len(hf_new) >= 3 and list(mine) == hf_new, prompt


def test_scratch_hf_tokenizer_without_bos_exports_eod_first(tmp_path, monkeypatch):
    """The same with a tokenizer.json that adds no special token: documents follow an eod, so the export's
    tokenizer starts a text with the eod, as tools/generate.py does, and HF greedy decoding gives megallama's
    tokens."""
    from megallama.data.tokenizer import build_tokenizer
    run = _train(tmp_path, "--tokenizer-type", "hf", "--tokenizer-model", _bpe_tokenizer(tmp_path, bos_first=False))
    conv.megallama_to_hf(run, str(tmp_path / "hf"))
    tok = build_tokenizer("hf", str(tmp_path / "tok"))
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.eod, tok.eos_id) == (1, 1)
    prompts = [PROMPT, ""]
    for prompt, mine in zip(prompts, _generate_py_greedy(run, prompts, monkeypatch)):
        hf_ids, hf_new = _hf_greedy(tmp_path / "hf", prompt, 12)
        assert hf_ids == [tok.eod] + tok.encode(prompt)
        assert len(hf_new) >= 3 and list(mine) == hf_new, prompt
    assert build_tokenizer("hf", str(tmp_path / "hf")).encode(PROMPT) == tok.encode(PROMPT)


def test_round_trip_keeps_bos_and_eos_ids(tmp_path):
    """HF -> megallama -> HF: config.json's token ids are the source's, not null, and not the tokenizer's."""
    torch.manual_seed(0)
    kw = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              bos_token_id=5, eos_token_id=7, pad_token_id=9)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).save_pretrained(tmp_path / "hf")
    conv.hf_to_megallama(str(tmp_path / "hf"), str(tmp_path / "meg"))
    conv.megallama_to_hf(str(tmp_path / "meg"), str(tmp_path / "hf2"))
    back = json.load(open(tmp_path / "hf2" / "config.json"))
    assert {k: back[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == \
        {"bos_token_id": 5, "eos_token_id": 7, "pad_token_id": 9}


def test_megallama_to_hf_tokenizer_flags(tmp_path, capsys):
    """A converted model whose folder had no tokenizer: the export's note asks for --tokenizer-type/-model, and
    megallama-to-hf takes them and writes that tokenizer (an imported model's convention: its bos first)."""
    from megallama.data.tokenizer import build_tokenizer
    tok = build_tokenizer("bundled")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        bos_token_id=1, eos_token_id=2)).save_pretrained(tmp_path / "hf")
    conv.hf_to_megallama(str(tmp_path / "hf"), str(tmp_path / "meg"))
    base = ["megallama-to-hf", "--load", str(tmp_path / "meg")]
    assert conv.main(base + ["--output", str(tmp_path / "plain")]) == 0
    assert "pass the model's tokenizer with --tokenizer-type/--tokenizer-model" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "plain" / "tokenizer.model")
    assert conv.main(base + ["--output", str(tmp_path / "out"), "--tokenizer-type", "bundled"]) == 0
    assert "tokenizer: " in capsys.readouterr().out
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf_tok(PROMPT).input_ids == [tok.bos_id] + tok.encode(PROMPT)
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    # a tokenizer the model cannot have: one error line, nothing written
    code = conv.main(base + ["--output", str(tmp_path / "bad"), "--tokenizer-type", "hf", "--tokenizer-model",
                             str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope" in err[0], err
    assert not os.path.exists(tmp_path / "bad") and not os.path.exists(tmp_path / "bad.tmp")
