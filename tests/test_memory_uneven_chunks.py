"""Uneven virtual pipeline chunks (``pipeline_layer_counts``): each held chunk forward is priced at its own layers
at the interleaved order's worst moment (memory_stage.held_chunks_peak), not every one at the rank's largest chunk;
checked by a hand count, on the 8B layout, against the even formula, and against two-rank CPU training peaks."""
import pytest

import megallama.activation_memory as am
from megallama import memory_stage
from megallama.config import ModelConfig
from megallama.memory import WORKSPACE_BYTES, estimate_requirements
from megallama.pipeline.schedules import build_schedule

from dist_utils import run_distributed
from test_memory import TINY
from test_memory_zb_h1 import _zb_worker

SMALL = ModelConfig(num_layers=8, hidden_size=256, ffn_hidden_size=704, num_attention_heads=4, num_query_groups=2,
                    vocab_size=512)


def _act_bytes(est):
    """The worst stage's activation peak (what stage_activation_peak returns as 'total')."""
    b = est["breakdown_bytes"]
    return b["activations"] + b["logits"] + b["weight_casts"] + b["buffers"] - WORKSPACE_BYTES


def test_hand_count_pp2_two_chunks():
    """pp 2, 2 chunks, rank 0 [1, 3] and rank 1 [2, 2] (model order 1|2|3|2), 4 microbatches. Rank 0's interleaved
    order, by hand: warm-up (2-0-1)*2 + (2-1)*2 = 4 forwards, then F/B pairs, backwards walking chunks in reverse."""
    order = "F0 F1 F0.1 F1.1 F2 B0.1 F3 B1.1 F2.1 B0 F3.1 B1 B2.1 B3.1 B2 B3".split()
    assert [str(a) for a in build_schedule("interleaved", 2, 4, 2).actions[0]] == order
    # held layers after each action's start: F0 1, F1 2, F0.1 5, F1.1 8, F2 9 (= B0.1 running), ... F3.1 9 (= B1)
    # Two moments hold 9 layers in 5 chunk forwards: B0.1 runs chunk 1 (3 layers) beside chunk 0 of mbs 0..2 and
    # chunk 1 of mb 1; B1 runs chunk 0 (1 layer, the embedding's) beside chunk 0 of mbs 2, 3 and chunk 1 of mbs 2, 3
    kw = dict(model_config=SMALL, num_gpus=2, pp=2, pipeline_schedule="interleaved", virtual_pipeline_stages=2,
              num_microbatches=4, sequence_length=1024, batch_size=2, recommend=False)
    est = estimate_requirements("x", pipeline_layer_counts=[1, 2, 3, 2], **kw)
    assert est["worst_stage"] == 0
    assert (est["stages"][0]["held_layers"], est["stages"][0]["in_flight"]) == (9, 5)  # was 5 x 3 = 15
    x, n = am.Shape.of(SMALL, 2, 1024), am.Numerics.of("bf16")

    def one(layers, pre):
        return am.stage_activation_peak(x, n, layers, in_flight=1, pre_process=pre, post_process=False,
                                        others_hold_ends=False, device="cuda")

    other = {c: one(c, False)["other_per_microbatch"] for c in (1, 3)}
    b01 = one(3, False)["total"] + 3 * other[1] + other[3]
    b1 = one(1, True)["total"] + 2 * other[1] + 2 * other[3]
    assert _act_bytes(est) == max(b01, b1)
    old = one(3, True)["total"] + 4 * other[3]  # the former price: 5 forwards of the largest chunk
    assert _act_bytes(est) < old


def test_llama3_8b_layout_holds_the_schedules_layers():
    """Et*3|t*4|t*4|t*5|t*5|t*4|t*4|t*3L at pp 4 x 2: rank 0 [3, 5] warms up 4 x 3 + 4 x 5 + 2 x 3 layers and holds
    one more chunk-0 forward, 41 layers, where 11 forwards x 5 layers made 55; rank 3 [5, 3]: 4 x 5 + 3 = 23, not 25.
    The even ranks keep their figures."""
    kw = dict(num_gpus=4, pp=4, pipeline_schedule="interleaved", virtual_pipeline_stages=2, sequence_length=8192,
              global_batch_size=16, recommend=False)
    est = estimate_requirements("llama3_8b", pipeline_layer_counts=[3, 4, 4, 5, 5, 4, 4, 3], **kw)
    assert [est["stages"][s]["held_layers"] for s in range(4)] == [41, 36, 28, 23]
    assert [est["stages"][s]["in_flight"] for s in range(4)] == [11, 9, 7, 5]
    even = estimate_requirements("llama3_8b", **kw)
    assert [even["stages"][s]["held_layers"] for s in range(4)] == [44, 36, 28, 20]
    for s in (1, 2):  # [4, 4] on both layouts
        assert est["stages"][s]["allocated_gb"] == even["stages"][s]["allocated_gb"]


