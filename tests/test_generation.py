"""Generation: the KV-cached decode equals the full forward, greedy decoding equals HF ``generate``, top-k/top-p
equal HF's warpers, tensor parallel 2 equals one process, and ``tools/generate.py`` samples from a checkpoint."""
import os
import subprocess
import sys

import pytest
import torch

from dist_utils import run_distributed
from megallama.config import ModelConfig
from megallama.errors import ConfigError
from megallama.generation import SamplingConfig, filter_logits, generate
from megallama.model import build_model
from megallama.model.kv_cache import KVCache, StaticKVCache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GQA = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=8, num_query_groups=2,
                  vocab_size=300, max_position_embeddings=64, rope_theta=500000.0)


def rel(x, ref):
    return float((x - ref).norm() / ref.norm())


@pytest.mark.parametrize("static", [False, True], ids=["kv_cache", "static_kv_cache"])
def test_kv_cache_decode_matches_full_forward(static):
    """Prefill, single tokens and a multi-token chunk after cached ones (the shifted causal mask); the static cache
    (fixed shapes, device position, for CUDA graphs) attends over its whole buffer under a mask instead."""
    model = build_model(GQA, seed=7).eval()
    ids = torch.randint(0, GQA.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    cache = StaticKVCache(16, "cpu") if static else KVCache(13)
    with torch.no_grad():
        full = model(ids)
        parts = [model.compute_logits(model.model(input_ids=ids[:, a:b], kv_cache=cache))
                 for a, b in [(0, 5), (5, 6), (6, 10), (10, 11), (11, 13)]]
    assert cache.offset == 13
    assert rel(torch.cat(parts, 1), full) < 1e-5


def test_kv_cache_overflow_is_a_clear_error():
    model = build_model(GQA, seed=7).eval()
    with torch.no_grad(), pytest.raises(ConfigError, match="KV cache holds 4 tokens"):
        model.model(input_ids=torch.zeros(1, 5, dtype=torch.long), kv_cache=KVCache(4))


def _greedy_by_full_forward(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_equals_full_recompute_in_a_padded_batch():
    """Prompts of four lengths in one left-padded batch, and in batches of two: each row's tokens are its own
    greedy continuation by full recompute (no cache, no padding)."""
    model = build_model(GQA, seed=7)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (6, 6, 3, 1, 9)]
    out = generate(model, prompts, SamplingConfig(max_new_tokens=8, temperature=0))
    assert out == [_greedy_by_full_forward(model, p, 8) for p in prompts]
    for kw in (dict(decode_mode="static"), dict(batch_size=2), dict(batch_size=1)):
        assert generate(model, prompts, SamplingConfig(max_new_tokens=8, temperature=0), **kw) == out, kw
    assert model.training  # generate restores the mode it found


@pytest.mark.parametrize("mode", ["eager", "static"])
def test_padded_batch_logits_equal_each_prompt_alone(mode):
    """A left-padded row's per-step logits equal the same prompt's unpadded run to 1e-5: its pads are masked out
    and RoPE depends only on query-key distance, so the row's shifted positions change nothing."""
    model = build_model(GQA, seed=7).eval()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (11, 2, 7, 1)]
    cfg = SamplingConfig(max_new_tokens=6, temperature=0)
    out, steps = generate(model, prompts, cfg, return_logits=True, decode_mode=mode)
    batch = torch.stack(steps[0], 1)  # [b, steps, V], rows longest prompt first
    for row, i in enumerate(sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))):
        alone, alone_steps = generate(model, [prompts[i]], cfg, return_logits=True, decode_mode=mode)
        assert out[i] == alone[0]
        assert rel(batch[row], torch.stack(alone_steps[0], 1)[0]) < 1e-5, (mode, i)


