"""LoRA under ZeRO-3: the frozen base is sharded over dp x cp like the adapters (``optimizer/zero3_flat.py``) and
gathered a whole layer at a time with them. The estimate prices the base sharded (it priced it whole on every rank
while training kept it so): on two CPU ranks the model states and the whole training step are within 2 %, and each
rank's model states are about half of what one process keeps."""
import os
import sys

from dist_utils import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = ["--model", "tiny_llama3_50m", "--num-layers", "3", "--hidden-size", "128", "--ffn-hidden-size", "512",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "512", "--seq-length", "64",
        "--micro-batch-size", "2", "--strategy", "lora", "--lora-rank", "8", "--zero-stage", "3"]


def _worker(rank, world):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import measure_memory
    rec = measure_memory.measure(LORA, steps=2, device="cpu")
    return rec["rel_err"], rec["estimate"]["model_states"], rec["measured"]["model_states_allocated"]


def test_lora_zero3_shards_the_frozen_base():
    one = run_distributed(_worker, 1)[0]
    for rank, (err, est, measured) in run_distributed(_worker, 2).items():
        assert abs(est / measured - 1) < 0.02, (rank, est, measured)
        assert abs(err) < 0.02, (rank, err)
        assert 0.45 < measured / one[2] < 0.56, (rank, measured, one[2])  # half the base and the adapters' states
