"""A checkpoint loads only into the model it holds: a LoRA/MoE run's tensors the model has no place for, a resume
that changes the strategy's settings, an HF folder or a file given to --load, and --finetune with nothing to
fine-tune from are each one error line that names the fix, with nothing on disk changed; the legitimate starts
(same strategy, --finetune with new settings, a dense base under --pretrained-checkpoint) still run."""
import shutil

import pytest
import torch

import pretrain_llama
from ckpt_helpers import TINY, snapshot

BASE = TINY + ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4"]
LORA = ["--strategy", "lora", "--lora-rank", "4"]
MOE = ["--strategy", "moe", "--num-experts", "4", "--moe-router-topk", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Iteration 2 of a dense, a LoRA (alpha defaults to 2 x rank = 8) and a MoE run."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, flags in (("dense", []), ("lora", LORA), ("moe", MOE)):
        out[name] = str(root / name)
        assert pretrain_llama.main(BASE + flags + ["--exit-interval", "2", "--save", out[name],
                                                   "--save-interval", "2"]) == 0
    return out


def _one_error(argv, tmp_path, capsys, *roots):
    before = snapshot(*roots, str(tmp_path))
    capsys.readouterr()
    code = pretrain_llama.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert snapshot(*roots, str(tmp_path)) == before, "a file on disk was changed"
    return lines[0]


# ------------------------------------------------------------------ (3) tensors the model has no place for
@pytest.mark.parametrize("extra", [[], ["--no-load-optim"], ["--finetune"]])
def test_lora_checkpoint_without_its_strategy_is_refused(runs, tmp_path, capsys, extra):
    """Was: a raw KeyError (optimizer state), or with --no-load-optim / --finetune training on without the
    adapters."""
    line = _one_error(BASE + ["--load", runs["lora"]] + extra, tmp_path, capsys, runs["lora"])
    assert "model tensors this model has no place for" in line and ".lora_A.weight" in line, line
    assert "--strategy lora --lora-rank 4" in line, line


def test_lora_run_as_pretrained_checkpoint_names_the_merge(runs, tmp_path, capsys):
    """--pretrained-checkpoint loads into the dense model before adapters exist: its adapters would be dropped."""
    line = _one_error(BASE + LORA + ["--pretrained-checkpoint", runs["lora"]], tmp_path, capsys, runs["lora"])
    assert "would drop its LoRA adapters" in line and "megallama-to-hf" in line, line


def test_optimizer_state_missing_is_a_config_error():
    """Was: KeyError('optimizer/exp_avg/...') from a ZeRO optimizer's load."""
    from megallama.checkpointing.optimizer_state import load_optimizer_states
    from megallama.errors import ConfigError

    class Zero:
        def gather_full_state_dict(self):
            pass

        def state_dict(self):
            return {"zero_stage": [1], "step": 3,
                    "pieces": {"0/weight": {"start": 0, "end": 8, "numel": 8, "shape": [2, 4]}}}

    with pytest.raises(ConfigError, match="no optimizer state optimizer/master/weight.*--no-load-optim"):
        load_optimizer_states(Zero(), [torch.nn.Linear(4, 2, bias=False)], lambda *a: False, {"step": 3},
                              ["exp_avg"])


# ------------------------------------------------------------------ (4) a resume keeps the strategy's settings
@pytest.mark.parametrize("run,flags,needle", [
    ("lora", LORA + ["--lora-alpha", "32"], "--lora-alpha 8, this run has 32: resuming would change the model; "
                                            "pass --lora-alpha 8"),
    ("lora", LORA + ["--lora-target-modules", "q_proj"], "--lora-target-modules k_proj,o_proj,q_proj,v_proj"),
    ("lora", ["--strategy", "lora", "--lora-rank", "8"], "--lora-rank 4, this run has 8"),
    ("moe", ["--strategy", "moe", "--num-experts", "4", "--moe-router-topk", "1"], "--moe-router-topk 2, this run"),
    ("moe", MOE + ["--moe-capacity-factor", "1.5"], "--moe-capacity-factor (unset), this run has 1.5"),
    ("moe", MOE + ["--moe-shared-expert-intermediate-size", "32"],
     "--moe-shared-expert-intermediate-size (unset), this run has 32"),
])
def test_resume_with_other_strategy_settings_is_refused(runs, tmp_path, capsys, run, flags, needle):
    line = _one_error(BASE + flags + ["--load", runs[run]], tmp_path, capsys, runs[run])
    assert needle in line and "--finetune" in line, line


def test_same_strategy_resumes_and_finetune_may_change_settings(runs, tmp_path, capsys):
    for run, flags in (("lora", LORA), ("moe", MOE)):
        ck = str(tmp_path / run)
        shutil.copytree(runs[run], ck)
        assert pretrain_llama.main(BASE + flags + ["--load", ck, "--save", ck]) == 0
    assert pretrain_llama.main(BASE + LORA + ["--lora-alpha", "32", "--load", runs["lora"], "--finetune",
                                              "--train-iters", "1"]) == 0
    # a training-only knob is a warning, not a refusal
    capsys.readouterr()
    assert pretrain_llama.main(BASE + MOE + ["--moe-aux-loss-coeff", "0.1", "--load", runs["moe"]]) == 0
    assert "--moe-aux-loss-coeff 0.01, this run has 0.1" in capsys.readouterr().err


def test_dense_base_still_starts_lora_and_moe_runs(runs):
    for flags in (LORA, MOE):
        assert pretrain_llama.main(BASE + flags + ["--pretrained-checkpoint", runs["dense"],
                                                   "--train-iters", "1"]) == 0


# ------------------------------------------------------------------ (7), (8) what --load may name
@pytest.mark.parametrize("kind", ["torch", "torch_dist"])
def test_a_megatron_checkpoint_given_to_load_is_named(tmp_path, capsys, kind):
    """Megatron names its iterations as we do; its layouts read as an "incomplete save" to "restore" before."""
    run = tmp_path / "megatron"
    it = run / "iter_0000010"
    if kind == "torch":
        (it / "mp_rank_00").mkdir(parents=True)
        torch.save({"iteration": 10}, str(it / "mp_rank_00" / "model_optim_rng.pt"))
    else:
        it.mkdir(parents=True)
        torch.save({"iteration": 10}, str(it / "common.pt"))
        (it / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
        (it / "__0_0.distcp").write_bytes(b"x" * 100)
    (run / "latest_checkpointed_iteration.txt").write_text("10")
    for load in (run, it):
        line = _one_error(BASE + ["--load", str(load)], tmp_path, capsys, run)
        assert f"is a Megatron-LM checkpoint (--ckpt-format {kind})" in line and "hf-to-megallama" in line, line


def test_hf_folder_given_to_load_is_refused(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    line = _one_error(BASE + ["--load", str(hf)], tmp_path, capsys)
    assert "is an HF model folder" in line and "hf-to-megallama" in line and "--pretrained-checkpoint" in line, line


def test_finetune_with_no_checkpoint_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = _one_error(BASE + ["--load", str(empty), "--finetune"], tmp_path, capsys)
    assert "no checkpoint in" in line and "to fine-tune from" in line, line


def test_load_naming_a_file_says_so(runs, tmp_path, capsys):
    common = f"{runs['dense']}/iter_0000002/common.pt"
    line = _one_error(BASE + ["--load", common], tmp_path, capsys)
    assert "is a file; pass the checkpoint directory" in line and "iter_0000002" in line, line


def test_no_load_optim_on_a_layout_change_says_only_the_weights_were_resharded(runs, monkeypatch, capsys):
    from megallama.checkpointing import save_load
    real = save_load.current_layout
    monkeypatch.setattr(save_load, "current_layout", lambda: dict(real(), dp=2))  # as if the layout changed
    capsys.readouterr()
    assert pretrain_llama.main(BASE + ["--load", runs["dense"], "--no-load-optim"]) == 0
    out = capsys.readouterr().out
    assert "the optimizer starts afresh" in out and ": weights resharded;" in out, out
    assert "weights and optimizer resharded" not in out
