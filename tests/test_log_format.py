"""The training log as Megatron's training_log prints it: "loss scale" on every line (1.0 without fp16), a
--log-interval beyond the run still gives the last step's line, and the memory report is Megatron's report_memory
line (CUDA; none on CPU); the dense peak its MFU divides by."""
import re

import pytest
import torch

from test_tensorboard import _run


def _log_lines(text):
    return [ln for ln in text.splitlines() if re.match(r" \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration\s+\d+/", ln)]


def test_every_log_line_has_megatrons_loss_scale_in_its_place(tmp_path, capsys):
    _run(tmp_path / "tb", ["--eval-interval", "0"])
    lines = _log_lines(capsys.readouterr().out)
    assert len(lines) == 2
    for ln in lines:
        assert re.search(r"\| lm loss: [0-9.E+-]+ \| loss scale: 1\.0 \| grad norm: [0-9.]+ \|", ln), ln


def test_log_interval_beyond_the_run_logs_the_last_step(tmp_path, capsys):
    _run(tmp_path / "tb", ["--log-interval", "100", "--eval-interval", "0"])
    (line,) = _log_lines(capsys.readouterr().out)
    assert line.split("] ", 1)[1].startswith("iteration        6/       6 | consumed samples:           24 |")


def test_memory_report_is_megatrons_line_and_none_on_cpu(monkeypatch):
    from megallama.logging import memory_report
    assert memory_report(torch.device("cpu"), 2) is None
    for name, mb in (("memory_allocated", 1.5), ("max_memory_allocated", 2.0), ("memory_reserved", 4.0),
                     ("max_memory_reserved", 8.25)):
        monkeypatch.setattr(torch.cuda, name, lambda device=None, mb=mb: int(mb * 2**20))
    assert memory_report(torch.device("cuda", 0), 2) == (
        "[Rank 0] (after 2 iterations) memory (MB) | allocated: 1.5 | max allocated: 2.0 | reserved: 4.0 | "
        "max reserved: 8.25")


def test_log_memory_to_tensorboard_on_cpu_says_there_is_nothing_to_write(tmp_path, capsys):
    from test_tensorboard import _events
    _run(tmp_path / "tb", ["--log-memory-to-tensorboard", "--eval-interval", "0"])
    assert "--log-memory-to-tensorboard writes the CUDA allocator's counters; on CPU there are none" in \
        capsys.readouterr().err
    assert not [t for t in _events(tmp_path / "tb") if t.startswith("mem-")]


def test_a_dense_run_after_moe_work_in_the_same_process_logs_no_moe(tmp_path, capsys):
    """The MoE tally is process-wide: what a MoE model left in it (a test, an API call) was reported, and crashed
    the TensorBoard tags, in the next dense run's first log line."""
    from megallama.model.moe_stats import get_moe_stats
    get_moe_stats().record(0, torch.tensor([3.0, 5.0]), torch.tensor(0.1), torch.tensor(0.0))
    _run(tmp_path / "tb", ["--eval-interval", "0"])
    lines = _log_lines(capsys.readouterr().out)
    assert lines and not any("moe" in ln for ln in lines)


@pytest.mark.parametrize("name,tflops", [("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                                         ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0)])
def test_peak_flops_tell_the_h100_variants_apart(monkeypatch, name, tflops):
    """The PCIe card's dense bf16 peak is 756 TFLOP/s: read as the SXM's 989 its MFU came out 24 % low."""
    from megallama.logging import device_peak_flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert device_peak_flops(torch.device("cuda")) == tflops * 1e12
