"""tools/pipeline_timeline.py prices --model with the vocabulary training builds (the tokenizer's) and reads
--num-layers-per-virtual-pipeline-stage; tools/benchmark.py names an unknown model first and runs on the CPU with
--megallama-args "--device cpu", its column saying so."""
import importlib.util
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--num-layers 1 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 2 --num-query-groups 1"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _weights(out):
    return [float(x.strip(" '")) for x in re.search(r"part weights \[([^]]*)\]", out).group(1).split(",")]


def test_timeline_prices_the_tokenizer_vocabulary_training_builds(capsys):
    main = _tool("pipeline_timeline")
    argv = ["--stages", "4", "--model", "tiny_llama3_50m", "--microbatches", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "vocabulary: 8192 (the tokenizer's 8192" in out  # the bundled tokenizer, as training
    assert main(argv + ["--vocab-size", "128256"]) == 0
    big = capsys.readouterr().out
    assert "vocabulary: 128256 (--vocab-size)" in big
    assert _weights(big)[-1] > _weights(out)[-1] * 1.5  # the 128K-row output layer is no longer priced by default
    assert main(argv + ["--make-vocab-size-divisible-by", "1000", "--tensor-model-parallel-size", "2"]) == 0
    assert "vocabulary: 10000 (the tokenizer's 8192, padded" in capsys.readouterr().out


def test_timeline_reads_layers_per_virtual_stage_and_names_its_formula(capsys):
    main = _tool("pipeline_timeline")
    assert main(["--stages", "2", "--model", "tiny_llama3_50m", "--num-layers", "8", "--microbatches", "4",
                 "--num-layers-per-virtual-pipeline-stage", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("interleaved: 2 stages, 4 microbatches, 2 chunks per stage")
    assert "theory: interleaved's (p-1)/(v*m+p-1)" in out
    assert main(["--stages", "2", "--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "3"]) == 2
    assert "does not split 8 layers over 2 pipeline stages" in capsys.readouterr().err
    assert main(["--stages", "4", "--schedule", "chimera", "--microbatches", "4"]) == 0
    assert "chimera's (p-2)/(2m+p-2), for equal parts and F = B; these op costs differ" in capsys.readouterr().out


def test_benchmark_names_an_unknown_model_before_the_device(capsys):
    assert _tool("benchmark")(["--model", "nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown model 'nonexistent'; choose one of:") and "tiny_llama3_50m" in err
    assert "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA message")
def test_benchmark_without_cuda_names_the_cpu_way(capsys):
    assert _tool("benchmark")(["--model", "tiny_llama3_50m"]) == 2
    assert '--megallama-args "--device cpu"' in capsys.readouterr().err


def test_benchmark_runs_on_cpu_and_labels_the_column(capsys):
    main = _tool("benchmark")
    assert main(["--model", "tiny_llama3_50m", "--batch-sizes", "1", "--seq-length", "16", "--steps", "1",
                 "--megallama-args", f"--device cpu {TINY}"]) == 0
    out = capsys.readouterr().out
    assert "| tok/s/CPU |" in out and "tok/s/GPU" not in out and "failed" not in out, out
    assert main(["--model", "tiny_llama3_50m", "--compare-hf", "--megallama-args", "--device cpu"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_benchmark_mfu_is_the_workers_model_and_hf_refuses_another_shape(capsys, tmp_path):
    """--megallama-args that reshape the model: MFU counts the FLOPs of the model the worker ran (it counted
    --model's, 580x too high for a 1-layer 64-wide run), and the HF ratio, which would compare two models, is
    refused."""
    import json
    main = _tool("benchmark")
    shape = "--num-layers 1 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --num-query-groups 2"
    out = tmp_path / "r.json"
    assert main(["--model", "tiny_llama3_50m", "--batch-sizes", "1", "--seq-length", "64", "--steps", "2",
                 "--megallama-args", shape, "--save-results", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    from megallama.logging import device_peak_flops
    want = row["tokens_per_s_per_gpu"] * row["flops_per_token"] / device_peak_flops(torch.device("cuda"))
    assert row["mfu_vs_peak"] == pytest.approx(want)
    capsys.readouterr()
    assert main(["--model", "tiny_llama3_50m", "--batch-sizes", "1", "--seq-length", "64", "--steps", "2",
                 "--compare-hf", "--megallama-args", shape]) == 2
    assert "the HF baselines are built from --model" in capsys.readouterr().err
