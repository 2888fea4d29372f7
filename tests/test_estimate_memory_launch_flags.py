"""estimate-memory takes a pasted training launch line: flags that leave memory alone are accepted and ignored, those
that change it are priced as training prices them (``cli train --dry-run``) or refused in one line, and a flag no
parser knows is still one "unrecognized arguments" line (memory_launch_flags.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

from megallama.memory_cli import main, run

ROOT = Path(__file__).resolve().parents[1]
# shape and layout flags the estimator always knew: a small MoE model on 2 GPUs, experts split over them
MOE = ["--model", "tiny_llama3_50m", "--num-layers", "4", "--num-experts", "4", "--moe-router-topk", "2",
       "--gpus", "2", "--expert-model-parallel-size", "2", "--micro-batch-size", "1", "--global-batch-size", "4",
       "--seq-length", "256", "--bf16", "--use-distributed-optimizer"]
# what a Megatron MoE launch line adds that does not change memory (--vocab-size given: no tokenizer to follow)
NEUTRAL = ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-num-groups", "2",
           "--moe-router-group-topk", "1", "--moe-aux-loss-coeff", "1e-2", "--moe-z-loss-coeff", "1e-3",
           "--moe-token-dispatcher-type", "alltoall", "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style",
           "cosine", "--lr-warmup-iters", "10", "--train-iters", "1000", "--weight-decay", "0.1", "--clip-grad", "1.0",
           "--data-path", "0.3", "web_text", "0.7", "code_text", "--split", "99,1,0", "--tokenizer-type",
           "Llama3Tokenizer", "--tokenizer-model", "/nowhere/tokenizer.model", "--vocab-size", "128256",
           "--log-interval", "10", "--save", "/nowhere/ckpt", "--save-interval", "500", "--eval-iters", "2",
           "--tensorboard-dir", "/nowhere/tb", "--swiglu", "--disable-bias-linear", "--use-flash-attn",
           "--overlap-param-gather", "--seed", "7"]


def _training_estimate(argv, gpus):
    """What ``cli train --dry-run`` prices for the same line (its vocabulary follows the tokenizer as the run's)."""
    from megallama.arguments import parse_args
    from megallama.autoconfig_args import follow_tokenizer
    from megallama.memory_args import estimate_for_args
    args = parse_args(argv + ["--dry-run"], world_size=gpus)
    follow_tokenizer(args)
    return estimate_for_args(args, gpus, 1, gpu_memory_gb=80.0)


def test_pasted_moe_launch_line_prices_as_without_its_neutral_flags():
    base = run(MOE)["estimate"]
    pasted = run(MOE + ["--vocab-size", "128256"] + NEUTRAL)["estimate"]
    assert pasted == base
    assert base == _training_estimate(MOE + NEUTRAL, gpus=2)  # and as training prices the whole line


@pytest.mark.parametrize("typo", [["--moe-router-topk-x", "3"], ["--lr", "3e-4", "--moe-routr-score-function",
                                                                  "sigmoid"]])
def test_a_flag_no_parser_knows_is_one_line(capsys, typo):
    with pytest.raises(SystemExit) as e:
        main(MOE + typo)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"unrecognized arguments: {typo[-2]} {typo[-1]}" in err


def test_the_script_refuses_a_typo_in_one_line():
    out = subprocess.run([sys.executable, "tools/estimate_memory.py", *MOE, "--lr", "1e-4", "--data-pth", "x"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == ["error: unrecognized arguments: --data-pth x; see --help for the flags"]


def test_megatron_model_line_is_priced_as_training_builds_it():
    """No --model, Megatron's model flags: FFN int(8h/3/64)*64 and the base model are training's; the embedding
    follows the named tokenizer (the bundled 8192) padded to a multiple of 1000, and is untied."""
    line = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--max-position-embeddings",
            "1024", "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm", "--position-embedding-type",
            "rope", "--attention-dropout", "0", "--hidden-dropout", "0", "--group-query-attention",
            "--num-query-groups", "2", "--tokenizer-type", "bundled", "--make-vocab-size-divisible-by", "1000",
            "--untie-embeddings-and-output-weights", "--seq-length", "256", "--micro-batch-size", "1",
            "--global-batch-size", "4", "--gpus", "1", "--bf16", "--lr", "3e-4", "--train-iters", "10"]
    est = run(line)["estimate"]
    assert est == _training_estimate(line, gpus=1)
    tied = run([a for a in line if a != "--untie-embeddings-and-output-weights"])["estimate"]
    assert est["memory_per_gpu_gb"] > tied["memory_per_gpu_gb"]  # the output weight is its own


def test_moe_layer_freq_is_priced():
    """Every other layer sparse: half the experts' weights, as training builds it (--vocab-size: both price the
    model's embedding; training alone would follow its bundled tokenizer when the line names none)."""
    line = MOE + ["--vocab-size", "128256", "--moe-layer-freq", "2"]
    every_other = run(line)["estimate"]
    assert every_other["memory_per_gpu_gb"] < run(MOE)["estimate"]["memory_per_gpu_gb"]
    assert every_other == _training_estimate(line, gpus=2)


@pytest.mark.parametrize("flags, says", [
    (["--use-checkpoint-args", "--load", "/nowhere"], "--use-checkpoint-args takes the model's shape"),
    (["--gradient-compression", "powersgd"], "error-feedback buffers"),
    (["--make-vocab-size-divisible-by", "128"], "no tokenizer was named"),
    (["--tokenizer-type", "Llama3Tokenizer", "--tokenizer-model", "/nowhere/tokenizer.model"],
     "give it as --vocab-size N"),
    (["--kv-channels", "7"], "--kv-channels 7 is not supported"),
])
def test_memory_flags_it_cannot_price_are_refused_in_one_line(capsys, flags, says):
    assert main(MOE + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and says in err


def test_a_moe_flag_on_a_dense_model_is_refused_as_training_refuses_it(capsys):
    assert main(["--model", "tiny_llama3_50m", "--moe-router-score-function", "sigmoid"]) == 2
    assert "configures MoE experts, but the model has none" in capsys.readouterr().err
