"""Layer partitioning over stages and virtual chunks, and the layout errors users see."""
import pytest

from megallama.config import get_model_config
from megallama.errors import ConfigError
from megallama.pipeline.model_chunks import model_parts
from megallama.pipeline.partition import (StageCosts, costs_from_config, num_microbatches, partition_layers,
                                          validate_pipeline_config)


def sizes(parts):
    return [len(x) for x in parts]


def test_even_split_and_contiguous_ids():
    parts = partition_layers(8, 4)
    assert parts == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sizes(partition_layers(32, 4, 2)) == [4] * 8


def test_uneven_counts_give_fewer_layers_to_early_stages():
    assert sizes(partition_layers(7, 4)) == [1, 2, 2, 2]
    assert sizes(partition_layers(10, 4)) == [2, 2, 3, 3]
    assert sum(sizes(partition_layers(126, 16))) == 126


def test_head_cost_moves_layers_off_the_last_stage():
    # Llama 3 8B: the 128K-vocabulary head costs ~2.4 layers of compute
    cfg = get_model_config("llama3_8b")
    c = costs_from_config(cfg)
    assert 2.3 < c.head < 2.5 and c.embedding < 1e-3
    parts = partition_layers(32, 4, costs=c)
    assert sizes(parts) == [8, 9, 9, 6]
    cost = [len(x) + (c.head if k == 3 else 0) + (c.embedding if k == 0 else 0) for k, x in enumerate(parts)]
    assert max(cost) == 9  # the best possible bottleneck: ceil((32 + 2.41) / 4)
    # a heavy embedding (a pretend cost) does the same at the front
    assert sizes(partition_layers(12, 3, costs=StageCosts(1.0, 2.0, 0.0))) == [2, 5, 5]
    # Llama 2 7B's 32K head is cheap: even split
    assert sizes(partition_layers(32, 4, costs=costs_from_config(get_model_config("llama2_7b")))) == [8] * 4


def test_moe_layers_cost_more_and_the_split_follows():
    """A MoE layer runs top-k expert MLPs: with the sparse layers all in front, an even split overloads stage 0;
    the split is the best contiguous one (checked against every cut)."""
    import itertools
    from megallama.strategies import TrainingStrategy
    cfg = TrainingStrategy("moe", {"num_experts": 8, "experts_per_token": 2, "moe_layers": [0, 1, 2, 3]}).model_config(
        get_model_config("llama2_7b", num_layers=8))  # a 32K head: cheap, so the layers decide
    c = costs_from_config(cfg, 4096)
    assert c.layers[0] > 1.5 and c.layers[4] == 1.0

    def cost(parts):
        return max(sum(c.layers[i] for i in p) + (c.embedding if k == 0 else 0) + (c.head if k == len(parts) - 1
                                                                                    else 0)
                   for k, p in enumerate(parts))
    for stages in (2, 3, 4):
        parts = partition_layers(8, stages, costs=c)
        best = min(cost([list(range(a, b)) for a, b in zip((0,) + cuts, cuts + (8,))])
                   for cuts in itertools.combinations(range(1, 8), stages - 1))
        assert abs(cost(parts) - best) < 1e-9 and sum(sizes(parts)) == 8, (stages, sizes(parts))
    assert sizes(partition_layers(8, 2, costs=c)) == [3, 5]  # an even split would put 4 MoE layers on stage 0
    assert sizes(partition_layers(8, 2, costs=costs_from_config(get_model_config("llama2_7b", num_layers=8)))) == \
        [4, 4]  # the dense model
    assert sizes(model_parts(cfg, 2, "1f1b", seq_length=4096)) == [3, 5]  # what the pipeline builds


