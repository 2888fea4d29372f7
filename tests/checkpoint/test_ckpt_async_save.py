"""--async-save: the checkpoint a background writer leaves equals a synchronous save of the same run bit for bit
(weights, optimizer states, RNG, data position; dp2 and ZeRO-3 over 2 gloo ranks) and resumes the run exactly; the
host snapshot is independent of the live tensors; a rank's write failure is the synchronous save's one error line on
every rank, the previous checkpoint staying the latest; a process killed before finalization leaves the previous
checkpoint the latest and loadable."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from ckpt_helpers import REPO, TINY, env
from dist_utils import run_distributed
from megallama.checkpointing import files as F
from megallama.checkpointing import open_checkpoint

BASE = TINY + ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "8"]
# arguments that differ between the compared runs by construction
_RUN_ONLY = {"save", "load", "async_save", "log_progress", "given_flags", "run_start_time", "save_interval"}


def _job(rank, world, base, tmp):
    import resource

    from megallama.arguments import parse_args
    from megallama.errors import ConfigError
    from megallama.training import pretrain

    def train(extra):
        return pretrain(parse_args(base + extra, world_size=world))["losses"]

    a, b = os.path.join(tmp, "async"), os.path.join(tmp, "sync")
    ref = train([])
    first = train(["--exit-interval", "3", "--save", a, "--save-interval", "2", "--async-save", "--log-progress"])
    train(["--exit-interval", "3", "--save", b, "--save-interval", "2"])
    resumed = train(["--exit-interval", "3", "--load", a, "--save", a, "--save-interval", "2", "--async-save",
                     "--log-progress"])
    # rank 0's writer fails (files above 64 KiB: its rank file is ~1 MB); the save of iteration 7 is refused on
    # every rank alike, asynchronous (when finalized) as synchronous
    errors = {}
    for mode in ("async", "sync"):
        if rank == 0:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
        try:
            train(["--load", a, "--save", a, "--save-interval", "7"] + (["--async-save"] if mode == "async" else []))
        except ConfigError as e:
            errors[mode] = str(e)
        finally:
            if rank == 0:
                resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    return ref, first, resumed, errors


def _checkpoint(path, world):
    _, common, reader = open_checkpoint(path)
    tensors = {n: reader.read(n) for n in common["index"]}
    files = [torch.load(os.path.join(path, f"rank_{r:05d}.pt"), weights_only=True) for r in range(world)]
    rest = {k: v for k, v in common.items() if k not in ("index", "args")}
    args = {k: v for k, v in common["args"].items() if k not in _RUN_ONLY}
    return tensors, [{k: v for k, v in f.items() if k != "tensors"} for f in files], rest, args


def _same(x, y):
    if torch.is_tensor(x):
        return torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same(u, v) for u, v in zip(x, y))
    return x == y


@pytest.mark.parametrize("layout", [[], ["--zero-stage", "3"]], ids=["dp2", "zero3_dp2"])
def test_async_save_equals_sync_resumes_exactly_and_fails_like_sync(tmp_path, layout):
    out = run_distributed(_job, 2, BASE + layout, str(tmp_path))
    a, b = str(tmp_path / "async"), str(tmp_path / "sync")
    for it in (2, 3):
        ta, fa, ra, xa = _checkpoint(F.checkpoint_dir(a, it), 2)
        tb, fb, rb, xb = _checkpoint(F.checkpoint_dir(b, it), 2)
        assert sorted(ta) == sorted(tb) and any(n.startswith("optimizer/") for n in ta)
        for n in ta:
            assert ta[n].dtype == tb[n].dtype and torch.equal(ta[n], tb[n]), (it, n)
        assert _same(fa, fb), it  # every rank's RNG states
        assert _same(ra, rb) and ra["consumed_samples"] == 4 * it, it  # data position, scheduler, optimizer scalars
        assert _same(xa, xb), it
    for rank, (ref, first, resumed, errors) in out.items():
        assert sorted(first) == [1, 2, 3] and sorted(resumed) == [4, 5, 6], (first, resumed)
        for step in range(1, 7):  # bit for bit
            assert {**first, **resumed}[step] == ref[step], (rank, step)
        line = errors.get("async")
        assert line == errors.get("sync") and "\n" not in line, errors
        assert line == (f"could not write checkpoint {a}/iter_0000007 (File too large); earlier checkpoints are kept "
                        "— free space or point --save at a writable disk"), line
    assert F.read_tracker(a) == 6 and F.list_iterations(a) == [2, 3, 4, 6], os.listdir(a)
    assert not [n for n in os.listdir(a) if n.endswith(".tmp")], os.listdir(a)
    assert F.quick_check(F.checkpoint_dir(a, 6)) is None
    progress = open(os.path.join(a, "progress.txt")).read().splitlines()
    assert [line.split("\t")[3] for line in progress if "Starting job" in line] == ["Starting job"] * 2  # rank 0 only
    assert all("\t# GPUs: 2\t" in line for line in progress)
    published = [line.split("\t", 4)[4] for line in progress if "\tSaved async checkpoint\t" in line]
    assert published == [f"Iteration: {i}" for i in (2, 3, 4, 6)], progress


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_snapshot_is_independent_of_the_live_tensors(tmp_path, device):
    """Weights and Adam moments changed after the save returned (before its writer even starts) are not what is
    written: the request holds its own host copies (on CUDA: pinned buffers filled by non-blocking copies, which
    the writer waits for while the changes queue behind them)."""
    from types import SimpleNamespace

    from megallama.checkpointing.async_save import finalize_async_save, start_writer
    from megallama.checkpointing.save_request import SaveRequest
    from megallama.config import ModelConfig
    from megallama.model import build_model

    cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                      vocab_size=256, max_position_embeddings=64)
    model = build_model(cfg, seed=3).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sum(p.square().sum() for p in model.parameters()).backward()
    opt.step()
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    moments = {f"optimizer/{k}/{n}": opt.state[p][k].clone() for n, p in params.items() for k in ("exp_avg",
                                                                                                  "exp_avg_sq")}
    ck = str(tmp_path / "ck")
    req = SaveRequest.begin(ck, 1, [model], opt, SimpleNamespace(model="custom", model_config=cfg), 4, pinned={})
    live = {t.untyped_storage().data_ptr() for p in params.values() for t in [p] + list(opt.state[p].values())}
    copies = req.payload["tensors"].values()
    assert not live & {t.untyped_storage().data_ptr() for t in copies}
    assert all(t.device.type == "cpu" and t.is_pinned() == (device == "cuda") for t in copies)
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
            for k in ("exp_avg", "exp_avg_sq"):
                opt.state[p][k].add_(1.0)
    start_writer(req)
    assert finalize_async_save() == F.checkpoint_dir(ck, 1)
    _, common, reader = open_checkpoint(ck)
    for n, t in {**before, **moments}.items():
        assert torch.equal(reader.read(n), t.cpu()), n
    assert F.read_tracker(ck) == 1


def test_killed_before_finalization_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL in iteration 5, after the async save of iteration 4 returned: the tracker still names 2, which loads,
    and the resumed run (which removes the unpublished iter_0000004.tmp) trains on exactly like an uninterrupted
    one."""
    from megallama.arguments import parse_args
    from megallama.training import pretrain

    argv = TINY + ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6"]
    ck = str(tmp_path / "ck")
    driver = ("import os, signal, sys\n"
              "import megallama.training as tr\n"
              "make, calls = tr.make_forward_step, [0]\n"
              "def kill_in_iteration_5(args, device):\n"
              "    step = make(args, device)\n"
              "    def forward_step(it, model):\n"
              "        calls[0] += 1\n"
              "        if calls[0] == 4 * args.num_microbatches + 1:\n"
              "            os.kill(os.getpid(), signal.SIGKILL)\n"
              "        return step(it, model)\n"
              "    return forward_step\n"
              "tr.make_forward_step = kill_in_iteration_5\n"
              "import pretrain_llama\n"
              "sys.exit(pretrain_llama.main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", driver] + argv + ["--save", ck, "--save-interval", "2", "--async-save"],
                       capture_output=True, text=True, env=env(), cwd=REPO, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stdout[-2000:] + r.stderr[-2000:]
    assert "scheduled an async checkpoint save at iteration       4" in r.stdout, r.stdout[-2000:]
    assert F.read_tracker(ck) == 2 and F.list_iterations(ck) == [2], os.listdir(ck)
    assert F.resolve_load_dir(ck)[0] == F.checkpoint_dir(ck, 2) and F.quick_check(F.checkpoint_dir(ck, 2)) is None
    ref = pretrain(parse_args(argv, world_size=1))["losses"]
    resumed = pretrain(parse_args(argv + ["--load", ck, "--save", ck, "--save-interval", "2", "--async-save"],
                                  world_size=1))["losses"]
    assert sorted(resumed) == [3, 4, 5, 6]
    for step in resumed:
        assert resumed[step] == ref[step], step
    assert F.read_tracker(ck) == 6 and sorted(os.listdir(ck)) == [
        "iter_0000002", "iter_0000004", "iter_0000006", "latest_checkpointed_iteration.txt"]


