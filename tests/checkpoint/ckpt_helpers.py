"""Shared by the checkpoint tests: a tiny model's flags, in-process and torchrun launches, exact loss logs,
directory snapshots (to prove that nothing on disk changed)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "pretrain_llama.py")
# 2 layers, hidden 64, vocabulary 512, random-token data: a few ms per step. Reference ops:
# a run must not switch numerics because a fused-kernel build finished in between (bit-exact comparisons).
TINY = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--seq-length", "32", "--vocab-size", "512", "--lr", "3e-3", "--lr-warmup-iters", "1",
        "--no-progress-bar", "--device", "cpu", "--mock-data", "--no-fused-kernels"]


def corpus(path, n=60):
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo plums".split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(40))}) + "\n")
    return str(path)


def env():
    e = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    e.pop("WORLD_SIZE", None)
    return e


def command(argv, nproc=1):
    if nproc == 1:
        return [sys.executable, SCRIPT] + list(argv)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            SCRIPT] + list(argv)


def run(argv, nproc=1, cwd=None, timeout=300):
    """Run pretrain_llama.py (under torchrun for nproc > 1); returns the CompletedProcess."""
    return subprocess.run(command(argv, nproc), capture_output=True, text=True, env=env(), cwd=cwd, timeout=timeout)


def start(argv, nproc=1, cwd=None, log=None):
    """Start a run in its own process group (so the launcher and every rank can be killed together)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(command(argv, nproc), stdout=out, stderr=subprocess.STDOUT, env=env(), cwd=cwd,
                            start_new_session=True)


def _children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                kids.append(int(d))
    return kids


def kill_tree(proc, sig=signal.SIGKILL):
    """Signal a started run and all its descendants (torchrun puts its ranks in sessions of their own)."""
    seen, todo = [], [proc.pid]
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += _children(pid)
    for pid in seen:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    proc.wait()


def wait_for_steps(loss_log, n, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if len(losses(loss_log)) >= n:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError(f"{loss_log} did not reach {n} steps")


def losses(path):
    """{iteration: exact loss text} from a --loss-log file (the last entry wins for a repeated iteration)."""
    out = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and line.endswith("\n"):
                out[int(parts[0])] = parts[1]
    return out


def snapshot(*roots):
    """{path: sha256} of every file under the roots: equal snapshots mean nothing was written, moved or lost."""
    snap = {}
    for root in roots:
        if os.path.isfile(root):
            snap[root] = hashlib.sha256(open(root, "rb").read()).hexdigest()
            continue
        for d, _, files in os.walk(root):
            for name in files:
                p = os.path.join(d, name)
                snap[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return snap


def ok(r):
    """A finished run that must have succeeded: its output tails on failure."""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def close(got, ref, steps, tol):
    """{step: loss} logs: the same steps, each loss within ``tol`` relative of the reference's."""
    assert sorted(got) == list(steps), sorted(got)
    for s in steps:
        a, b = float(got[s]), float(ref[s])
        assert abs(a - b) <= tol * abs(b), (s, a, b)
