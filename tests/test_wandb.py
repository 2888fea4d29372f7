"""--wandb-project as Megatron's: wandb not installed is refused in one line naming ``pip install wandb`` (a long run
would otherwise log nowhere); with wandb (here a stand-in module recording its calls: no network, no package) the
run is named by --wandb-exp-name, lives in --wandb-save-dir (else Megatron's <--save>/wandb), and gets the same
scalars as TensorBoard under Megatron's names; a wandb that does not start stops the run with one line."""
import importlib.util
import sys
import types

import pytest

from test_tensorboard import _events, _run


class _FakeWandb(types.ModuleType):
    def __init__(self, fail=None):
        super().__init__("wandb")
        self.__spec__ = importlib.util.spec_from_loader("wandb", loader=None)
        self.fail, self.inits, self.logged, self.finished = fail, [], {}, False

    def init(self, **kw):
        if self.fail:
            raise self.fail
        self.inits.append(kw)
        return self

    def log(self, values, step=None):
        for k, v in values.items():
            self.logged.setdefault(k, []).append((step, v))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    def install(fail=None):
        mod = _FakeWandb(fail)
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
