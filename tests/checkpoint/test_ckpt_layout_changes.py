"""Layout changes test_ckpt_reshard.py leaves out, as a user makes them between two jobs: tied embeddings across
pipeline layouts (pp2 -> pp1 and -> pp4, where the output layer is a copy of the embedding on the last stage), cp2
-> cp1, dp4 ZeRO-2 -> dp2 ZeRO-0; the resumed run's next losses equal the run that never stopped within 1e-6
relative (fp32). A bf16 checkpoint resumed in fp32 takes the fp32 master weights (not the bf16-rounded model copy)
and an fp32 checkpoint resumed in bf16 makes its masters from the fp32 weights. A tied/untied mismatch names the
flag. A save killed at any point (a half-written rank file, before the rename, before the tracker moves) leaves
the previous checkpoint the latest and loadable, and the resume trains on bit for bit. A LoRA run moves from tp2 to
tp1 with its adapters, and a --save-adapter folder written at tp1 loads into tp2 (``load_adapter``)."""
import os
import signal
import subprocess
import sys

import pytest
import torch

import pretrain_llama
from ckpt_helpers import REPO, TINY, close, env, losses, ok, run

# 4 layers: pp4 holds one per stage, and the first and last stages hold the two copies of the tied embedding
ARGS = TINY + ["--num-layers", "4", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "6"]


_ok = ok


def _close(got, ref, steps):
    close(got, ref, steps, 1e-6)


def _straight_and_resumed(tmp_path, saved, loads):
    """Run ``saved`` = (nproc, flags) straight to 6 saving iteration 3; resume each of ``loads`` from it."""
    nproc, flags = saved
    ck, log = str(tmp_path / "a"), str(tmp_path / "a.log")
    _ok(run(ARGS + flags + ["--save", ck, "--save-interval", "3", "--loss-log", log], nproc))
    ref = losses(log)
    for i, (n, more) in enumerate(loads):
        got = str(tmp_path / f"b{i}.log")
        r = _ok(run(ARGS + more + ["--load", os.path.join(ck, "iter_0000003"), "--loss-log", got], n))
        assert "layout changed since the save" in r.stdout and "weights and optimizer resharded" in r.stdout
        _close(losses(got), ref, range(4, 7))


def test_tied_embeddings_across_pipeline_layouts(tmp_path):
    _straight_and_resumed(tmp_path, (2, ["--pipeline-model-parallel-size", "2"]),
                          [(1, []), (4, ["--pipeline-model-parallel-size", "4"])])


def test_context_parallel_and_zero_stage_changes(tmp_path):
    _straight_and_resumed(tmp_path / "cp", (2, ["--context-parallel-size", "2"]), [(1, [])])
    _straight_and_resumed(tmp_path / "zero", (4, ["--zero-stage", "2"]), [(2, ["--zero-stage", "0"])])


# ------------------------------------------------------------------ bf16 <-> fp32
SHORT = TINY + ["--micro-batch-size", "2", "--global-batch-size", "4"]
NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight")


def _resave_unchanged(src, dst, flags):
    """Load ``src`` under ``flags`` and save one step later with lr 0: the saved weights are the loaded ones."""
    assert pretrain_llama.main(SHORT + flags + ["--lr", "0", "--min-lr", "0", "--train-iters", "3",
                                                "--override-opt-param-scheduler", "--load", src, "--save", dst,
                                                "--save-interval", "3"]) == 0
    from megallama.checkpointing import open_checkpoint
    return open_checkpoint(dst)[2]


@pytest.mark.parametrize("saved,resumed", [("bf16", "fp32"), ("fp32", "bf16")])
def test_precision_change_keeps_the_fp32_weights(tmp_path, saved, resumed):
    from megallama.checkpointing import open_checkpoint
    flag = {"bf16": ["--bf16"], "fp32": []}
    ck = str(tmp_path / "a")
    assert pretrain_llama.main(SHORT + flag[saved] + ["--train-iters", "2", "--save", ck,
                                                      "--save-interval", "2"]) == 0
    src = open_checkpoint(ck)[2]
    out = _resave_unchanged(ck, str(tmp_path / "b"), flag[resumed])
    for n in NAMES:
        if saved == "bf16":  # the fp32 model is the bf16 run's fp32 master, not its bf16 copy
            assert out.read(n).dtype == torch.float32 and torch.equal(out.read(n), src.read("optimizer/master/" + n))
        else:  # the bf16 run's masters are the fp32 weights, its model their rounding
            assert torch.equal(out.read("optimizer/master/" + n), src.read(n))
            assert torch.equal(out.read(n), src.read(n).to(torch.bfloat16))


