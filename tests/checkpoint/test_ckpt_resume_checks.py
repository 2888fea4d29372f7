"""What a run does with the directories it is given: ``--load X --save X`` auto-resumes (X may not exist yet), a
resume keeps the checkpoint's LR schedule or is told which to use, a finetune starts a fresh schedule, and a save
removes the ``iter_*.tmp`` of saves killed mid-write. (Refusals are in test_ckpt_bad_inputs' table.)"""
import os

import pytest

from megallama.arguments import parse_args
from megallama.checkpointing.files import remove_stale_tmp
from megallama.errors import ConfigError
from megallama.lr_scheduler import OptimizerParamScheduler, settings_from_args
from megallama.training import pretrain

from ckpt_helpers import TINY, corpus

BASE = TINY + ["--micro-batch-size", "2", "--global-batch-size", "4"]


def _run(argv):
    return pretrain(parse_args(BASE + argv, world_size=1))


def test_load_and_save_the_same_dir_resumes_and_may_start_empty(tmp_path):
    ck = str(tmp_path / "run")  # not there on the first launch
    flags = ["--train-iters", "4", "--load", ck, "--save", ck, "--save-interval", "2"]
    first = _run(flags + ["--exit-interval", "2"])
    assert sorted(first["losses"]) == [1, 2]
    again = _run(flags)  # the same command line again continues the run
    assert sorted(again["losses"]) == [3, 4]
    assert open(os.path.join(ck, "latest_checkpointed_iteration.txt")).read() == "4"
    assert sorted(os.listdir(ck)) == ["iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]


@pytest.fixture(scope="module")
def run_of_6(tmp_path_factory):
    """A 6-iteration run's losses, and its checkpoint at iteration 3 (an --exit-interval stop)."""
    ck = str(tmp_path_factory.mktemp("sched") / "ck")
    full = _run(["--train-iters", "6"])["losses"]
    _run(["--train-iters", "6", "--exit-interval", "3", "--save", ck, "--save-interval", "3"])
    return full, ck


def test_use_checkpoint_scheduler_keeps_the_saved_schedule(run_of_6):
    full, ck = run_of_6
    kept = _run(["--train-iters", "8", "--load", ck, "--use-checkpoint-opt-param-scheduler"])["losses"]
    assert sorted(kept) == list(range(4, 9))
    for step in (4, 5, 6):  # the same LR as the run that was never stopped: bit for bit
        assert kept[step] == full[step], step


def test_override_scheduler_uses_this_runs_schedule(run_of_6):
    full, ck = run_of_6
    new = _run(["--train-iters", "8", "--load", ck, "--override-opt_param-scheduler"])["losses"]  # Megatron spelling
    assert sorted(new) == list(range(4, 9)) and new[5] != full[5]  # decay over 8: step 4 updates with another LR


def test_finetune_starts_a_fresh_schedule_unchecked(run_of_6):
    _, ck = run_of_6
    out = _run(["--train-iters", "2", "--lr", "1e-3", "--load", ck, "--finetune"])
    assert sorted(out["losses"]) == [1, 2]


def test_scheduler_check_names_each_setting_and_both_flags():
    s = OptimizerParamScheduler(None, 1e-3, 1e-4, 10, 100, "cosine")
    saved = dict(s.state_dict(), max_lr=2e-3, decay_style="linear")
    with pytest.raises(ConfigError) as e:
        s.load_state_dict(saved)
    msg = str(e.value)
    assert "--lr 0.002 in the checkpoint, 0.001 now" in msg and "--lr-decay-style linear in the checkpoint" in msg
    assert "--override-opt-param-scheduler" in msg and "--use-checkpoint-opt-param-scheduler" in msg
    s.load_state_dict(saved, override=True)
    assert (s.max_lr, s.decay_style) == (1e-3, "cosine")
    s.load_state_dict(saved, use_checkpoint=True)
    assert (s.max_lr, s.decay_style) == (2e-3, "linear")
    s.load_state_dict(None)  # a converted checkpoint holds no schedule: nothing to check
    # checkpoints from before the scheduler was saved: the schedule their args resolve to
    assert settings_from_args({"lr": 1e-3, "min_lr": 1e-4, "train_iters": 50, "lr_warmup_iters": None,
                               "lr_decay_iters": None, "lr_decay_style": "cosine"}) == \
        dict(max_lr=1e-3, min_lr=1e-4, init_lr=0.0, warmup_iters=5, decay_iters=50, decay_style="cosine",
             wsd_decay_iters=None, wsd_decay_style="exponential", start_wd=None, end_wd=None, wd_incr_iters=None,
             wd_incr_style="constant", decoupled_lr=None, decoupled_min_lr=None)
    assert settings_from_args({"model_config": {}}) is None


def test_save_removes_tmp_dirs_of_killed_saves(tmp_path):
    ck = str(tmp_path / "ck")
    _run(["--train-iters", "4", "--exit-interval", "2", "--save", ck, "--save-interval", "2"])
    for it in (3, 7):  # what kill -9 mid-save leaves: a half-written iter_N.tmp (7: of a longer, dead run)
        os.makedirs(os.path.join(ck, f"iter_{it:07d}.tmp"))
        open(os.path.join(ck, f"iter_{it:07d}.tmp", "rank_00000.pt"), "wb").write(b"partial")
    _run(["--train-iters", "4", "--load", ck, "--save", ck, "--save-interval", "1"])
    assert sorted(os.listdir(ck)) == ["iter_0000002", "iter_0000003", "iter_0000004",
                                      "latest_checkpointed_iteration.txt"]


def test_stale_tmp_cleanup_spares_the_save_in_progress(tmp_path):
    for name in ("iter_0000001.tmp", "iter_0000002.tmp", "iter_0000002", "iter_0000003.old"):
        os.makedirs(tmp_path / name)
    assert remove_stale_tmp(str(tmp_path), keep=str(tmp_path / "iter_0000002.tmp")) == ["iter_0000001.tmp"]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000002.tmp", "iter_0000003.old"]


def test_finetune_script_refuses_a_save_dir_holding_a_run_unless_it_resumes_it(tmp_path):
    import finetune_llama
    ck, pre = str(tmp_path / "sft"), str(tmp_path / "pre")
    _run(["--train-iters", "1", "--save", ck])
    _run(["--train-iters", "1", "--save", pre])
    sft = BASE + ["--train-iters", "2", "--pretrained-checkpoint", pre, "--save", ck]
    with pytest.raises(ConfigError, match=f"{ck} already holds a run at iteration 1; pass --load {ck}"):
        finetune_llama.prepare_finetune_args(parse_args(sft, world_size=1))
    with pytest.raises(ConfigError, match="already holds a run"):  # --finetune --load X means pretrained X
        finetune_llama.prepare_finetune_args(parse_args(BASE + ["--finetune", "--load", ck, "--save", ck],
                                                        world_size=1))
    args = finetune_llama.prepare_finetune_args(parse_args(sft + ["--load", ck], world_size=1))
    assert args.load == ck and args.pretrained_checkpoint == pre


def test_ckpt_step_loads_that_iteration_and_never_overwrites_later_ones(tmp_path):
    """Megatron's --ckpt-step picks an older iteration of the --load run. Saving the resumed run into the same
    directory would write over the later checkpoints: refused in one line (so is --load of an older iter_* there);
    into another directory it trains on from that iteration."""
    ck, other = str(tmp_path / "run"), str(tmp_path / "other")
    full = _run(["--train-iters", "4", "--save", ck, "--save-interval", "2"])["losses"]
    before = sorted(os.listdir(ck))
    for flags in (["--load", ck, "--ckpt-step", "2"], ["--load", os.path.join(ck, "iter_0000002")]):
        with pytest.raises(ConfigError, match="would overwrite its later checkpoints \\(iteration 4\\)"):
            _run(["--train-iters", "4", "--save", ck] + flags)
    assert sorted(os.listdir(ck)) == before
    resumed = _run(["--train-iters", "4", "--load", ck, "--ckpt-step", "2", "--save", other])["losses"]
    assert resumed == {3: full[3], 4: full[4]}
    for save in ([], ["--save", ck]):  # also where --save holds later iterations: the missing one is the news
        with pytest.raises(ConfigError, match="--ckpt-step 3: .* has no iteration 3 \\(it has 2, 4\\)"):
            _run(["--train-iters", "4", "--load", ck, "--ckpt-step", "3"] + save)
    with pytest.raises(ConfigError, match="--ckpt-step 2 picks an iteration of the --load run; give --load"):
        _run(["--train-iters", "4", "--ckpt-step", "2"])