@pytest.mark.parametrize("p, m, v, group", [(2, 4, 2, None), (4, 16, 2, None), (4, 8, 3, None), (4, 12, 2, 6),
                                            (3, 7, 2, None), (8, 64, 4, None)])
def test_walk_reproduces_the_even_formula(p, m, v, group):
    """With equal chunks the schedule walk gives exactly the even-split price ((in flight - 1) x other + the active
    one, the ends on their own chunk), so the uneven path changes nothing where the chunks agree."""
    x, n = am.Shape.of(SMALL, 2, 512), am.Numerics.of("bf16")
    peak_kw = dict(x=x, n=n, recompute="none", head="fused", recompute_method="uniform", recompute_num_layers=1,
                   others_hold_ends=False, extra={}, device="cuda", head_trainable=True, recompute_modules=None)
    for stage in range(p):
        pre, post = stage == 0, stage == p - 1
        inflight = memory_stage._in_flight("interleaved", p, stage, m, v, group)
        act, held = memory_stage._uneven_chunks_peak([2] * v, stage, p, m, v, group, 8, 0, None, pre, post, peak_kw)
        ref = am.stage_activation_peak(num_layers=2, in_flight=inflight, pre_process=pre, post_process=post,
                                       **peak_kw)
        assert held == inflight and act["held_layers"] == 2 * inflight
        assert {k: act[k] for k in ("total", "weight_casts", "logits")} == \
               {k: ref[k] for k in ("total", "weight_casts", "logits")}, (p, m, v, stage)


def test_even_counts_and_405b_account_for_split():
    """An even split given as counts prices as today; Llama 3.1 405B at pp 8 x 8 with the account-for flags
    ([1] + [2] * 62 + [1]): the end ranks hold fewer layers than 'in flight x 2' and never cost more."""
    kw = dict(num_gpus=8, pp=4, tp=2, pipeline_schedule="interleaved", virtual_pipeline_stages=2,
              sequence_length=4096, global_batch_size=32, recommend=False)
    assert estimate_requirements("llama3_8b", pipeline_layer_counts=[4] * 8, **kw) == \
        estimate_requirements("llama3_8b", **kw)
    counts = [1] + [2] * 62 + [1]
    kw = dict(tp=8, pp=8, num_gpus=8, num_nodes=8, sequence_length=8192, sequence_parallel=True, zero_stage=1,
              recompute="full", global_batch_size=64, pipeline_schedule="interleaved", virtual_pipeline_stages=8,
              pipeline_layer_counts=counts, recommend=False)
    est = estimate_requirements("llama3_405b", **kw)
    orig = memory_stage.stage_memory
    try:  # the former price: every chunk forward in flight at the rank's largest chunk
        import megallama.memory as memory
        memory.stage_memory = lambda *a, **k: orig(*a, **dict(k, chunk_counts=None))
        old = estimate_requirements("llama3_405b", **kw)
    finally:
        memory.stage_memory = orig
    for s in range(8):
        assert est["stages"][s]["allocated_gb"] <= old["stages"][s]["allocated_gb"]
    for s in (0, 7):
        assert est["stages"][s]["held_layers"] < 2 * est["stages"][s]["in_flight"]
        assert est["stages"][s]["allocated_gb"] < old["stages"][s]["allocated_gb"]


def _stage_worker(rank, world, configs):
    """Per rank: the measured peak against this stage's own estimate and its held layers."""
    return _zb_worker(rank, world, configs, "held_layers")


def test_uneven_chunks_training_step_two_ranks():
    """pp 2 interleaved with layout Et|t|ttt|tL (rank 0 [1, 3], rank 1 [1, 1]), 4 microbatches: each rank's
    measured CPU peak within 4% of its own estimate (the former price held rank 0 at 5 x 3 layers)."""
    argv = TINY[:2] + ["--num-layers", "6"] + TINY[4:] + [
        "--pipeline-model-parallel-size", "2", "--global-batch-size", "8", "--pipeline-schedule", "interleaved",
        "--pipeline-model-parallel-layout", "Et|t|ttt|tL"]
    argv[argv.index("--seq-length") + 1] = "256"
    errs = run_distributed(_stage_worker, 2, [argv])
    assert errs[0][0][1] == 9 and errs[1][0][1] == 3
    for rank, values in errs.items():
        for err, _ in values:
            assert abs(err) < 0.04, (rank, err)