def test_stop_ids_and_vocab_padding():
    model = build_model(GQA, seed=7)
    prompt = [1, 2, 3]
    free = generate(model, [prompt], SamplingConfig(max_new_tokens=8, temperature=0))[0]
    stopped = generate(model, [prompt], SamplingConfig(max_new_tokens=8, temperature=0, stop_ids=(free[2],)))[0]
    assert stopped == free[:free.index(free[2])]
    # an embedding padded past the tokenizer: padding ids are never produced
    out = generate(model, [prompt], SamplingConfig(max_new_tokens=20, temperature=5.0, seed=3), vocab_size=7)[0]
    assert max(out) < 7


def test_sampling_is_seeded_and_filters_apply():
    model = build_model(GQA, seed=7)
    cfg = dict(max_new_tokens=10, temperature=1.5, top_k=5, top_p=0.9)
    a = generate(model, [[5, 6, 7]], SamplingConfig(seed=11, **cfg), return_logits=True)
    b = generate(model, [[5, 6, 7]], SamplingConfig(seed=11, **cfg))
    c = generate(model, [[5, 6, 7]], SamplingConfig(seed=12, **cfg))
    assert a[0] == b and a[0] != c
    for step_logits, tok in zip(a[1][0], a[0][0]):  # each sampled token is among that step's 5 most likely
        assert tok in torch.topk(step_logits[0], 5).indices.tolist()


def test_filter_logits_matches_hf_warpers():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for k, p in [(5, 1.0), (0, 0.8), (10, 0.5), (0, 0.05)]:
        ref = logits.clone()
        if k:
            ref = transformers.TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = transformers.TopPLogitsWarper(p)(None, ref)
        assert torch.equal(torch.isinf(filter_logits(logits, k, p)), torch.isinf(ref)), (k, p)


def test_greedy_matches_hf_generate():
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(REPO, "tests", "model"))
    from test_hf_parity import to_hf_config
    model = build_model(GQA, seed=7).eval()
    hf = transformers.LlamaForCausalLM(to_hf_config(GQA)).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    prompt = torch.randint(0, GQA.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[0, 9:].tolist()
    assert generate(model, [prompt[0].tolist()], SamplingConfig(max_new_tokens=12, temperature=0))[0] == ref


def test_left_padded_greedy_matches_hf_generate():
    """A mixed-length batch against HF ``generate`` with left padding and an attention mask (HF shifts each row's
    position ids instead; the tokens are the same)."""
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, os.path.join(REPO, "tests", "model"))
    from test_hf_parity import to_hf_config
    model = build_model(GQA, seed=7).eval()
    hf = transformers.LlamaForCausalLM(to_hf_config(GQA)).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, GQA.vocab_size, (n,), generator=g).tolist() for n in (10, 3, 6)]
    ids = torch.tensor([[0] * (10 - len(p)) + p for p in prompts])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=(torch.arange(10) >= 10 - torch.tensor([[len(p)] for p in prompts]))
                          .long(), max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert generate(model, prompts, SamplingConfig(max_new_tokens=10, temperature=0)) == ref[:, 10:].tolist()


def test_bad_sampling_settings_are_config_errors():
    model = build_model(GQA, seed=7)
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0)):
        with pytest.raises(ConfigError):
            generate(model, [[1, 2]], SamplingConfig(**bad))
    with pytest.raises(ConfigError, match="0 is Megatron's 'off' but HF's 'greedy'"):  # says why, and the fix
        generate(model, [[1, 2]], SamplingConfig(top_p=0.0))
    with pytest.raises(ConfigError, match="exceeds the model's context of 64 tokens; ask for at most 4 new tokens"):
        generate(model, [[1] * 3, [1] * 60], SamplingConfig(max_new_tokens=5))
    with pytest.raises(ConfigError, match="shorten the prompt to fewer than 64 tokens"):  # not 'fewer new tokens'
        generate(model, [[1] * 64], SamplingConfig(max_new_tokens=1))
    with pytest.raises(ConfigError, match="--batch-size 0 must be >= 1"):
        generate(model, [[1, 2]], SamplingConfig(), batch_size=0)