def test_tied_untied_mismatch_names_the_flag(tmp_path, capsys):
    ck = str(tmp_path / "untied")
    assert pretrain_llama.main(SHORT + ["--train-iters", "1", "--untie-embeddings-and-output-weights", "--save", ck,
                                        "--save-interval", "1"]) == 0
    capsys.readouterr()
    assert pretrain_llama.main(SHORT + ["--train-iters", "2", "--load", ck]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    assert "(its output layer is a separate tensor: pass --untie-embeddings-and-output-weights)" in err, err


# ------------------------------------------------------------------ a save killed mid-way
DRIVER = """
import os, signal, sys
from megallama.checkpointing import files as F
where, it = sys.argv.pop(1), int(sys.argv.pop(1))
tmp, real = F.checkpoint_dir("", it).lstrip("/") + ".tmp", {}
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def half_a_rank_file(obj, path):  # killed while writing its rank file: half of it on disk
    real["save"](obj, path)
    if tmp in path and "rank_" in path:
        os.truncate(path, os.path.getsize(path) // 2)
        die()
def before_rename(tmp_dir, final):  # every file written, the manifest too
    if final.endswith(F.checkpoint_dir("", it)):
        die()
    real["publish"](tmp_dir, final)
def before_tracker(save, iteration):  # iter_N in place, the tracker still naming the previous one
    if iteration == it:
        die()
    real["tracker"](save, iteration)
real.update(save=F._torch_save, publish=F.publish, tracker=F.write_tracker)
if where == "rank_file":
    F._torch_save = half_a_rank_file
elif where == "rename":
    F.publish = before_rename
else:
    F.write_tracker = before_tracker
import pretrain_llama
sys.exit(pretrain_llama.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where", ["rank_file", "rename", "tracker"])
def test_save_killed_midway_leaves_the_previous_checkpoint_latest(tmp_path, where):
    from megallama.checkpointing import files as F
    argv = SHORT + ["--train-iters", "6"]
    ck, ref_log, log = str(tmp_path / "ck"), str(tmp_path / "ref.log"), str(tmp_path / "resumed.log")
    r = subprocess.run([sys.executable, "-c", DRIVER, where, "4"] + argv + ["--save", ck, "--save-interval", "2"],
                       capture_output=True, text=True, env=env(), cwd=REPO, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]
    assert F.read_tracker(ck) == 2 and F.resolve_load_dir(ck)[0] == F.checkpoint_dir(ck, 2)
    assert F.quick_check(F.checkpoint_dir(ck, 2)) is None
    assert pretrain_llama.main(argv + ["--loss-log", ref_log]) == 0
    assert pretrain_llama.main(argv + ["--load", ck, "--save", ck, "--save-interval", "2", "--loss-log", log]) == 0
    assert losses(log) == {s: v for s, v in losses(ref_log).items() if s > 2}
    assert F.read_tracker(ck) == 6 and sorted(os.listdir(ck)) == [
        "iter_0000002", "iter_0000004", "iter_0000006", "latest_checkpointed_iteration.txt"]


# ------------------------------------------------------------------ LoRA across tp
LORA = ["--strategy", "lora", "--lora-rank", "4", "--lora-target-modules", "all"]


def test_lora_run_moves_from_tp2_to_tp1_with_its_adapters(tmp_path):
    """The run's checkpoint (base + adapters + their Adam states) resumes at tp1 like the tp2 run, and the
    --save-adapter files of both runs hold the same full adapters."""
    from safetensors.torch import load_file
    ad_a, ad_b = str(tmp_path / "adapter_tp2"), str(tmp_path / "adapter_tp1")
    _straight_and_resumed(tmp_path, (2, LORA + ["--tensor-model-parallel-size", "2", "--save-adapter", ad_a]),
                          [(1, LORA + ["--save-adapter", ad_b])])
    a, b = (load_file(os.path.join(d, "adapter_model.safetensors")) for d in (ad_a, ad_b))
    assert sorted(a) == sorted(b) and len(a) == 4 * 7 * 2  # 4 layers, 7 modules, A and B
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k


_CFG = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
            vocab_size=256, max_position_embeddings=64)


def _lora_model(seed):
    from megallama.config import ModelConfig
    from megallama.model import build_model
    from megallama.strategies import TrainingStrategy, apply_strategy
    m = build_model(ModelConfig(**_CFG), seed=seed)
    apply_strategy([m], TrainingStrategy("lora", {"lora_rank": 4, "target_modules": "all"}), seed=seed)
    return m


def _load_adapter_worker(rank, world, path):
    from megallama.model.lora import gather_lora_state_dict
    from megallama.mpu import parallel_state as ps
    from megallama.strategies import load_adapter
    ps.initialize_model_parallel(2, 1)
    m = _lora_model(seed=99)
    n = load_adapter(path, [m])
    return n, gather_lora_state_dict([m])


def test_adapter_saved_at_tp1_loads_into_tp2(tmp_path):
    """load_adapter splits each full PEFT tensor along its layer's tp dimension (lora_B of column-parallel
    layers, lora_A of row-parallel ones)."""
    from dist_utils import run_distributed
    from megallama.strategies import TrainingStrategy, save_adapter
    ref = _lora_model(seed=7)
    with torch.no_grad():
        for p in ref.parameters():
            if getattr(p, "lora", False):
                p.normal_()  # lora_B starts at zero: a zero adapter would load into any split
    want = {n: p.detach().clone() for n, p in ref.named_parameters() if getattr(p, "lora", False)}
    cfg = TrainingStrategy("lora", {"lora_rank": 4, "target_modules": "all"}).lora_config()
    save_adapter(str(tmp_path / "adapter"), [ref], None, lora_cfg=cfg, overwrite=False)
    for rank, (n, full) in run_distributed(_load_adapter_worker, 2, str(tmp_path / "adapter")).items():
        assert n == len(want) and sorted(full) == sorted(want), rank
        assert all(torch.equal(full[k], want[k]) for k in want), rank


def _pp_adapter_worker(rank, world, path):
    from megallama.config import ModelConfig
    from megallama.errors import ConfigError
    from megallama.model import build_model
    from megallama.mpu import parallel_state as ps
    from megallama.strategies import TrainingStrategy, apply_strategy, load_adapter
    ps.initialize_model_parallel(1, 2)
    stage = ps.get_pipeline_model_parallel_rank()
    m = build_model(ModelConfig(**_CFG), seed=5, layer_ids=[stage], pre_process=stage == 0, post_process=stage == 1)
    apply_strategy([m], TrainingStrategy("lora", {"lora_rank": 4, "target_modules": "all"}), seed=5)
    try:
        return load_adapter(path, [m])
    except ConfigError as e:
        return str(e)


def test_adapter_missing_tensors_is_refused_under_pipeline_parallel(tmp_path):
    """Each pp stage takes its own layers' tensors; the union over the stages must be the whole adapter (the
    per-rank count was not checked at pp > 1, so a partial load passed silently)."""
    from safetensors.torch import load_file, save_file
    from dist_utils import run_distributed
    from megallama.strategies import TrainingStrategy, save_adapter
    cfg = TrainingStrategy("lora", {"lora_rank": 4, "target_modules": "all"}).lora_config()
    save_adapter(str(tmp_path / "whole"), [_lora_model(seed=7)], None, lora_cfg=cfg, overwrite=False)
    got = run_distributed(_pp_adapter_worker, 2, str(tmp_path / "whole"))
    assert got[0] + got[1] == 2 * 7 * 2, got  # 2 layers x 7 modules x (A, B), one layer per stage
    part = tmp_path / "part"
    part.mkdir()
    for name in os.listdir(tmp_path / "whole"):
        (part / name).write_bytes((tmp_path / "whole" / name).read_bytes())
    whole = load_file(str(part / "adapter_model.safetensors"))
    missing = dict(whole)
    del missing[sorted(k for k in whole if "layers.1." in k)[0]]  # one of stage 1's tensors gone
    stray = dict(whole, **{"base_model.model.model.layers.7.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)})
    for tensors, took in ((missing, "27 adapter tensors, this model has 28 and took 27"),
                          (stray, "29 adapter tensors, this model has 28 and took 28")):
        save_file(tensors, str(part / "adapter_model.safetensors"))
        got = run_distributed(_pp_adapter_worker, 2, str(part))
        assert all(isinstance(v, str) and took in v for v in got.values()), got
