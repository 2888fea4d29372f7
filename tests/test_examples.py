"""examples/: the launchers' flags resolve and fit (their DRY_RUN mode: one process, no GPU), and every Python
example trains its tiny CPU override on the bundled data (a subprocess each, as a user runs them)."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK"):
        env.pop(key, None)
    return {**env, **extra}


def _bash(script, *args, timeout=120, **env):
    return subprocess.run(["bash", os.path.join(REPO, "examples", script), *args], capture_output=True, text=True,
                          cwd=REPO, env=_env(**env), timeout=timeout)


def _total_gib(stdout):
    return float(re.search(r"^total\s+([0-9.]+)\s+per GPU", stdout, re.M).group(1))


def test_405b_launcher_resolves_and_fits_80_gib():
    r = _bash("pretrain_llama3_405b.sh", DRY_RUN="1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "256 GPUs = tp 8 x pp 8 x dp 4" in r.stdout and "ZeRO-1" in r.stdout and "recompute full" in r.stdout
    assert "'rope_scaling': {'factor': 8.0" in r.stdout and _total_gib(r.stdout) < 0.95 * 80
    # Megatron-core's split: embedding and loss counted as layers, 8 x 8 chunks of [1, 2, ..., 2, 1] decoder layers
    assert re.search(r"pipeline_layer_counts\s+\[1, (2, ){62}1\]", r.stdout), r.stdout[:3000]
    bad = _bash("pretrain_llama3_405b.sh", DRY_RUN="1", NNODES="28")  # 224 GPUs hold no whole 64-GPU replica
    assert bad.returncode == 2 and "not divisible by tp*pp*cp = 8*8*1" in bad.stderr, bad.stderr[-2000:]


def test_slurm_script_takes_the_rendezvous_from_slurm():
    r = _bash("slurm_pretrain.sbatch", DRY_RUN="1", SLURM_JOB_NUM_NODES="64", SLURM_JOB_ID="4242")
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"world_size\s+512", r.stdout) and "512 GPUs = tp 8 x pp 8 x dp 8" in r.stdout
    assert _total_gib(r.stdout) < _total_gib(_bash("pretrain_llama3_405b.sh", DRY_RUN="1").stdout)  # ZeRO-1 over 8
    outside = _bash("slurm_pretrain.sbatch")
    assert outside.returncode != 0 and "run through sbatch" in outside.stderr
    # DRY_RUN=1 needs no SLURM (the header says so): the script's #SBATCH --nodes, or NNODES, said in the output
    dry = _bash("slurm_pretrain.sbatch", DRY_RUN="1")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "dry run outside SLURM: 32 nodes" in dry.stdout and "256 GPUs = tp 8 x pp 8 x dp 4" in dry.stdout
    assert "128 GPUs = tp 8 x pp 8 x dp 2" in _bash("slurm_pretrain.sbatch", DRY_RUN="1", NNODES="16").stdout


@pytest.mark.parametrize("script,env,args,expect", [
    ("pretrain_llama3_8b.sh", {}, [], "8 GPUs = tp 8 x pp 1 x dp 1 x cp 1 (+sp), ZeRO-0, micro-batch 1 x 32 microbatches"),
    ("pretrain_llama3_8b.sh", {"LAYOUT": "3d"}, [], "8 GPUs = tp 2 x pp 2 x dp 2 x cp 1 (+sp), ZeRO-1"),
    ("pretrain_llama3_70b_3d.sh", {}, [], "64 GPUs = tp 8 x pp 4 x dp 2 x cp 1 (+sp), ZeRO-1"),
    ("train_moe.sh", {"EP": "2"}, [], "4 GPUs = tp 1 x pp 1 x dp 4 x cp 1, experts over ep 2, ZeRO-0, micro-batch 8"),
    ("multi_node.sh", {"NNODES": "2"}, ["--model", "llama3_8b", "--tensor-model-parallel-size", "8"],
     "16 GPUs = tp 8 x pp 1 x dp 2"),
    ("pretrain_tiny_cpu.sh", {}, [], "1 GPU = tp 1 x pp 1 x dp 1"),
])
def test_launcher_dry_run_resolves_and_fits_80_gib(script, env, args, expect):
    """Every launcher's DRY_RUN=1: its flags resolve for the job's GPUs (one process) and the estimate fits."""
    r = _bash(script, *args, DRY_RUN="1", **env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resolved configuration:" in r.stdout and expect in r.stdout, r.stdout[-3000:]
    assert _total_gib(r.stdout) < 0.95 * 80


def test_finetune_launcher_dry_run_resolves_the_finetuning_step(tmp_path):
    """DRY_RUN=1 bash finetune_lora.sh ran the pretraining command (chat_template False, the pretraining corpus) and
    never looked for the base checkpoint: now it is one line naming the command that creates it, and with the base
    there the fine-tuning step's own flags resolve (chat data, LoRA, the base's tokenizer)."""
    missing = _bash("finetune_lora.sh", DRY_RUN="1", BASE=str(tmp_path / "none"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr[-2000:]
    assert f"base checkpoint {tmp_path / 'none'} does not exist; create it with: python pretrain_llama.py" \
        in missing.stderr and "resolved configuration" not in missing.stdout
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    base = str(tmp_path / "base")  # the script's shape and the bundled tokenizer's vocabulary, one mock step
    pretrain(parse_args(["--model", "tiny_llama3_50m", "--num-layers", "4", "--hidden-size", "256",
                         "--ffn-hidden-size", "704", "--num-attention-heads", "8", "--num-query-groups", "4",
                         "--vocab-size", "8192", "--device", "cpu", "--mock-data", "--seq-length", "16",
                         "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "1", "--save", base,
                         "--no-progress-bar", "--no-fused-kernels"],
                        world_size=1))
    r = _bash("finetune_lora.sh", "--save", str(tmp_path / "lora"), DRY_RUN="1", BASE=base)
    assert r.returncode == 0, r.stderr[-2000:]
    for key, value in (("chat_template", "True"), ("pretrained_checkpoint", base), ("strategy", "lora"),
                       ("sft_packing", "True"), ("dry_run", "True")):
        assert re.search(rf"^  {key}\s+{re.escape(value)}$", r.stdout, re.M), (key, r.stdout[-3000:])
    assert "1 GPU = tp 1 x pp 1 x dp 1" in r.stdout and _total_gib(r.stdout) < 0.95 * 80
    assert not os.path.exists(tmp_path / "lora")  # a plan writes nothing


def test_moe_launcher_counts_experts_per_expert_parallel_rank():
    one, two = (_total_gib(_bash("train_moe.sh", DRY_RUN="1", EP=ep).stdout) for ep in ("1", "2"))
    assert two < one  # EP=2 holds half of the 8 experts per GPU


# ---------------------------------------------------------------- the seed's Python examples
EXAMPLES = ["train_llama_7b", "train_with_moe", "finetune_with_lora", "multi_node_training", "custom_data_loading"]
LOSS = re.compile(r"^ \[[0-9: -]+\] iteration\s+(\d+)/\s*\d+ \|.*\| lm loss: ([0-9.E+-]+) \|", re.M)


def _python(example, *args, **env):
    return subprocess.Popen([sys.executable, os.path.join(REPO, "examples", f"{example}.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env(**env))


def _trained(stdout, iters=3):
    losses = [(int(i), float(v)) for i, v in LOSS.findall(stdout)]
    assert [i for i, _ in losses] == list(range(1, iters + 1)), stdout[-3000:]
    assert all(0.0 < v < 20.0 for _, v in losses) and f"trained {iters} iterations" in stdout, stdout[-3000:]


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e != "multi_node_training"])
def test_example_trains_its_tiny_override_on_cpu(example):
    # one through the environment switch, the others through --tiny
    p = _python(example, MEGALLAMA_EXAMPLE_TINY="1") if example == "train_llama_7b" else _python(example, "--tiny")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    _trained(out)
    if example == "train_with_moe":
        assert "tokens/expert L1:" in out and "moe aux loss" in out
    if example == "train_llama_7b":  # one process cannot split tp 2: said
        assert "tensor parallel size 1: 1 process(es) cannot hold tp 2" in out and " tp=1 " in out, out[-3000:]
    if example == "custom_data_loading":
        assert "validation loss at iteration 3 |" in out and "windows of 65 tokens" in out


def test_llama_7b_tiny_runs_tensor_parallel_2_as_documented():
    """README and the docstring: tp 2; --tiny is the same code, so two processes split the tiny model in two."""
    from dist_utils import free_port
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), os.path.join(REPO, "examples", "train_llama_7b.py"), "--tiny"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=_env())
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert " tp=2 " in out and "tensor parallel size 1" not in out, out[-3000:]
    _trained(out)


def test_multi_node_example_joins_from_slurm_variables():
    """Two srun-style tasks (no torchrun): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR come from SLURM's variables."""
    from dist_utils import free_port
    slurm = dict(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost",
                 SLURM_JOB_ID="7", MASTER_PORT=str(free_port()))
    procs = [_python("multi_node_training", "--tiny", SLURM_PROCID=str(r), SLURM_LOCALID=str(r), **slurm)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "rendezvous: 1 node(s) x 2 processes, master localhost:" in outs[0][0]
    # the log lines come from the last rank alone (Megatron's print_rank_last), the summary from rank 0
    assert "world=2" in outs[0][0] and not LOSS.search(outs[0][0]) and "trained" not in outs[1][0]
    _trained(outs[1][0] + outs[0][0])


@pytest.mark.parametrize("example,world,extra,expect", [
    ("train_llama_7b", 8, [], "8 GPUs = tp 2 x pp 1 x dp 4 (+sp), ZeRO-1, recompute full"),
    ("train_with_moe", 4, [], "4 GPUs = tp 1 x pp 1 x dp 4"),
    ("finetune_with_lora", 8, ["--pretrained-checkpoint", "base", "--tokenizer-model", "tok"], "8 GPUs = tp "),
    ("multi_node_training", 32, [], "32 GPUs = tp 8 x pp 2 x dp 2 (+sp), ZeRO-2"),
    ("custom_data_loading", 8, ["--text-file", "README.md"], "8 GPUs = tp "),
])
def test_example_real_size_resolves_and_fits_80_gib(example, world, extra, expect, monkeypatch, capsys):
    """--dry-run in this process: the real model's flags resolve for the world size and the estimate fits."""
    import runpy
    monkeypatch.syspath_prepend(os.path.join(REPO, "examples"))
    monkeypatch.chdir(REPO)
    for key in ("RANK", "MASTER_ADDR", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(sys, "argv", [f"{example}.py", "--dry-run", *extra])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(REPO, "examples", f"{example}.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert done.value.code == 0, out[-3000:]
    assert expect in out and re.search(r"^GPU memory\s+80\.00\s+fits$", out, re.M), out[-3000:]
    assert _total_gib(out) < 0.95 * 80
