"""LoRA with a pipeline stage that holds no decoder layer (E alone, L alone, or an empty stage) parses and is priced.

Such layouts were refused while parsing ("trains adapters of decoder layers only, and pipeline stage 0 ... holds no
decoder layer"); such a stage now gets no adapters (test_lora_stage_without_layers.py trains them). The memory
estimate of the parsed flags prices them without failing: a stage holding only the frozen embedding keeps no
gradients or optimizer states, so it needs a fraction of what it needs when the embedding trains."""
import pytest

from megallama.arguments import parse_args


def _parse_lora(pp, *extra, strategy="lora"):
    base = ["--model", "tiny_llama3_50m", "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64", "--micro-batch-size", "1",
            "--global-batch-size", "4", "--train-iters", "1", "--device", "cpu", "--strategy", strategy,
            "--pipeline-model-parallel-size", str(pp)]
    return parse_args(base + list(extra), world_size=pp)


LAYOUTS = [(2, ["--pipeline-model-parallel-layout", "Et|t|tt|L"], [1, 1, 2, 0]),
           (2, ["--pipeline-model-parallel-layout", "E|tt|tt|L"], [0, 2, 2, 0]),
           (2, ["--pipeline-model-parallel-layout", "E|ttttL"], [0, 4]),
           (3, ["--pipeline-model-parallel-layout", "Et||tttL"], [1, 0, 3]),
           (3, ["--pipeline-model-parallel-layout", "E|tt|ttL"], [0, 2, 2]),
           (2, ["--num-virtual-stages-per-pipeline-rank", "3", "--account-for-embedding-in-pipeline-split",
                "--account-for-loss-in-pipeline-split"], [0, 1, 1, 1, 1, 0])]


@pytest.mark.parametrize("strategy", ["lora", "hybrid"])
@pytest.mark.parametrize("pp, extra, counts", LAYOUTS, ids=[f"pp{c[0]}-{c[1][-1]}" for c in LAYOUTS])
def test_lora_parses_a_pipeline_stage_without_decoder_layers(pp, extra, counts, strategy):
    assert _parse_lora(pp, *extra, strategy=strategy).pipeline_layer_counts == counts


@pytest.mark.parametrize("strategy", ["lora", "hybrid"])
@pytest.mark.parametrize("pp, extra, counts", LAYOUTS, ids=[f"pp{c[0]}-{c[1][-1]}" for c in LAYOUTS])
def test_memory_estimate_of_lora_with_a_stage_without_layers(pp, extra, counts, strategy):
    from megallama.memory_args import estimate_for_args
    stages, full = ({k: s["allocated_gb"] for k, s in estimate_for_args(
        _parse_lora(pp, *extra, strategy=name), num_gpus=pp, gpu_memory_gb=80, recommend=False)["stages"].items()}
        for name in (strategy, "standard"))
    assert sorted(stages) == list(range(pp)) and all(v > 0 for v in stages.values()), stages
    if counts[0] == 0 and pp == 3:  # rank 0 holds the frozen embedding alone: no grads, no optimizer states
        assert stages[0] < 0.6 * full[0], (stages, full)