def _tp_generate(rank, world, prompts):
    from megallama.mpu import parallel_state as ps
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    model = build_model(GQA, seed=7)  # layout-independent init: the shards of the single-process model
    out, steps = generate(model, prompts, SamplingConfig(max_new_tokens=6, temperature=0), return_logits=True)
    sampled = generate(model, prompts, SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=5))
    return out, [[s.tolist() for s in group] for group in steps], sampled


def test_tensor_parallel_generation_matches_single_process():
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3], [5, 8]]
    model = build_model(GQA, seed=7)
    single, single_steps = generate(model, prompts, SamplingConfig(max_new_tokens=6, temperature=0),
                                    return_logits=True)
    single_sampled = generate(model, prompts, SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=5))
    res = run_distributed(_tp_generate, 2, prompts)
    for rank in (0, 1):
        out, steps, sampled = res[rank]
        assert out == single and sampled == single_sampled
        for group, ref_group in zip(steps, single_steps):
            for s, ref in zip(group, ref_group):
                assert rel(torch.tensor(s), ref) < 1e-5


def test_generate_tool_samples_from_a_trained_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    train = [sys.executable, os.path.join(REPO, "pretrain_llama.py"), "--model", "tiny_llama3_50m", "--num-layers",
             "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
             "--num-query-groups", "2", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2",
             "--train-iters", "2", "--no-progress-bar", "--device", "cpu", "--save", str(tmp_path / "ck"),
             "--data-cache-dir", str(tmp_path / "cache")]
    r = subprocess.run(train, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from megallama.checkpointing.full import open_checkpoint
    from megallama.data.tokenizer import build_tokenizer
    saved = open_checkpoint(str(tmp_path / "ck"), verify=False)[1]["args"]  # generation checks the tokenizer by it
    assert saved["tokenizer_fingerprint"] == build_tokenizer("bundled").fingerprint
    tool = [sys.executable, os.path.join(REPO, "tools", "generate.py"), "--load", str(tmp_path / "ck"), "--device",
            "cpu"]
    r = subprocess.run(tool + ["--prompt", "The module", "--prompt", "Return", "--max-new-tokens", "5", "--greedy"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("--- prompt:") == 2 and "iteration 2" in r.stdout, r.stdout
    r = subprocess.run(tool + ["--chat", "--prompt", "Hi", "--max-new-tokens", "3"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # a MoE run: the checkpoint's strategy is rebuilt before its weights load
    r = subprocess.run(train[:-4] + ["--strategy", "moe", "--num-experts", "4", "--save", str(tmp_path / "moe")],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "megallama.cli", "generate", "--load", str(tmp_path / "moe"),
                        "--device", "cpu", "--prompt", "The", "--prompt", "Return the value", "--max-new-tokens", "3",
                        "--greedy"], capture_output=True, text=True, env=env, timeout=600)  # the CLI's command
    assert r.returncode == 0 and r.stdout.count("--- prompt:") == 2, r.stderr[-2000:]  # MoE, left-padded batch
    for bad, says in [(["--prompt", "x", "--top-p", "2"], "--top-p"), ([], "no prompt given"),
                      (["--prompt", "x", "--batch-size", "0"], "--batch-size")]:
        r = subprocess.run(tool + bad, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and says in r.stderr, r.stderr
    r = subprocess.run(tool[:3] + [str(tmp_path / "missing"), "--prompt", "x"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr


@pytest.mark.gpu
def test_kv_cache_decode_matches_full_forward_on_cuda_bf16():
    """CUDA SDPA kernels with the cache: prefill (causal), a shifted-mask chunk and single tokens (no mask)."""
    model = build_model(GQA, device="cuda", dtype=torch.bfloat16, seed=7).eval()
    ids = torch.randint(0, GQA.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0)).cuda()
    cache = KVCache(40)
    with torch.no_grad():
        full = model(ids).float()
        parts = [model.compute_logits(model.model(input_ids=ids[:, a:b], kv_cache=cache)).float()
                 for a, b in [(0, 17), (17, 18), (18, 30), (30, 31), (31, 40)]]
    assert rel(torch.cat(parts, 1), full) < 2e-2  # bf16: the kernels differ between the two paths
    # The CUDA graph replays the static cache's kernels: the same logits, bit for bit, and the same tokens (a
    # left-padded batch: the pad mask is captured too)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    prompts = [ids[0, :9].tolist(), ids[1, :4].tolist()]
    static, static_logits = generate(model, prompts, cfg, return_logits=True, decode_mode="static")
    graph, graph_logits = generate(model, prompts, cfg, return_logits=True, decode_mode="graph")
    assert graph == static and len(graph[0]) == 12
    for a, b in zip(graph_logits[0], static_logits[0]):
        assert torch.equal(a, b)


def test_converted_hf_checkpoint_uses_its_folders_tokenizer(tmp_path):
    from megallama.generation_cli import build_arg_parser, run_args
    saved = {"model": "x", "model_config": GQA.to_dict(), "converted_from": str(tmp_path)}
    opts = build_arg_parser().parse_args(["--load", "x", "--device", "cpu"])
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        run_args(opts, saved, 1)
    (tmp_path / "tokenizer.json").write_text("{}")
    args = run_args(opts, saved, 1)
    assert (args.tokenizer_type, args.tokenizer_model) == ("hf", str(tmp_path))
    assert args.model_config == GQA and args.tensor_model_parallel_size == 1 and not args.compile
    explicit = build_arg_parser().parse_args(["--load", "x", "--tokenizer-type", "llama3", "--tokenizer-model", "t"])
    assert run_args(explicit, saved, 1).tokenizer_type == "llama3"


def test_converted_hf_model_generates_what_hf_generates(tmp_path, capsys):
    """An HF folder (safetensors + tokenizer.json) -> ``convert_checkpoint.py hf-to-megallama`` -> ``megallama
    generate``: the same greedy text as HF ``generate`` on the original, bos prefix and eos stop included."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    texts = ["the quick brown fox jumps over the lazy dog", "a module is a file of python code",
             "generation decodes one token at a time"] * 20
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    src = tmp_path / "hf"
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
        pad_token_id=2, tie_word_embeddings=False)).eval()
    with torch.no_grad():  # sharper logits than the init's, so greedy has no near-ties
        hf.lm_head.weight.mul_(20)
    hf.save_pretrained(src, safe_serialization=True)
    tok.save(str(src / "tokenizer.json"))
    sys.path.insert(0, os.path.join(REPO, "tools"))
    from convert_checkpoint import hf_to_megallama
    hf_to_megallama(str(src), str(tmp_path / "meg"))
    prompt = "the quick brown"
    ids = torch.tensor([[0] + tok.encode(prompt).ids])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)[0]
    ref = ref[ids.shape[1]:].tolist()
    ref = ref[:ref.index(1)] if 1 in ref else ref
    assert len(ref) >= 3, ref  # a real continuation, not an immediate stop
    from megallama.generation_cli import main
    assert main(["--load", str(tmp_path / "meg"), "--device", "cpu", "--prompt", prompt, "--greedy",
                 "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.endswith(f"--- prompt: {prompt}\n{tok.decode(ref)}\n")
    import megallama  # the same through the Python API
    loaded = megallama.load_for_generation(str(tmp_path / "meg"), device="cpu")
    cfg = megallama.SamplingConfig(max_new_tokens=10, temperature=0)
    assert megallama.generate_text(loaded, [prompt], cfg) == [tok.decode(ref)]


class _Tok:
    """The attributes generation reads from a tokenizer."""

    def __init__(self, vocab_size, fingerprint="sentencepiece:abc"):
        self.vocab_size, self.fingerprint, self.name = vocab_size, fingerprint, f"fake-{vocab_size}"
        self.bos_id, self.eos_id, self.eod = 1, 2, 2

    def encode(self, text):
        return [4 + ord(c) % 200 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_a_tokenizer_other_than_the_trained_one_is_refused():
    from megallama.generation_cli import check_tokenizer
    followed = {"vocab_size": None, "tensor_model_parallel_size": 2}  # the embedding followed the tokenizer
    with pytest.raises(ConfigError, match="followed a tokenizer of 8192 tokens"):
        check_tokenizer(_Tok(8000), dict(followed, tensor_model_parallel_size=1), 8192)
    assert check_tokenizer(_Tok(8192), followed, 8192) is None
    assert check_tokenizer(_Tok(8191), followed, 8192) is None  # padded to a tp multiple
    with pytest.raises(ConfigError, match="'fake-600' has 600 tokens but this run's embedding \\(8192"):
        check_tokenizer(_Tok(600), followed, 8192)  # the bundled tokenizer replaced by a 600-piece one
    with pytest.raises(ConfigError, match="--tokenizer-type/--tokenizer-model"):
        check_tokenizer(_Tok(9000), followed, 8192)
    recorded = dict(followed, tokenizer_fingerprint="sentencepiece:other")
    with pytest.raises(ConfigError, match="sentencepiece:abc.*sentencepiece:other"):
        check_tokenizer(_Tok(8192), recorded, 8192)
    # an explicit --vocab-size or a converted HF model may pad further: a warning, not an error
    assert check_tokenizer(_Tok(8000), {"vocab_size": 8192}, 8192) is None
    assert "far fewer" in check_tokenizer(_Tok(600), {"vocab_size": 8192}, 8192)
    assert check_tokenizer(_Tok(300), {"vocab_size": None, "converted_from": "/hf"}, 320) is None
    assert check_tokenizer(_Tok(600), {"vocab_size": None, "mock_data": True}, 8192) is None


def test_generate_text_takes_one_string_as_one_prompt(monkeypatch):
    import megallama.generation
    from megallama.generation_cli import LoadedModel, generate_text
    seen = []
    monkeypatch.setattr(megallama.generation, "generate",
                        lambda model, ids, cfg, **kw: seen.append(ids) or [[70, 71]] * len(ids))
    loaded = LoadedModel(None, _Tok(300), "ck", {"args": {}}, None)
    assert generate_text(loaded, "The module", SamplingConfig(max_new_tokens=2)) == ["FG"]
    assert len(seen[0]) == 1 and len(seen[0][0]) == 1 + len("The module")


def test_a_launch_that_cannot_split_the_model_names_the_launch():
    """torchrun --nproc_per_node 3 on 8 heads: the error told the user to pass --tensor-model-parallel-size, a flag
    generation does not take (it splits over every rank of the launch)."""
    from megallama.generation_cli import check_world
    check_world(2, GQA)
    with pytest.raises(ConfigError) as e:
        check_world(3, GQA)
    msg = str(e.value)
    assert "all 3 processes" in msg and "attention heads 8" in msg and "--nproc_per_node" in msg, msg
    assert "--tensor-model-parallel-size" not in msg


def test_a_mistyped_generate_flag_is_one_line(capsys):
    """argparse printed the 13-line usage before the mistake; the training flags' parser already says it in one."""
    from megallama.generation_cli import main
    with pytest.raises(SystemExit) as e:
        main(["--load", "x", "--promt", "hi"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == ("error: unrecognized arguments: --promt hi; did you mean --prompt? see --help "
                                         "for the flags\n"), err


def test_an_unsupported_device_is_refused():
    """--device mps (or xpu) generated on the CPU without a word."""
    from megallama.generation_cli import load_for_generation
    with pytest.raises(ConfigError, match="--device mps is not supported; use cpu or cuda"):
        load_for_generation("no-such-checkpoint", device="mps")
