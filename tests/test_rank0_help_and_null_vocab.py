"""Small user-facing gaps: ``--help`` under torchrun is printed by rank 0 only (not once per rank); chat generation
through the Python API warns, as ``--chat`` does, that a checkpoint trained on no chat format gets a guessed
template (once); ``tools/generate.py`` says when the tracker names a missing iteration, as training's ``--load``
and the HF export do; and NullTokenizer's ``--vocab-size V`` is priced by estimate-memory and the pipeline timeline
as training builds it (V + 1 for the eod, padded to tp x the divisor)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "32", "--ffn-hidden-size", "64",
         "--num-attention-heads", "4", "--num-query-groups", "2", "--micro-batch-size", "2", "--global-batch-size",
         "2", "--no-fused-kernels", "--no-progress-bar", "--device", "cpu", "--seed", "3", "--seq-length", "32"]


# ------------------------------------------------------------------ (1) --help: rank 0 only
def _help(script, rank):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(RANK=str(rank), PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *script, "--help"], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("script", [["pretrain_llama.py"], ["finetune_llama.py"]])
def test_scripts_print_help_on_rank_0_only(script):
    out = _help(script, 1)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", ""), out  # was: the whole help on every rank
    out = _help(script, 0)
    assert out.returncode == 0 and out.stdout.startswith(f"usage: {script[0]}"), out


@pytest.mark.parametrize("argv", [["train"], ["estimate-memory"], ["generate"], []])
def test_cli_subcommands_print_help_on_rank_0_only(argv, monkeypatch, capsys):
    from megallama.cli import main
    for env, shown in [({"RANK": "1"}, False), ({"LOCAL_RANK": "1"}, False), ({"RANK": "0"}, True), ({}, True)]:
        for k in ("RANK", "LOCAL_RANK"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        try:
            rc = main(argv + ["--help"])
        except SystemExit as e:  # argparse's help action exits
            rc = e.code
        out = capsys.readouterr()
        assert rc in (0, None) and out.err == "", (env, out)
        assert ("usage:" in out.out) == shown, (env, out.out[:200])


# ------------------------------------------------------------------ (2)+(3) generation's warnings
@pytest.fixture(scope="module")
def gapped_run(tmp_path_factory):
    """A 2-iteration pretraining run (no chat format) saved at 1 and 2, iter 2 then removed: the tracker names it."""
    from loop_harness import pretrain_here
    tmp = tmp_path_factory.mktemp("gap")
    ck = str(tmp / "ck")
    pretrain_here(SMALL + ["--train-iters", "2", "--save", ck, "--save-interval", "1", "--data-cache-dir",
                           str(tmp / "cache")])
    shutil.rmtree(os.path.join(ck, "iter_0000002"))
    return ck


def _gap_line(ck):
    return (f"warning: {ck}/latest_checkpointed_iteration.txt names iteration 2, but iter_0000002 is missing; using "
            f"iteration 1 ({ck}/iter_0000001)")


def test_generate_says_the_tracked_iteration_is_missing(gapped_run, capsys, one_thread):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from generate import main
    capsys.readouterr()
    rc = main(["--load", gapped_run, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"])
    out = capsys.readouterr()
    assert rc == 0 and _gap_line(gapped_run) in out.err, out  # was: silent
    assert "loaded" in out.out and "iteration 1" in out.out, out.out


def test_chat_through_the_api_warns_once_that_the_template_is_a_guess(gapped_run, capsys, one_thread):
    from megallama.generation import SamplingConfig
    from megallama.generation_cli import generate_text, load_for_generation
    from megallama.mpu import parallel_state as ps
    loaded = load_for_generation(gapped_run, device="cpu")
    try:
        capsys.readouterr()
        cfg = SamplingConfig(max_new_tokens=2, temperature=0)
        generate_text(loaded, ["hi"], cfg, chat=True)
        generate_text(loaded, ["again"], cfg, chat=True)  # the same model: not said again
        generate_text(loaded, ["plain"], cfg)
        out = capsys.readouterr()
        warnings = [line for line in out.out.splitlines() if "not trained on a chat format" in line]
        assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "--chat-template" in warnings[0], out
        generate_text(load_for_generation(gapped_run, device="cpu"), ["hi"], cfg, chat=True, chat_template="llama3")
        assert "not trained on a chat format" not in capsys.readouterr().out  # a template named: no guess
    finally:
        ps.destroy_model_parallel()


# ------------------------------------------------------------------ (4) NullTokenizer's vocabulary, priced as built
def _null_data(tmp):
    """A NullTokenizer corpus (ids < 1000, eod 1000) preprocessed as training reads it; returns its prefix."""
    sys.path.insert(0, ROOT)
    from tools.preprocess_data import main as preprocess
    src = os.path.join(tmp, "in.jsonl")
    with open(src, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(str((37 * i + j) % 1000) for j in range(40))}) + "\n")
    prefix = os.path.join(tmp, "o")
    assert preprocess(["--input", src, "--output-prefix", prefix, "--tokenizer-type", "NullTokenizer",
                       "--vocab-size", "1000", "--append-eod", "--no-progress-bar"]) == 0
    return prefix + "_text_document"


def _null_flags(prefix, cache, tp):
    return SMALL + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "1000", "--data-path", prefix,
                    "--data-cache-dir", cache, "--train-iters", "1", "--tensor-model-parallel-size", str(tp)]


def _embedding_rows(rank, world, prefix, cache):
    """The embedding rows training builds on this rank (its tensor-parallel shard) for the NullTokenizer run."""
    import torch

    from megallama.arguments import parse_args
    from megallama.initialize import initialize_megatron
    from megallama.mpu.layers import VocabParallelEmbedding
    from megallama.training_setup import build_data, build_model_chunks
    args = parse_args(_null_flags(prefix, cache, world), world_size=world)
    initialize_megatron(args)
    build_data(args)
    model = build_model_chunks(args, torch.device("cpu"))[0]
    emb = next(m for m in model.modules() if isinstance(m, VocabParallelEmbedding))
    return emb.weight.shape[0] * world


def _priced(tp, monkeypatch):
    """(estimate-memory's, the timeline's) vocabulary for the same NullTokenizer flags."""
    import megallama.memory as memory
    from megallama.memory_cli import run
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import pipeline_timeline
    seen, real = {}, memory.estimate_requirements

    def spy(*a, **kw):
        seen["cfg"] = kw["model_config"]
        return real(*a, **kw)
    monkeypatch.setattr(memory, "estimate_requirements", spy)
    run(["--model", "tiny_llama3_50m", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
         "--tensor-model-parallel-size", str(tp)])
    ns = pipeline_timeline._parser().parse_args(["--model", "tiny_llama3_50m", "--tokenizer-type", "NullTokenizer",
                                                 "--vocab-size", "1000", "--tensor-model-parallel-size", str(tp)])
    cfg, line = pipeline_timeline._model_config(ns)
    assert "1001" in line, line  # the tokenizer's V + 1
    return seen["cfg"].vocab_size, cfg.vocab_size


def test_null_tokenizer_vocab_is_priced_as_training_builds_it(tmp_path, monkeypatch, one_thread):
    """Was: both priced 1000 while training builds 1001 (tp 1) and 1002 (tp 2)."""
    from dist_utils import run_distributed
    from megallama.mpu import parallel_state as ps
    prefix, cache = _null_data(str(tmp_path)), str(tmp_path / "cache")
    try:
        built = _embedding_rows(0, 1, prefix, cache)
    finally:
        ps.destroy_model_parallel()
    assert built == 1001 and _priced(1, monkeypatch) == (built, built)
    built = run_distributed(_embedding_rows, 2, prefix, cache)[0]
    assert built == 1002 and _priced(2, monkeypatch) == (built, built)


def test_null_tokenizer_mock_data_keeps_the_given_vocab(monkeypatch):
    """--mock-data builds no tokenizer: training keeps --vocab-size, and so do the estimates."""
    from megallama.autoconfig_args import tokenizer_vocab
    from megallama.arguments import parse_args
    args = parse_args(SMALL + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "1000", "--mock-data"],
                      world_size=1)
    assert tokenizer_vocab(args) is None and args.model_config.vocab_size == 1000
    args = parse_args(SMALL + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"], world_size=1)
    assert tokenizer_vocab(args) == 1001 and args.vocab_size == 1000  # the flag is left for build_data to read
