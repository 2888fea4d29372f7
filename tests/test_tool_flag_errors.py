"""Every tool's mistyped flag is one line naming the closest flag (argparse printed its usage block first, and
once per rank under torchrun), with exit code 2; a prefix of a flag is not taken for it."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3] + "_under_test", os.path.join(ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.parametrize("tool,required,typo,meant", [
    ("tools/benchmark.py", [], "--step", "--steps"),
    ("tools/convert_checkpoint.py", ["hf-to-megallama", "--hf-dir", "a", "--output", "b"], "--hf-dirr", "--hf-dir"),
    ("tools/make_chat_sample.py", [], "--outptu", "--output"),
    ("tools/make_corpus.py", [], "--overwrit", "--overwrite"),  # a prefix: abbreviations are off
    ("tools/pipeline_timeline.py", [], "--no-such-flag", None),
    ("tools/preprocess_data.py", ["--input", "a", "--output-prefix", "b"], "--workerz", "--workers"),
    ("tools/train_tokenizer.py", [], "--vocab-sizes", "--vocab-size"),
    ("megallama/optimizer/benchmark.py", [], "--no-such-flag", None),
])
def test_mistyped_flag_is_one_line(tool, required, typo, meant, capsys):
    with pytest.raises(SystemExit) as e:
        _main(tool)(required + [typo])
    assert e.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and typo in err[0] and "usage:" not in captured.out, err
    if meant:
        assert f"did you mean {meant}?" in err[0], err[0]
