"""Auto-configuration: the layouts it picks fit by the estimator, are deterministic, and it says when none fits."""
import pytest

from megallama.autoconfig import choose_layout, throughput_score
from megallama.errors import ConfigError


def test_tiny_model_on_one_gpu_uses_no_model_parallelism():
    plan = choose_layout("tiny_llama3_50m", 1, gpu_memory_gb=80, sequence_length=2048)
    assert (plan["tp"], plan["pp"], plan["dp"], plan["zero_stage"]) == (1, 1, 1, 0)
    assert plan["recompute"] == "none" and plan["estimate"]["fits"]
    assert "chosen: tp 1, pp 1, dp 1" in plan["explanation"]


def test_fixed_micro_batch_and_small_gpu_force_memory_savings():
    roomy = choose_layout("llama3_8b", 8, gpu_memory_gb=80, sequence_length=4096, micro_batch_size=1)
    tight = choose_layout("llama3_8b", 8, gpu_memory_gb=40, sequence_length=4096, micro_batch_size=1)
    assert roomy["estimate"]["memory_per_gpu_gb"] <= 0.95 * 80
    assert tight["estimate"]["memory_per_gpu_gb"] <= 0.95 * 40
    saving = lambda p: (p["tp"] * p["pp"], p["zero_stage"], ["none", "selective", "full"].index(p["recompute"]))  # noqa
    assert saving(tight) > saving(roomy)


def test_405b_on_64_gpus_does_not_fit_and_says_what_would(capsys):
    """The seed's '405B on 64 GPUs -> tp 8, pp 8, ZeRO 3' leaves dp = 1 (ZeRO-3 shards nothing) and > 100 GiB of
    model states per GPU at 18 bytes/param: no layout of 64 x 80 GiB fits, and the explanation says so."""
    assert choose_layout("llama3_405b", 64, gpu_memory_gb=80, sequence_length=8192) is None
    text = capsys.readouterr().out
    floor = 18 * 405_853_388_800 / 64 / 2**30
    assert "NO layout fits" in text and f"{floor:.1f} GiB per GPU when fully sharded" in text
    assert "128 GPUs would fit: tp " in text


def test_405b_on_enough_gpus_uses_model_parallelism_and_sharding():
    tight = choose_layout("llama3_405b", 128, gpu_memory_gb=80, sequence_length=8192)
    # 53 GiB of model states per GPU even fully sharded: only ZeRO-3 over all dp ranks or a deep pipeline fits
    assert tight["tp"] >= 4 and (tight["zero_stage"] == 3 or tight["pp"] >= 8)
    assert tight["estimate"]["memory_per_gpu_gb"] <= 0.95 * 80
    plan = choose_layout("llama3_405b", 256, gpu_memory_gb=80, sequence_length=8192)
    assert plan["zero_stage"] >= 1 and plan["tp"] * plan["pp"] * plan["dp"] == 256
    assert plan["estimate"]["memory_per_gpu_gb"] <= 0.95 * 80
    again = choose_layout("llama3_405b", 256, gpu_memory_gb=80, sequence_length=8192)
    assert {k: again[k] for k in ("tp", "pp", "dp", "zero_stage", "recompute", "micro_batch_size")} == \
        {k: plan[k] for k in ("tp", "pp", "dp", "zero_stage", "recompute", "micro_batch_size")}


def test_global_batch_fixes_microbatches_and_score_prefers_less_recompute():
    plan = choose_layout("llama3_8b", 8, gpu_memory_gb=80, sequence_length=2048, global_batch_size=64)
    assert plan["micro_batch_size"] * plan["dp"] * plan["num_microbatches"] == 64
    assert throughput_score(1, 1, 8, 0, "none", 4, 2048, 1) > throughput_score(1, 1, 8, 0, "full", 4, 2048, 1)
    assert throughput_score(1, 4, 2, 0, "none", 4, 2048, 16) > throughput_score(1, 4, 2, 0, "none", 4, 2048, 4)


def test_bad_gpu_count():
    with pytest.raises(ConfigError, match="must be positive"):
        choose_layout("llama3_8b", 0)


# ---------------------------------------------------------------- pretrain_llama.py --auto-configure
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from megallama.arguments import parse_args  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "176",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "8192", "--seq-length", "32",
        "--device", "cpu", "--no-progress-bar"]


