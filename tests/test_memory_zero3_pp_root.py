"""ZeRO-3's root unit under pipeline parallelism (optimizer/zero3.build_units: the weight ``compute_logits`` reads).
The head's stage gathers it from the forward's end through the head's backward; a first stage without the head
holds the embedding as its root, gathered only around the embedding (its backward, the microbatch's last, is that
stage's peak: gathered weight, its grad, the fp32 staging); a middle stage has none. The estimator charged a middle
stage (tied embeddings) and the first stage a root gathered all step, and missed the embedding's backward."""
import dataclasses

from megallama.config import ModelConfig, get_model_config
from megallama.memory import estimate_requirements

from dist_utils import run_distributed
from test_memory import TINY
from test_memory_zb_h1 import _zb_worker


def test_roots_of_each_stage():
    """What build_units makes the root on a first, middle and last stage of a tied model at pp > 1."""
    from megallama.model.llama import LlamaForCausalLM
    from megallama.optimizer.zero3 import build_units
    cfg = ModelConfig(num_layers=3, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                      vocab_size=512, tie_word_embeddings=True)
    roots = {}
    for name, ids, pre, post in (("first", [0], True, False), ("middle", [1], False, False),
                                 ("last", [2], False, True)):
        model = LlamaForCausalLM(cfg, ids, pre_process=pre, post_process=post)
        _, root = build_units(model, list(model.parameters()))
        roots[name] = None if root is None else [tuple(p.shape) for p in root.params]
    assert roots == {"first": [(512, 64)], "middle": None, "last": [(512, 64)]}


def test_middle_stages_price_no_root():
    """pp 4 x dp 2 at ZeRO-3: a middle stage holds decoder layers only, so tying the embeddings changes nothing
    there (it was charged the gathered root, vocab x hidden x 2 bytes, in every phase)."""
    cfg = get_model_config("tiny_llama3_50m")
    est = {tie: estimate_requirements("x", model_config=dataclasses.replace(cfg, tie_word_embeddings=tie),
                                      num_gpus=8, pp=4, zero_stage=3, sequence_length=512, num_microbatches=8,
                                      recommend=False)["stages"] for tie in (True, False)}
    for s in (1, 2):
        assert est[True][s] == est[False][s], s
        assert est[True][s]["phase"] == "layer backward"


def _worker(rank, world, argv):
    from megallama.mpu import parallel_state as ps
    (err, phase), = _zb_worker(rank, world, [argv], "phase")
    return ps.get_pipeline_model_parallel_rank(), err, phase


def test_pp2_dp2_zero3_every_rank():
    """pp 2 x dp 2 at ZeRO-3, vocabulary 8192 (the embedding outweighs the layers), four CPU ranks: each rank
    within 2% of its own stage's estimate (first stage before: -25.5%, its embedding backward unpriced)."""
    argv = TINY[:2] + ["--num-layers", "4"] + TINY[4:] + ["--pipeline-model-parallel-size", "2",
                                                          "--global-batch-size", "8", "--zero-stage", "3"]
    argv[argv.index("--vocab-size") + 1] = "8192"
    out = run_distributed(_worker, 4, argv)
    for rank, (stage, err, phase) in out.items():
        assert abs(err) < 0.02, (rank, stage, err)
        assert phase == ("embedding backward" if stage == 0 else "head forward"), (rank, phase)
