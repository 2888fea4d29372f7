"""LoRA with a pipeline stage that holds no decoder layer (an E-only or L-only stage): refused while parsing."""
import pytest

from megallama.arguments import parse_args
from megallama.errors import ConfigError


def _parse_lora(pp, *extra):
    base = ["--model", "tiny_llama3_50m", "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64", "--micro-batch-size", "1",
            "--global-batch-size", "4", "--train-iters", "1", "--device", "cpu", "--strategy", "lora",
            "--pipeline-model-parallel-size", str(pp)]
    return parse_args(base + list(extra), world_size=pp)


def test_lora_refuses_a_pipeline_stage_without_decoder_layers_while_parsing():
    """Under LoRA the embedding and output layer are frozen, so an E-only or L-only (virtual) stage trains nothing:
    the run stopped building DDP on that rank ('the model has no trainable parameters'), silently when that rank
    was not rank 0. Refused in one line while parsing; a layout with a layer on every stage still parses."""
    for extra in (["--pipeline-model-parallel-layout", "Et|t|tt|L"], ["--pipeline-model-parallel-layout", "E|tt|tt|L"],
                  ["--num-virtual-stages-per-pipeline-rank", "3", "--account-for-embedding-in-pipeline-split",
                   "--account-for-loss-in-pipeline-split"]):
        with pytest.raises(ConfigError, match="no decoder layer"):
            _parse_lora(2, *extra)
    assert _parse_lora(2, "--pipeline-model-parallel-layout", "Et|t|t|tL").pipeline_layer_counts == [1, 1, 1, 1]
