"""The Llama model runs the fused ops by default and gives the reference ops' losses and gradients (fp32, 1e-5);
without a kernel library the ops fall back to the references with exactly one warning."""
import os
import subprocess
import sys
import textwrap

import torch
from kernel_checks import assert_close, require_kernels

from megallama.config import ModelConfig, RopeScaling
from megallama.model import build_model
from megallama.ops import _extension, set_fused_kernels

CFG = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
                  vocab_size=256, max_position_embeddings=64,
                  rope_scaling=RopeScaling(original_max_position_embeddings=16))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _loss_and_grads(fused: bool):
    set_fused_kernels(fused)
    try:
        model = build_model(CFG, seed=3)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, CFG.vocab_size, (2, 24), generator=g)
        labels = torch.randint(0, CFG.vocab_size, (2, 24), generator=g)
        loss = model(ids, labels=labels).mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    finally:
        set_fused_kernels(True)


def test_model_fused_equals_reference():
    require_kernels()
    calls = []
    with _Count(calls):  # proves the fused path is really taken
        loss, grads = _loss_and_grads(True)
    ops = torch.ops.megallama
    assert ops.rms_norm_fwd.default in calls and ops.swiglu_fwd.default in calls
    assert ops.rope_fwd.default in calls or ops.rope_qk_fwd.default in calls
    ref_loss, ref_grads = _loss_and_grads(False)
    assert_close(loss, ref_loss, 1e-5, "loss")
    for name, g in grads.items():
        assert_close(g, ref_grads[name], 1e-5, name)


class _Count(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def _run(code: str, **env):
    full_env = {k: v for k, v in os.environ.items() if k != _extension._LIB_ENV}
    full_env.update(env, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True,
                          text=True, timeout=300, cwd="/")


def test_fallback_warns_once_and_switch_env():
    code = """
        import sys, warnings
        sys.modules["megallama._C"] = None  # as if the extension was never built
        import torch
        from megallama.ops import rms_norm, swiglu, fused_kernels_enabled
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            for _ in range(3):
                y = rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5).sum()
                y = y + swiglu(torch.randn(4), torch.randn(4)).sum()
        msgs = [str(x.message) for x in w if "fused kernels" in str(x.message)]
        has_ops = hasattr(torch.ops.megallama, "rms_norm_fwd")
        print("ENABLED", fused_kernels_enabled(), "WARNINGS", len(msgs), "OPS", has_ops)
    """
    out = _run(code, MEGALLAMA_JIT="0")
    assert out.returncode == 0, out.stderr
    assert "ENABLED True WARNINGS 1 OPS False" in out.stdout, out.stdout + out.stderr
    out = _run(code, MEGALLAMA_FUSED_KERNELS="0")
    assert out.returncode == 0, out.stderr
    assert "ENABLED False WARNINGS 0 OPS False" in out.stdout, out.stdout + out.stderr
