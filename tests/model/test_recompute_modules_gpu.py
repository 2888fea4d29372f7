"""CUDA: --recompute-modules trains as no recompute does on one GPU, through the paths CPU never takes (flash/SDPA
attention, the fused RMSNorm and SwiGLU kernels, ``torch._grouped_mm`` experts, bf16 autocast): the output-
discarding modules (layernorm, moe_act) refill freed storage on the device. fp32 with TF32 off: 3 AdamW steps'
losses within 1e-5 and grad norms within 1e-5 relative (expert scatter-adds may reorder sums); bf16: within 1e-3
(a recompute re-runs the same kernels, so any larger gap is a wrong refill)."""
import pytest

from dist_utils import run_distributed

pytestmark = pytest.mark.gpu
DEVICE = "cuda"

BASE = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "256", "--ffn-hidden-size", "512",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "512", "--seq-length", "128",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-2",
        "--lr-warmup-iters", "0", "--mock-data", "--no-progress-bar", "--device", DEVICE]
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-shared-expert-intermediate-size", "256",
       "--moe-shared-expert-gate"]
SETS = [["core_attn"], ["layernorm"], ["mlp"], ["moe"], ["moe_act"], ["shared_experts"],
        ["core_attn", "layernorm", "mlp", "moe_act", "shared_experts"]]


def _run(rank, world, argvs):
    """Every run of ``argvs`` in one process (one CUDA start-up): [(losses, grad norms)]."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    outs = []
    for argv in argvs:
        out = pretrain(parse_args(list(argv), world_size=world))
        outs.append((out["losses"], out["grad_norms"]))
    return outs


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 1e-3)])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_recompute_modules_train_like_no_recompute_on_cuda(precision, tol, moe):
    argv = BASE + ["--mixed-precision", precision] + (MOE if moe else [])
    sets = [[m for m in mods if moe or m not in ("moe", "moe_act", "shared_experts")] for mods in SETS]
    sets = [mods for mods in sets if mods]
    runs = run_distributed(_run, 1, [argv] + [argv + ["--recompute-granularity", "selective", "--recompute-modules",
                                                      *mods] for mods in sets])[0]
    (ref, ref_gn), got_all = runs[0], runs[1:]
    for mods, (got, gn) in zip(sets, got_all):
        for step in ref:
            assert abs(got[step] - ref[step]) <= tol * abs(ref[step]), (mods, step, got, ref)
            assert abs(gn[step] - ref_gn[step]) <= tol * ref_gn[step], (mods, step, gn, ref_gn)
