"""Bad layouts fail with one clear ConfigError line, before any process group is made: tp not dividing the
attention heads / kv heads / FFN / vocabulary, world size not a multiple of tp*pp*cp; a sequence that tp does not
divide under sequence parallelism fails at the first scatter with the same kind of message."""
import pytest
import torch
import torch.distributed.distributed_c10d as c10d

from dist_utils import run_distributed
from megallama.errors import ConfigError
from megallama.model import build_model
from megallama.mpu import parallel_state as ps
from tp_helpers import MHA

BAD = [
    (dict(num_attention_heads=6, num_query_groups=6, hidden_size=48), 4, "attention heads 6"),
    (dict(num_attention_heads=8, num_query_groups=2), 4, "kv heads (query groups) 2"),
    (dict(ffn_hidden_size=130), 4, "FFN hidden size 130"),
    (dict(vocab_size=250), 4, "vocabulary size 250"),
]


@pytest.mark.parametrize("override,tp,what", BAD)
def test_tp_must_divide_model_shapes(override, tp, what):
    cfg = MHA.replace(**override)
    with pytest.raises(ConfigError, match=r"tensor-parallel size 4 does not divide the " + what.replace("(", r"\(")
                       .replace(")", r"\)")) as e:
        ps.validate_grid(8, tp, model_config=cfg)
    assert "\n" not in str(e.value) and "--tensor-model-parallel-size" in str(e.value)
    assert ps.validate_grid(8, 2, model_config=cfg) == 4  # tp=2 divides all of them


def test_world_must_be_multiple_of_grid():
    with pytest.raises(ConfigError, match="world size 6 is not divisible by tp\\*pp\\*cp = 2\\*2\\*1 = 4") as e:
        ps.validate_grid(6, 2, 2)
    assert "\n" not in str(e.value)


def _job(rank, world):
    results = []
    groups_before = c10d._world.group_count
    for kwargs in (dict(tensor_model_parallel_size=2, model_config=MHA.replace(num_query_groups=1)),
                   dict(tensor_model_parallel_size=4),
                   dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=3)):
        try:
            ps.initialize_model_parallel(**kwargs)
            results.append("no error")
        except ConfigError as e:
            results.append(str(e))
    no_groups = c10d._world.group_count == groups_before and not ps.model_parallel_is_initialized()
    ps.initialize_model_parallel(2, model_config=MHA)
    model = build_model(MHA, sequence_parallel=True)
    try:
        model(torch.zeros(1, 7, dtype=torch.long))
        seq_error = "no error"
    except ConfigError as e:
        seq_error = str(e)
    return results, no_groups, seq_error


def test_bad_layout_raises_before_any_group_is_made():
    out = run_distributed(_job, 2)
    for results, no_groups, seq_error in out.values():
        assert no_groups, "a process group was created before the layout was rejected"
        assert "kv heads (query groups) 1" in results[0]
        assert "world size 2 is not divisible" in results[1] and "world size 2 is not divisible" in results[2]
        assert all("\n" not in r for r in results)
        assert "sequence length 7 is not divisible by the tensor-parallel size 2" in seq_error
