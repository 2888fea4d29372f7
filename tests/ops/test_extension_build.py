"""The JIT build's cache folder, locks and lines, with torch's compiler replaced by a fake: no test here compiles.

A build killed mid-way left torch's ``lock`` behind and every later run waited on it forever, silently; two
environments with one torch version shared a folder; MEGALLAMA_FUSED_KERNELS=0 was turned back on by training.
"""
import os
import queue
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from megallama.ops import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torch's load() as far as locking goes: take the FileBaton or wait on it, as torch.utils.cpp_extension does
FAKE = """
    import os, sys, time
    import torch.utils.cpp_extension as ce
    from torch.utils.file_baton import FileBaton

    def fake_load(name, sources, build_directory=None, **kw):
        d = build_directory or ce._get_build_directory(name, False)
        baton = FileBaton(os.path.join(d, "lock"))
        if baton.try_acquire():
            print("BUILDING", d, flush=True)
            if os.environ.get("FAKE_HANG"):
                time.sleep(600)  # killed here: the lock stays behind
            open(os.path.join(d, name + ".so"), "w").close()
            baton.release()
        else:
            baton.wait()

    ce.load = fake_load
    from megallama.ops import _extension
    _extension._jit_build()
    print("DONE", flush=True)
"""


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in (_extension._LIB_ENV, "RANK")}
    env.update(PYTHONPATH=ROOT, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), **extra)
    return env


def _start(tmp_path, **extra):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(FAKE)], env=_env(tmp_path, **extra), cwd="/",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc, marker, timeout=120):
    """The process's output up to the line holding ``marker`` (fails on exit or timeout without it)."""
    if not hasattr(proc, "lines"):  # a reader thread: a select() on the pipe misses lines already buffered
        proc.lines = queue.Queue()
        threading.Thread(target=lambda: [proc.lines.put(x) for x in proc.stdout], daemon=True).start()
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            line = proc.lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None and proc.lines.empty():
                break
            continue
        lines.append(line)
        if marker in line:
            return lines
    pytest.fail(f"no {marker!r} line: {''.join(lines)[-3000:]}")


def _killed_build(tmp_path):
    """A build SIGKILLed while torch held its lock (Ctrl-C under a launcher, the OOM killer): its folder."""
    proc = _start(tmp_path, FAKE_HANG="1")
    try:
        build_dir = _read_until(proc, "BUILDING")[-1].split(None, 1)[1].strip()
    finally:
        proc.kill()
        proc.wait()
    assert os.path.exists(os.path.join(build_dir, "lock"))
    return build_dir


def test_stale_lock_is_removed_in_one_line_and_the_build_goes_on(tmp_path):
    build_dir = _killed_build(tmp_path)
    lock = os.path.join(build_dir, "lock")
    try:
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(FAKE)], env=_env(tmp_path), cwd="/",
                             capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the build waited on the stale {lock} (a killed build's) instead of removing it")
    assert out.returncode == 0, out.stderr[-3000:]
    said = [line for line in out.stdout.splitlines() if lock in line]
    assert len(said) == 1 and "stale" in said[0], out.stdout
    assert "DONE" in out.stdout and not os.path.exists(lock)
    compiling = [line for line in out.stdout.splitlines() if "compiling fused kernels for this environment" in line]
    assert len(compiling) == 1 and build_dir in compiling[0] and "--no-fused-kernels skips them" in compiling[0]
    assert "fused kernels compiled in" in out.stdout, out.stdout
    again = subprocess.run([sys.executable, "-c", textwrap.dedent(FAKE)], env=_env(tmp_path), cwd="/",
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "DONE" in again.stdout, again.stderr[-3000:]
    assert "megallama:" not in again.stdout, again.stdout  # built: nothing to compile, no lock to say


def test_live_build_is_waited_for_in_one_line_and_its_lock_kept(tmp_path):
    builder = _start(tmp_path, FAKE_HANG="1")
    waiter = None
    try:
        build_dir = _read_until(builder, "BUILDING")[-1].split(None, 1)[1].strip()
        waiter = _start(tmp_path)
        line = _read_until(waiter, "waiting for the fused-kernel build")[-1]
        assert f"pid {builder.pid}" in line, line
        time.sleep(1)
        assert waiter.poll() is None and os.path.exists(os.path.join(build_dir, "lock"))
    finally:
        for proc in (waiter, builder):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_cache_name_depends_on_the_environment(monkeypatch):
    name = _extension.jit_name()
    assert name.startswith("megallama_C_") and name == _extension.jit_name()
    monkeypatch.setattr(sys, "prefix", "/opt/venvs/other")
    assert _extension.jit_name() != name


def test_env_switch_off_wins_over_training(tmp_path):
    """MEGALLAMA_FUSED_KERNELS=0: a training step neither loads nor builds the kernels (training's
    set_fused_kernels(not --no-fused-kernels) turned them back on)."""
    code = """
        import sys
        from megallama.arguments import parse_args
        from megallama.training import pretrain
        from megallama.ops import _extension
        pretrain(parse_args(["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "64",
                             "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups", "2",
                             "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "1",
                             "--mock-data", "--vocab-size", "256", "--train-iters", "1", "--no-progress-bar",
                             "--device", "cpu"], world_size=1))
        print("LOADED", _extension._state["loaded"], "megallama._C" in sys.modules)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=tmp_path,
                         env=_env(tmp_path, MEGALLAMA_FUSED_KERNELS="0", MEGALLAMA_JIT="0"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED None False" in out.stdout, out.stdout[-2000:]


def test_model_build_loads_the_kernels_before_iteration_1(monkeypatch):
    """A first run's JIT build belongs to setup, not to iteration 1's time (297 s charged to it on 2 cores)."""
    import megallama.training_setup as ts
    from megallama.arguments import parse_args

    calls = []
    monkeypatch.delenv("MEGALLAMA_FUSED_KERNELS", raising=False)
    monkeypatch.setattr(ts, "load_fused_kernels", lambda: calls.append("load"))
    before = _extension.fused_kernels_enabled()
    args = parse_args(["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size",
                       "128", "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "16",
                       "--micro-batch-size", "1", "--global-batch-size", "1", "--mock-data", "--vocab-size", "256",
                       "--device", "cpu"], world_size=1)
    try:
        ts.build_model_chunks(args, "cpu")
        assert calls == ["load"]
        calls.clear()
        args.no_fused_kernels = True
        ts.build_model_chunks(args, "cpu")
        assert calls == []
    finally:
        _extension.set_fused_kernels(before)