def test_first_and_last_stage_overrides():
    assert sizes(partition_layers(32, 4, first_stage_num_layers=5)) == [5, 9, 9, 9]
    assert sizes(partition_layers(32, 4, first_stage_num_layers=5, last_stage_num_layers=3)) == [5, 12, 12, 3]
    # Megatron's even split of the rest, the head's stage included (the cost balance gave [8, 9, 9, 6], [1, 4, 4, 1])
    assert sizes(partition_layers(32, 4, costs=costs_from_config(get_model_config("llama3_8b")),
                                  first_stage_num_layers=8)) == [8, 8, 8, 8]
    assert sizes(partition_layers(10, 4, first_stage_num_layers=1)) == [1, 3, 3, 3]
    # with virtual stages, Megatron's rule: the pin is the first rank's layers, spread evenly over its chunks
    assert sizes(partition_layers(32, 4, 2, first_stage_num_layers=2)) == [1, 5, 5, 5, 1, 5, 5, 5]
    with pytest.raises(ConfigError, match="positive multiple of the 2 virtual stages"):
        partition_layers(32, 4, 2, first_stage_num_layers=5)
    with pytest.raises(ConfigError, match="leave"):
        partition_layers(8, 4, first_stage_num_layers=6)


def test_layout_errors():
    with pytest.raises(ConfigError, match="cannot split 4 layers over 8 pipeline stages"):
        partition_layers(4, 8)
    with pytest.raises(ConfigError, match="x 2 virtual chunks"):
        partition_layers(6, 4, 2)
    with pytest.raises(ConfigError, match="not divisible by micro batch size 2 x data-parallel size 3"):
        num_microbatches(10, 2, 3)
    assert num_microbatches(12, 2, 3) == 2
    with pytest.raises(ConfigError, match="at least as many microbatches"):
        validate_pipeline_config(16, 4, "interleaved", global_batch_size=4, micro_batch_size=2,
                                 num_layers_per_virtual_stage=2)
    with pytest.raises(ConfigError, match="needs --num-layers-per-virtual-pipeline-stage"):
        validate_pipeline_config(16, 4, "interleaved")
    with pytest.raises(ConfigError, match="do not split"):
        validate_pipeline_config(16, 4, "interleaved", num_layers_per_virtual_stage=3)
    with pytest.raises(ConfigError, match="unknown pipeline schedule"):
        validate_pipeline_config(16, 4, "round-robin")
    out = validate_pipeline_config(16, 4, "interleaved", global_batch_size=16, micro_batch_size=1,
                                   data_parallel_size=2, num_layers_per_virtual_stage=2)
    assert out["num_microbatches"] == 8 and out["num_chunks"] == 2 and sizes(out["parts"]) == [2] * 8


def test_model_parts_per_schedule():
    cfg = get_model_config("tiny_llama3_50m").replace(num_layers=8)
    assert sizes(model_parts(cfg, 2, "interleaved", num_layers_per_virtual_stage=2)) == [2, 2, 2, 2]
    assert len(model_parts(cfg, 4, "chimera")) == 4  # Chimera: p parts, each held twice
    assert sum(sizes(model_parts(cfg, 4, "1f1b"))) == 8


def test_account_for_embedding_and_loss_pins_the_end_stages():
    """Megatron's --account-for-embedding/loss-in-pipeline-split: the embedding (loss) counts as a layer of the
    first (last) stage, which gets one decoder layer fewer; the memory estimate follows the same split."""
    from megallama.arguments import parse_args
    from megallama.errors import ConfigError
    from megallama.memory import stage_layers
    base = ["--model", "tiny_llama3_50m", "--num-layers", "6", "--device", "cpu", "--pipeline-model-parallel-size",
            "2", "--global-batch-size", "4", "--micro-batch-size", "1", "--train-iters", "1"]
    a = parse_args(base + ["--num-layers", "7", "--account-for-embedding-in-pipeline-split"], world_size=2)
    assert a.pipeline_layer_counts == [3, 4]
    a = parse_args(base + ["--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split"],
                   world_size=2)
    assert a.pipeline_layer_counts == [3, 3]
    a = parse_args(base + ["--num-layers", "7", "--account-for-loss-in-pipeline-split"], world_size=2)
    assert stage_layers(a.model_config, 2, layer_counts=a.pipeline_layer_counts) == [4, 3]
    with pytest.raises(ConfigError, match="do not split evenly over 2 pipeline stages"):
        parse_args(base + ["--account-for-embedding-in-pipeline-split"], world_size=2)
    with pytest.raises(ConfigError, match="both place layers; pass one"):
        parse_args(base + ["--num-layers", "7", "--account-for-embedding-in-pipeline-split",
                           "--decoder-first-pipeline-num-layers", "2"], world_size=2)
