"""Activations priced per chunk a rank really holds: LoRA's per-layer adjustment under the interleaved schedule
counts the held chunk forwards' layers (not the rank's layers per forward), and Chimera prices its mirror chunk
(stage pp-1-s of the upward pipeline) at that stage's layer count, not its own. Hand counts and two-rank CPU
training peaks (benchmarks/measure_memory.py) against each rank's own estimate."""
from megallama.memory import estimate_requirements

from dist_utils import run_distributed
from test_memory import TINY
from test_memory_uneven_chunks import _stage_worker


def test_chimera_pp2_rank_holds_whole_model_and_one_microbatch_each_way():
    """pp 2 Chimera with [14, 18]: each rank holds part 0 and part 1, i.e. the whole model (14 + 18 layers, not
    2 x 18 on rank 1), and at its peak one downward and one upward microbatch: 14 + 18 layers on both ranks."""
    kw = dict(num_gpus=2, pp=2, pipeline_schedule="chimera", sequence_length=2048, num_microbatches=8,
              recommend=False)
    est = estimate_requirements("llama3_8b", pipeline_layer_counts=[14, 18], **kw)
    assert est["params_per_gpu"] == est["num_params"]
    assert [est["stages"][s]["held_layers"] for s in (0, 1)] == [32, 32]
    even = estimate_requirements("llama3_8b", pipeline_layer_counts=[16, 16], **kw)
    assert even["params_per_gpu"] == even["num_params"]
    assert [even["stages"][s]["held_layers"] for s in (0, 1)] == [32, 32]


def test_lora_interleaved_and_uneven_chimera_training_steps_two_ranks():
    """Per rank, measured CPU peak within 2% of its own estimate: LoRA under interleaved (2 chunks of 2 layers;
    the old per-forward price of 4 layers made -28% / -20%) and Chimera with layout Ettt|tttttL, dense and LoRA
    (the old mirror price of its own count made -29% / +22% dense, -50% / -4% LoRA)."""
    base = TINY[:2] + ["--num-layers", "8", "--hidden-size", "128", "--ffn-hidden-size", "512"] + TINY[8:] + [
        "--pipeline-model-parallel-size", "2", "--global-batch-size", "8"]
    base[base.index("--seq-length") + 1] = "256"
    lora = ["--strategy", "lora", "--lora-rank", "8"]
    chimera = ["--pipeline-schedule", "chimera", "--pipeline-model-parallel-layout", "Ettt|tttttL"]
    configs = [base + lora + ["--pipeline-schedule", "interleaved", "--num-layers-per-virtual-pipeline-stage", "2"],
               base + chimera, base + lora + chimera]
    errs = run_distributed(_stage_worker, 2, configs)
    assert [held for _, held in errs[0]] == [10, 8, 8] and [held for _, held in errs[1]] == [6, 8, 8]
    for rank, values in errs.items():
        for cfg, (err, _) in zip(configs, values):
            assert abs(err) < 0.02, (rank, cfg[-4:], err)
