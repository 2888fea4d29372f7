"""The global gradient norm that clipping uses is the one process's, to 1e-6 relative, in every layout (2 gloo ranks):
tp 2 with sequence parallelism (norm weights replicated over tp, counted once), pp 2 with tied embeddings (the last
stage's output-weight copy not counted again), dp 2 at ZeRO 1/2/3 (shards summed once), ep 2 (each expert counted
once over the expert group). First iteration, before any update, so nothing but the norm's own summation differs."""
import pytest

from dist_utils import run_distributed

ARGV = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-2",
        "--lr-warmup-iters", "0", "--mock-data", "--no-progress-bar", "--device", "cpu", "--clip-grad", "0.1"]
MOE = ["--num-experts", "4", "--moe-router-topk", "2"]
LAYOUTS = {"tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
           "pp2_tied": ["--pipeline-model-parallel-size", "2"],
           "dp2_zero1": ["--zero-stage", "1"], "dp2_zero2": ["--zero-stage", "2"], "dp2_zero3": ["--zero-stage", "3"],
           "ep2_zero1_moe": ["--expert-model-parallel-size", "2", "--zero-stage", "1"] + MOE}


def _norm(argv, world):
    from megallama.arguments import parse_args
    from megallama.mpu import parallel_state as ps
    from megallama.training import pretrain
    out = pretrain(parse_args(ARGV + argv, world_size=world))
    ps.destroy_model_parallel()
    return out["grad_norms"][1]


def _parallel(rank, world):
    return {name: _norm(flags, world) for name, flags in LAYOUTS.items()}


@pytest.fixture(scope="module")
def parallel():
    return run_distributed(_parallel, 2)


def test_grad_norm_equals_one_process_in_every_layout(parallel):
    ref = {"dense": _norm([], 1), "moe": _norm(MOE, 1)}
    for rank_result in parallel.values():
        for name, norm in rank_result.items():
            want = ref["moe" if name.endswith("moe") else "dense"]
            assert want > 0.1  # clipping is active: the norm decides the update
            assert abs(norm - want) <= 1e-6 * want, (name, norm, want)
