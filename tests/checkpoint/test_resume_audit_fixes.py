"""A user audit of resume and loop behaviour against Megatron-LM: --no-load-optim loads no LR schedule (so it has
none to contradict: it starts afresh, as Megatron's), a --load that is not there says how to start from scratch,
--exit-interval and a checkpoint with nothing left to train say what happened (the latter saves into a new --save),
--exit-duration-in-mins does not print an elapsed time below its limit, a checkpoint of another shape names
--use-checkpoint-args, and an --eval-iters that evaluates nothing says so."""
import os
import re

import pytest

from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.training import pretrain

from ckpt_helpers import TINY, snapshot

BASE = TINY + ["--micro-batch-size", "2", "--global-batch-size", "4"]


def _run(argv):
    return pretrain(parse_args(BASE + argv, world_size=1))


def _lrs(out: str) -> dict:
    """iteration -> the learning rate its log line printed."""
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"iteration\s+(\d+)/\s*\d+ \|.*?learning rate: ([0-9.E+-]+)", out)}


@pytest.fixture(scope="module")
def ck3(tmp_path_factory):
    """A 6-iteration run stopped (and saved) at iteration 3."""
    ck = str(tmp_path_factory.mktemp("audit") / "ck")
    _run(["--train-iters", "6", "--exit-interval", "3", "--save", ck, "--save-interval", "3"])
    return ck


def test_no_load_optim_starts_a_fresh_schedule_as_megatron(ck3, tmp_path, capsys):
    """Was: refused ("resuming would change the LR schedule") though --no-load-optim loads no schedule."""
    _run(["--train-iters", "8"])
    fresh = _lrs(capsys.readouterr().out)
    ck = str(tmp_path / "ck")
    _run(["--train-iters", "8", "--load", ck3, "--no-load-optim", "--save", ck, "--save-interval", "5",
          "--exit-interval", "5"])
    out = capsys.readouterr().out
    assert "the optimizer starts afresh, and so does the LR schedule" in out, out
    resumed = _lrs(out)
    assert resumed[4] == fresh[1] and resumed[5] == fresh[2]  # Megatron's: the schedule from its first step
    _run(["--train-iters", "8", "--load", ck])  # a plain resume of that run goes on with its schedule
    again = _lrs(capsys.readouterr().out)
    assert again[6] == fresh[3] and again[8] == fresh[5]


def test_missing_load_dir_says_how_to_start_from_scratch(tmp_path):
    """Was: "--load directory ... does not exist; check the path" (and the --save directory made first)."""
    for extra in ([], ["--exit-on-missing-checkpoint"]):
        with pytest.raises(ConfigError, match="does not exist; check the path, or drop --load to train from scratch"):
            _run(["--train-iters", "1", "--load", str(tmp_path / "typo"), "--save", str(tmp_path / "new")] + extra)
    assert not os.path.exists(tmp_path / "new")  # refused before anything is written
    first = str(tmp_path / "first")  # Megatron's first launch of --save X --load X: from scratch
    assert sorted(_run(["--train-iters", "1", "--load", first, "--save", first])["losses"]) == [1]


def test_exit_interval_says_why_it_stopped(tmp_path, capsys):
    """Was: it stopped and saved without a word (--exit-duration-in-mins and SIGTERM say theirs)."""
    ck = str(tmp_path / "ck")
    _run(["--train-iters", "6", "--exit-interval", "2", "--save", ck])
    out = capsys.readouterr().out
    assert f"--exit-interval 2 reached: stopping at iteration 2, checkpoint {ck}/iter_0000002 saved" in out, out
    _run(["--train-iters", "6", "--exit-interval", "2"])
    assert "--exit-interval 2 reached: stopping at iteration 2 (no --save: nothing saved)" in capsys.readouterr().out


def test_nothing_to_train_saves_into_a_new_save_dir(tmp_path, capsys):
    """Was: "resumed ... at iteration 2", exit 0, nothing in the new --save (Megatron saves it at the end)."""
    ck, new = str(tmp_path / "ck"), str(tmp_path / "new")
    _run(["--train-iters", "2", "--save", ck])
    capsys.readouterr()
    _run(["--train-iters", "2", "--load", ck, "--save", new])
    out = capsys.readouterr().out
    assert "nothing to train: the checkpoint is at iteration 2, --train-iters is 2; checkpoint" in out, out
    assert sorted(os.listdir(new)) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    assert sorted(_run(["--train-iters", "3", "--load", new, "--override-opt-param-scheduler"])["losses"]) == [3]
    before = snapshot(ck)
    _run(["--train-iters", "2", "--load", ck, "--save", ck])  # already there: never written again
    assert "nothing to train: the checkpoint is at iteration 2, --train-iters is 2\n" in capsys.readouterr().out
    assert snapshot(ck) == before


def test_exit_duration_never_reads_below_its_limit(capsys):
    """Was: "--exit-duration-in-mins 0.01 reached after 0.0 minutes"."""
    from megallama.run_bounds import elapsed_text
    assert elapsed_text(0.61, 0.01) == "0.6 seconds" and elapsed_text(0.6004, 0.010006) == "0.6004 seconds"
    assert elapsed_text(92.5, 1.54) == "1.54 minutes" and elapsed_text(150, 2) == "2.5 minutes"
    _run(["--train-iters", "50", "--exit-duration-in-mins", "0.0001"])
    line = next(l for l in capsys.readouterr().out.splitlines() if "--exit-duration-in-mins" in l)
    took = float(re.search(r"reached after ([0-9.]+) seconds", line).group(1))
    assert took >= 0.006, line


def test_another_shape_names_use_checkpoint_args(ck3):
    """Was: "is for a different model (ck: num_layers=2, this run has 3)" — a folder name as the model name."""
    with pytest.raises(ConfigError) as e:
        _run(["--num-layers", "3", "--train-iters", "1", "--load", ck3, "--finetune"])
    msg = str(e.value)
    assert "(its num_layers=2, this run has 3); pass --use-checkpoint-args" in msg and "--num-layers 2" in msg, msg


def test_eval_iters_that_evaluates_nothing_says_so(capsys):
    """Was: silently no evaluation (megallama evaluates only with --eval-interval; Megatron's default is 1000)."""
    for extra, says in ((["--eval-iters", "3"], "warning: --eval-iters 3 without --eval-interval evaluates nothing"),
                        (["--eval-iters", "-1"], "warning: --eval-iters -1 evaluates nothing (below 1 is off, as in "
                                                 "Megatron")):
        parse_args(BASE + ["--train-iters", "1"] + extra, world_size=1)
        assert says in capsys.readouterr().err
    parse_args(BASE + ["--train-iters", "1", "--eval-iters", "3", "--eval-interval", "2"], world_size=1)
    assert "--eval-iters" not in capsys.readouterr().err  # it evaluates: nothing to say