def test_saves_faster_than_the_writer_and_the_end_of_the_run_leave_nothing_behind(tmp_path, monkeypatch, capsys):
    """A save every iteration from a writer slower than an iteration (each save waits for the previous writer), the
    last one right at the end: every checkpoint is published, no writer thread outlives the run, and the pinned
    buffer pool (page-locked RAM on a GPU host) is emptied rather than kept for the life of the process."""
    import threading
    import time

    from megallama.arguments import parse_args
    from megallama.checkpointing import async_save
    from megallama.checkpointing import save_request
    from megallama.training import pretrain

    write = save_request.F.atomic_torch_save

    def slow_writer(obj, path):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.5)
        write(obj, path)

    monkeypatch.setattr(save_request.F, "atomic_torch_save", slow_writer)
    ck = str(tmp_path / "ck")
    async_save._PINNED["stale"] = torch.empty(4)  # what a CUDA run's snapshots leave (CPU runs pin nothing)
    pretrain(parse_args(TINY + ["--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "3",
                                "--save", ck, "--save-interval", "1", "--async-save"], world_size=1))
    assert capsys.readouterr().out.count("ms of it waiting for the previous save") >= 1  # 2 unless a step took 0.5 s
    assert F.read_tracker(ck) == 3 and F.list_iterations(ck) == [1, 2, 3]
    assert all(F.quick_check(F.checkpoint_dir(ck, i)) is None for i in (1, 2, 3))
    assert async_save.in_flight() is None and async_save._PINNED == {}
    assert not [t for t in threading.enumerate() if t.name.startswith("checkpoint-writer")]


