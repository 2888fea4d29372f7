"""Auto-configuration: the layouts it picks fit by the estimator, are deterministic, and it says when none fits."""
import pytest

from megallama.autoconfig import choose_layout, throughput_score
from megallama.errors import ConfigError


def test_tiny_model_on_one_gpu_uses_no_model_parallelism():
    plan = choose_layout("tiny_llama3_50m", 1, gpu_memory_gb=80, sequence_length=2048)
    assert (plan["tp"], plan["pp"], plan["dp"], plan["zero_stage"]) == (1, 1, 1, 0)
    assert plan["recompute"] == "none" and plan["estimate"]["fits"]
    assert "chosen: tp 1, pp 1, dp 1" in plan["explanation"]


def test_fixed_micro_batch_and_small_gpu_force_memory_savings():
    roomy = choose_layout("llama3_8b", 8, gpu_memory_gb=80, sequence_length=4096, micro_batch_size=1)
    tight = choose_layout("llama3_8b", 8, gpu_memory_gb=40, sequence_length=4096, micro_batch_size=1)
    assert roomy["estimate"]["memory_per_gpu_gb"] <= 0.95 * 80
    assert tight["estimate"]["memory_per_gpu_gb"] <= 0.95 * 40
    saving = lambda p: (p["tp"] * p["pp"], p["zero_stage"], ["none", "selective", "full"].index(p["recompute"]))  # noqa
    assert saving(tight) > saving(roomy)


def test_405b_on_64_gpus_does_not_fit_and_says_what_would(capsys):
    """The seed's '405B on 64 GPUs -> tp 8, pp 8, ZeRO 3' leaves dp = 1 (ZeRO-3 shards nothing) and > 100 GiB of
    model states per GPU at 18 bytes/param: no layout of 64 x 80 GiB fits, and the explanation says so."""
    assert choose_layout("llama3_405b", 64, gpu_memory_gb=80, sequence_length=8192) is None
    text = capsys.readouterr().out
    floor = 18 * 405_853_388_800 / 64 / 2**30
    assert "NO layout fits" in text and f"{floor:.1f} GiB per GPU when fully sharded" in text
    assert "128 GPUs would fit: tp " in text


def test_405b_on_enough_gpus_uses_model_parallelism_and_sharding():
    tight = choose_layout("llama3_405b", 128, gpu_memory_gb=80, sequence_length=8192)
    # 53 GiB of model states per GPU even fully sharded: only ZeRO-3 over all dp ranks or a deep pipeline fits
    assert tight["tp"] >= 4 and (tight["zero_stage"] == 3 or tight["pp"] >= 8)
    assert tight["estimate"]["memory_per_gpu_gb"] <= 0.95 * 80
    plan = choose_layout("llama3_405b", 256, gpu_memory_gb=80, sequence_length=8192)
    assert plan["zero_stage"] >= 1 and plan["tp"] * plan["pp"] * plan["dp"] == 256
    assert plan["estimate"]["memory_per_gpu_gb"] <= 0.95 * 80
    again = choose_layout("llama3_405b", 256, gpu_memory_gb=80, sequence_length=8192)
    assert {k: again[k] for k in ("tp", "pp", "dp", "zero_stage", "recompute", "micro_batch_size")} == \
        {k: plan[k] for k in ("tp", "pp", "dp", "zero_stage", "recompute", "micro_batch_size")}


def test_global_batch_fixes_microbatches_and_score_prefers_less_recompute():
    plan = choose_layout("llama3_8b", 8, gpu_memory_gb=80, sequence_length=2048, global_batch_size=64)
    assert plan["micro_batch_size"] * plan["dp"] * plan["num_microbatches"] == 64
    assert throughput_score(1, 1, 8, 0, "none", 4, 2048, 1) > throughput_score(1, 1, 8, 0, "full", 4, 2048, 1)
    assert throughput_score(1, 4, 2, 0, "none", 4, 2048, 16) > throughput_score(1, 4, 2, 0, "none", 4, 2048, 4)


def test_bad_gpu_count():
    with pytest.raises(ConfigError, match="must be positive"):
        choose_layout("llama3_8b", 0)
