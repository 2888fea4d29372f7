"""ZeRO under the real pipeline runner (pp = 2 x dp = 2, tied embeddings): 1F1B keeps several microbatches in
flight, so stage 3 must re-gather units for each pending backward; the interleaved schedule gives every rank two
model chunks under one optimizer; ZB-H1 runs each backward twice (input grads, then weight grads only). Checked
against single-process torch AdamW on the same global batch."""
import pytest
import torch
import torch.distributed as dist

from dist_utils import rel_err, run_distributed
from megallama.mpu import parallel_state as ps
from megallama.optimizer import DistributedDataParallel, OptimizerConfig, get_megatron_optimizer
from megallama.pipeline import build_model_chunks, get_forward_backward_func, unwrap_model
from pipeline.pp_harness import forward_step
from zero_harness import CFG, GLOBAL_BATCH, OPT, SEED, SEQ, local_microbatches, reference_run

STEPS, M = 4, 4
TIED4 = CFG.replace(num_layers=4, tie_word_embeddings=True)
CASES = [("1f1b", 0), ("1f1b", 2), ("1f1b", 3), ("interleaved", 1), ("interleaved", 3), ("zb-h1", 2), ("zb-h1", 3)]
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _run(schedule, stage):
    ps.initialize_model_parallel(pipeline_model_parallel_size=2,
                                 virtual_pipeline_model_parallel_size=2 if schedule == "interleaved" else None)
    chunks = build_model_chunks(TIED4, seed=SEED, schedule=schedule,
                                num_layers_per_virtual_stage=1 if schedule == "interleaved" else None)
    ddps = [DistributedDataParallel(c, zero_stage=stage, bucket_size=3000, overlap_grad_reduce=True,
                                    overlap_param_gather=True) for c in chunks]
    opt = get_megatron_optimizer(OptimizerConfig(**OPT), ddps)
    fb = get_forward_backward_func(2, schedule)
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mb = GLOBAL_BATCH // dp // M
    losses, norms = [], []
    for step in range(STEPS):
        opt.zero_grad()
        data = iter([{"input_ids": x, "labels": y} for x, y in local_microbatches(step, dp, rank, M)])
        out = fb(forward_step, data, ddps, M, SEQ, mb)
        for d in ddps:
            d.finish_grad_sync()
        for d in ddps:  # tied embedding: sum the first stage's and the last stage's copy
            m = unwrap_model(d)
            tied = [m.model.embed_tokens.weight] if m.pre_process else []
            tied += [m.output_weight] if hasattr(m, "output_weight") else []
            d.all_reduce_param_grads(tied, ps.get_embedding_group())
        ok, norm, _ = opt.step()
        assert ok
        loss = torch.tensor([sum(float(o["lm loss"]) for o in out) / M if out else 0.0])
        dist.all_reduce(loss)
        losses.append(float(loss) / dp)
        norms.append(norm)
    params = {}
    for d in ddps:
        for k, v in d.state_dict().items():
            params[k] = v.numpy()
    ps.destroy_model_parallel()
    return losses, norms, params


def _job(rank, world):
    return {case: _run(*case) for case in CASES}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_job, 4)


@pytest.mark.parametrize("schedule,stage", CASES)
def test_zero_under_pipeline_runner(results, schedule, stage):
    ref = reference_run(STEPS, TIED4)
    for r in range(4):
        losses, norms, params = results[r][(schedule, stage)]
        what = f"{schedule} zero {stage} rank {r}"
        for i, (a, b) in enumerate(zip(losses, ref["losses"])):
            assert abs(a - b) <= 1e-5 * b, f"{what}: loss at step {i + 1}: {a} vs {b}"
        for i, (a, b) in enumerate(zip(norms, ref["norms"])):
            assert abs(a - b) <= 1e-5 * b, f"{what}: grad norm at step {i + 1}: {a} vs {b}"
        for k, v in params.items():
            key = "model.embed_tokens.weight" if k == "output_weight" else k
            assert rel_err(torch.from_numpy(v), ref["params"][key]) <= 1e-5, f"{what}: {k}"