def _script(args, nproc=1):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    launch = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run(launch + [os.path.join(REPO, "pretrain_llama.py"), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def _flags(stdout):
    return next(ln.split("flags:", 1)[1].split() for ln in stdout.splitlines() if ln.strip().startswith("flags:"))


def test_dry_run_plans_for_gpus_x_nodes_and_the_flags_reproduce_it():
    r = _script(["--model", "llama3_70b", "--bf16", "--seq-length", "8192", "--auto-configure", "--gpus", "8",
                 "--nodes", "8", "--gpu-memory-gb", "80", "--dry-run"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "on 64 GPUs of 80 GiB" in r.stdout and "chosen: tp " in r.stdout and "(--gpu-memory-gb)" in r.stdout
    flags = _flags(r.stdout)
    again = parse_args(["--model", "llama3_70b", "--bf16", "--seq-length", "8192", *flags], world_size=64)
    from megallama.data.tokenizer import build_tokenizer  # no --vocab-size: the bundled tokenizer's vocabulary
    plan = choose_layout("llama3_70b", 64, 80, 8192, precision="bf16", gpus_per_node=8, explain=False,
                         tokenizer_vocab=build_tokenizer("bundled").vocab_size)
    assert (again.tensor_model_parallel_size, again.pipeline_model_parallel_size, again.data_parallel_size,
            again.zero_stage, again.recompute_granularity or "none", again.micro_batch_size) == \
        (plan["tp"], plan["pp"], plan["dp"], plan["zero_stage"], plan["recompute"], plan["micro_batch_size"])


def test_no_fitting_layout_or_a_contradiction_is_one_error_line():
    r = _script(["--model", "llama3_405b", "--bf16", "--seq-length", "8192", "--auto-configure", "--gpus", "8",
                 "--nodes", "8", "--gpu-memory-gb", "80", "--dry-run"])
    assert r.returncode == 2 and "NO layout fits" in r.stdout and "128 GPUs would fit" in r.stdout
    assert r.stderr.startswith("error: --auto-configure found no layout") and len(r.stderr.splitlines()) == 1
    r = _script(TINY + ["--auto-configure", "--tensor-model-parallel-size", "2", "--dry-run"])
    assert r.returncode == 2 and "--tensor-model-parallel-size 2 was given" in r.stderr, r.stderr[-2000:]
    r = _script(TINY + ["--auto-configure", "--gpus", "4", "--train-iters", "1"])
    assert r.returncode == 2 and "1 process runs" in r.stderr, r.stderr[-2000:]


def test_two_rank_gloo_run_trains_with_the_chosen_layout_explained_once():
    """The user fixes the ZeRO stage and the global batch; the rest is chosen, printed by rank 0 and trained."""
    r = _script(TINY + ["--auto-configure", "--gpu-memory-gb", "80", "--zero-stage", "1", "--global-batch-size", "8",
                        "--train-iters", "2", "--lr", "3e-3"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("chosen: tp ") == 1 and "on 2 GPUs of 80 GiB" in r.stdout
    flags = _flags(r.stdout)
    tp, pp = int(flags[flags.index("--tensor-model-parallel-size") + 1]), \
        int(flags[flags.index("--pipeline-model-parallel-size") + 1])
    assert flags[flags.index("--zero-stage") + 1] == "1" and flags[flags.index("--global-batch-size") + 1] == "8"
    assert f"world=2 tp={tp} pp={pp} dp={2 // (tp * pp)}" in r.stdout and "zero stage 1" in r.stdout
    losses = [float(x) for x in re.findall(r"lm loss: ([0-9.E+-]+)", r.stdout)]
    assert len(losses) == 2 and all(0 < v < 20 for v in losses), r.stdout[-2000:]


def test_auto_configure_plans_with_the_tokenizer_vocabulary():
    """No --vocab-size and real data: the run's embedding follows the tokenizer (bundled: 8192 tokens), padded to
    tp x --make-vocab-size-divisible-by as build_data pads it; the plan prices that model, not the named 128K one."""
    from megallama.data.tokenizer import build_tokenizer
    tok = build_tokenizer("bundled").vocab_size
    base = ["--model", "tiny_llama3_50m", "--auto-configure", "--gpus", "2", "--dry-run", "--gpu-memory-gb", "80",
            "--seq-length", "256"]
    args = parse_args(base + ["--make-vocab-size-divisible-by", "1000"], world_size=1)
    step = 1000 * args.tensor_model_parallel_size
    assert args.model_config.vocab_size == -(-tok // step) * step != 128256
    assert args.auto_layout["tp"] == args.tensor_model_parallel_size
    plan = choose_layout(args.model_config, 2, 80, 256, gpus_per_node=2, explain=True, tokenizer_vocab=tok,
                         vocab_multiple=1000)
    assert plan["estimate"]["num_params"] == args.model_config.num_params()
    assert f"({args.model_config.num_params() / 1e9:.2f}B params)" in plan["explanation"]
    for fixed in (["--mock-data"], ["--vocab-size", "128256"]):  # the vocabulary does not follow a tokenizer
        assert parse_args(base + fixed, world_size=1).model_config.vocab_size == 128256


def test_auto_configure_prices_the_chosen_schedule():
    """--pipeline-schedule zb-h1 with --auto-configure: estimated and scored as ZB-H1 (a third of 1F1B's bubble)."""
    plan = choose_layout("llama3_8b", 8, gpu_memory_gb=24, sequence_length=2048, micro_batch_size=1,
                         pipeline_schedule="zb-h1", explain=True)
    assert plan["estimate"]["layout"]["pipeline_schedule"] in ("zb-h1", "none")
    assert throughput_score(1, 4, 2, 0, "none", 4, 2048, 8, schedule="zb-h1") > \
        throughput_score(1, 4, 2, 0, "none", 4, 2048, 8)
    args = parse_args(["--model", "llama3_8b", "--auto-configure", "--gpus", "8", "--dry-run", "--gpu-memory-gb", "24",
                       "--pipeline-schedule", "zb-h1", "--mock-data", "--micro-batch-size", "1"], world_size=1)
    assert args.pipeline_schedule == "zb-h1"
