"""Importing megallama must not import ``torch._dynamo`` (~3.5 s of CPU in every rank, test process and CLI call);
``compile_disable.disable`` still keeps its function out of compiled graphs once compiling."""
import subprocess
import sys

import torch

from megallama import compile_disable


def test_training_and_api_imports_leave_dynamo_unloaded():
    code = ("import sys, megallama.training, megallama.api, megallama.model.moe, megallama.model.packed_attention; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_disabled_function_runs_eagerly_inside_a_compiled_function():
    seen = []

    @compile_disable.disable
    def record(t):
        seen.append(torch.compiler.is_compiling())
        return None

    record(torch.ones(1))  # eager: may run before dynamo is imported

    def f(x):
        record(x)
        return x * 2

    g = torch.compile(f, backend="eager")
    for _ in range(3):
        assert torch.equal(g(torch.ones(2)), torch.full((2,), 2.0))
    assert seen == [False] * 4  # never traced: it ran as Python every call
