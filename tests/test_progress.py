"""The one progress bar (training and preprocessing): a line per ``every`` percent in logs, in-place redraws that
end with a newline on a terminal, nothing when disabled."""
import io

from megallama.progress import ProgressBar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_output_prints_one_line_per_step_of_every_percent():
    out = io.StringIO()
    bar = ProgressBar(40, enabled=True, stream=out)
    for i in range(1, 41):
        bar.update(i, f"loss {i}")
    lines = out.getvalue().splitlines()
    assert len(lines) == 11  # 2% .. 100% in tenths: the first update, then one per decile
    assert lines[-1].startswith("[" + "#" * 30 + "] 40/40 100%") and lines[-1].endswith("loss 40")


def test_terminal_output_redraws_in_place_and_close_replaces_an_open_line():
    out = _Terminal()
    bar = ProgressBar(3_000_000, label="tokenizing x", unit="MB", scale=1e6, every=25, stream=out)
    bar.update(1_000_000, "1 docs")
    bar.close("1 documents")
    text = out.getvalue()
    assert text.startswith("\r\033[Ktokenizing x: [") and "1.0/3.0 MB  33%" in text and " MB/s eta " in text
    assert text.endswith("\r\033[Ktokenizing x: 1 documents\n") and text.count("\n") == 1


def test_disabled_bar_writes_nothing():
    out = io.StringIO()
    bar = ProgressBar(5, enabled=False, stream=out)
    bar.update(5)
    bar.close("done")
    assert out.getvalue() == ""
