"""--wandb-project as Megatron's: wandb not installed is refused in one line naming ``pip install wandb`` (a long run
would otherwise log nowhere); with wandb (here a stand-in module recording its calls: no network, no package) the
run is named by --wandb-exp-name, lives in --wandb-save-dir (else Megatron's <--save>/wandb), and gets the same
scalars as TensorBoard under Megatron's names; a wandb (or TensorBoard folder) that does not start on the last rank
stops every rank with the same one line, none left waiting; a wandb.log failing mid-run is one warning, and the run
goes on."""
import importlib.util
import sys
import types

import pytest

from dist_utils import run_distributed
from test_tensorboard import _events, _run, write_corpus


class _FakeWandb(types.ModuleType):
    def __init__(self, fail=None, log_fails_at=None):
        super().__init__("wandb")
        self.__spec__ = importlib.util.spec_from_loader("wandb", loader=None)
        self.fail, self.inits, self.logged, self.finished = fail, [], {}, False
        self.log_fails_at = log_fails_at  # (step, exception): wandb.log raising mid-run

    def init(self, **kw):
        if self.fail:
            raise self.fail
        self.inits.append(kw)
        return self

    def log(self, values, step=None):
        if self.log_fails_at and step >= self.log_fails_at[0]:
            raise self.log_fails_at[1]
        for k, v in values.items():
            self.logged.setdefault(k, []).append((step, v))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    def install(fail=None, log_fails_at=None):
        mod = _FakeWandb(fail, log_fails_at)
        monkeypatch.setitem(sys.modules, "wandb", mod)
        return mod
    return install


def test_missing_wandb_is_one_clear_error(tmp_path, monkeypatch):
    from megallama.errors import ConfigError
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec None, import fails: as when it is not installed
    with pytest.raises(ConfigError, match=r"needs wandb, which is not installed: pip install wandb"):
        _run(tmp_path / "tb", ["--wandb-project", "proj"])
    assert not (tmp_path / "tb").exists()  # refused before anything was written


def test_wandb_run_mirrors_tensorboard_under_megatrons_names(tmp_path, fake_wandb):
    wandb = fake_wandb()
    _run(tmp_path / "tb", ["--wandb-project", "proj", "--wandb-exp-name", "exp1", "--wandb-save-dir",
                           str(tmp_path / "wb")])
    (kw,) = wandb.inits
    assert (kw["project"], kw["name"], kw["dir"]) == ("proj", "exp1", str(tmp_path / "wb"))
    assert (tmp_path / "wb").is_dir() and kw["config"]["train_iters"] == 6 and wandb.finished
    ev = _events(tmp_path / "tb")
    for tag in ("lm loss", "learning-rate", "grad-norm", "params-norm", "lm loss validation", "iteration-time"):
        assert wandb.logged[tag] == [(s, pytest.approx(v, rel=1e-6)) for s, v in ev[tag]], tag
    assert not [k for k in wandb.logged if k.endswith(" vs samples")]  # W&B has its own x axes


def test_wandb_dir_defaults_to_megatrons_save_wandb(tmp_path, fake_wandb):
    wandb = fake_wandb()
    _run(tmp_path / "tb", ["--wandb-project", "proj", "--save", str(tmp_path / "ckpt"), "--eval-interval", "0"])
    assert wandb.inits[0]["dir"] == str(tmp_path / "ckpt" / "wandb")


def test_wandb_that_does_not_start_stops_with_one_line(tmp_path, fake_wandb):
    from megallama.errors import ConfigError
    fake_wandb(fail=RuntimeError("Network error (ConnectionError), entering retry loop.\nmore detail"))
    with pytest.raises(ConfigError) as e:
        _run(tmp_path / "tb", ["--wandb-project", "proj"])
    assert "\n" not in str(e.value) and "wandb did not start (Network error" in str(e.value)
    assert "WANDB_MODE=offline" in str(e.value)


def _last_rank_cannot_start(rank, world, folder, flags):
    """pp 2: the writer (rank 1) fails to start; each rank's ConfigError, or what it trained."""
    from megallama.errors import ConfigError
    sys.modules["wandb"] = _FakeWandb(fail=RuntimeError("401 Unauthorized: invalid API key\nretrying"))
    try:
        return "trained", _run(folder, ["--pipeline-model-parallel-size", "2", *flags], world=world)["iteration"]
    except ConfigError as e:
        return "error", str(e)


@pytest.mark.parametrize("writer", ["wandb", "tensorboard"])
def test_a_writer_failing_on_the_last_rank_stops_every_rank_with_one_line(tmp_path, writer):
    """Only the last rank starts the writers. It raised alone, and the other ranks waited in the first step's
    pipeline send for a rank that had gone (a gloo error here; with NCCL, a hang to the collective timeout)."""
    write_corpus(tmp_path / "tb")
    flags = ["--wandb-project", "proj", "--wandb-save-dir", str(tmp_path / "wb")] if writer == "wandb" else \
        ["--tensorboard-dir", str(tmp_path / "corpus.jsonl" / "tb")]  # a folder below a file: cannot be made
    out = run_distributed(_last_rank_cannot_start, 2, str(tmp_path / "tb"), flags, timeout=120)
    (k0, says0), (k1, says1) = out[0], out[1]
    assert k0 == k1 == "error" and says0 == says1 and "\n" not in says0, out
    if writer == "wandb":
        assert says0.startswith("wandb did not start (401 Unauthorized: invalid API key); fix it, set "
                                "WANDB_MODE=offline"), says0
    else:
        assert says0.startswith(f"--tensorboard-dir {tmp_path / 'corpus.jsonl' / 'tb'}: cannot write the events "
                                "there ("), says0


def test_wandb_log_failing_mid_run_is_one_warning_and_the_run_goes_on(tmp_path, fake_wandb, capsys):
    """wandb.log raising at step 4 (a full disk under WANDB_MODE=offline, a dead service process) stopped the last
    rank alone; now the run ends as without W&B, its TensorBoard complete."""
    wandb = fake_wandb(log_fails_at=(4, OSError("[Errno 28] No space left on device\ntraceback...")))
    out = _run(tmp_path / "tb", ["--wandb-project", "proj", "--eval-interval", "0"])
    assert out["iteration"] == 6 and sorted(out["losses"]) == [1, 2, 3, 4, 5, 6]
    err = [ln for ln in capsys.readouterr().err.splitlines() if "W&B" in ln]
    assert err == ["warning: wandb log failed ([Errno 28] No space left on device); training goes on without W&B "
                   "(TensorBoard is still written)"], err
    assert [s for s, _ in wandb.logged["lm loss"]] == [1, 2, 3] and not wandb.finished
    assert [s for s, _ in _events(tmp_path / "tb")["lm loss"]] == [1, 2, 3, 4, 5, 6]
