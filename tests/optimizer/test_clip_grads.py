"""The grad-norm square sum is fp64: exact to ~1e-9 where torch's fp32 CPU norm is off by ~1e-5 (1M elements),
and finite for a norm whose fp32 square overflows."""
import math

import pytest
import torch

from megallama.optimizer.clip_grads import sum_of_squares


def test_sum_of_squares_is_accurate_for_large_tensors():
    g = torch.Generator().manual_seed(0)
    grads = [torch.full((1_000_000,), 1e-3) + torch.rand(1_000_000, generator=g) * 1e-4, torch.randn(7, 5)]
    ref = sum(float(t.double().square().sum()) for t in grads)
    got = sum_of_squares(grads, torch.device("cpu"))
    assert got.dtype == torch.float64 and got.shape == (1,)
    assert abs(float(got) / ref - 1) < 1e-8


@pytest.mark.parametrize("n", [2, 5000])  # a remainder only; whole chunks too
def test_sum_of_squares_does_not_overflow_for_a_large_finite_norm(n):
    big = torch.full((n,), 3e19)
    small = torch.ones(4099, dtype=torch.bfloat16)
    got = float(sum_of_squares([big, small], "cpu"))
    assert math.isfinite(got) and abs(got / (float(big.double().square().sum()) + 4099) - 1) < 1e-12


def test_sum_of_squares_keeps_a_real_inf():
    assert float(sum_of_squares([torch.tensor([1.0, float("inf")] * 3000)], "cpu")) == float("inf")


def test_sum_of_squares_of_nothing_is_zero():
    assert float(sum_of_squares([], "cpu")) == 0.0
