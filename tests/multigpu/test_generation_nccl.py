"""Generation with tensor parallel 2 on two GPUs over NCCL equals one GPU (fp32, TF32 off: the same greedy tokens,
each step's logits within 1e-5 relative), and its CUDA-graph decode (NCCL collectives captured in the graph)
equals its un-graphed static decode bit for bit."""
import os
import sys

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_HERE, "..", ".."), os.path.join(_HERE, "..")]

from dist_utils import run_distributed  # noqa: E402
from megallama.config import ModelConfig  # noqa: E402

pytestmark = pytest.mark.multigpu

CFG = ModelConfig(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
                  vocab_size=512, max_position_embeddings=128, rope_theta=10000.0)
PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3], [2, 7, 1]]


def _generate(rank, world, modes):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from megallama.generation import SamplingConfig, generate
    from megallama.model import build_model
    from megallama.mpu import parallel_state as ps
    if world > 1:
        ps.initialize_model_parallel(tensor_model_parallel_size=world)
    model = build_model(CFG, device=torch.device("cuda", torch.cuda.current_device()), seed=7)
    res = {}
    for mode in modes:
        out, steps = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10, temperature=0), return_logits=True,
                              decode_mode=mode)
        res[mode] = (out, [[s.cpu().tolist() for s in group] for group in steps])
    return res


def test_tp2_generation_matches_one_gpu_and_graphs():
    single = _generate(0, 1, ["eager"])["eager"]
    res = run_distributed(_generate, 2, ["eager", "static", "graph"], backend="nccl")
    for rank in (0, 1):
        r = res[rank]
        assert r["eager"][0] == single[0] and r["graph"][0] == r["static"][0] == single[0]
        for group, ref_group in zip(r["eager"][1], single[1]):
            for s, ref in zip(group, ref_group):
                s, ref = torch.tensor(s), torch.tensor(ref)
                assert float((s - ref).norm() / ref.norm()) < 1e-5
        assert r["graph"][1] == r["static"][1]  # the graph replays the static decode's kernels and collectives