def test_async_save_without_save_is_one_error_line(capsys):
    import pretrain_llama
    assert pretrain_llama.main(TINY + ["--async-save"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --async-save writes into the --save directory, but no --save was given; add --save DIR or "
                   "drop --async-save"], err



@pytest.mark.gpu
def test_async_save_on_a_gpu_publishes_checkpoints_that_resume(tmp_path):
    """One GPU, bf16, a save every iteration (each waits for the previous one's writer): every checkpoint is
    published whole, and the run resumes from the last. (GPU kernels are not bit-reproducible between runs; the
    snapshot itself is checked bit for bit by the cuda case above.)"""
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    ck = str(tmp_path / "ck")
    argv = TINY[:TINY.index("--device")] + ["--device", "cuda", "--mock-data", "--bf16", "--micro-batch-size", "2",
                                            "--global-batch-size", "4", "--save", ck, "--save-interval", "1",
                                            "--async-save"]
    pretrain(parse_args(argv + ["--train-iters", "6", "--exit-interval", "4"], world_size=1))
    from megallama.checkpointing import async_save
    assert async_save._PINNED == {}  # the run's page-locked buffers are released when it ends
    assert F.read_tracker(ck) == 4 and F.list_iterations(ck) == [1, 2, 3, 4]
    assert all(F.quick_check(F.checkpoint_dir(ck, i)) is None for i in (1, 2, 3, 4))
    out = pretrain(parse_args(argv + ["--train-iters", "6", "--load", ck], world_size=1))
    assert sorted(out["losses"]) == [5, 6] and F.read_tracker(ck) == 6
