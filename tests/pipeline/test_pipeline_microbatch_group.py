"""--microbatch-group-size-per-virtual-pipeline-stage N (Megatron's interleaved knob): microbatches go through each
virtual stage N at a time. The order is Megatron's (``get_schedule_table`` and its warm-up count), its checks are
Megatron's, every allowed layout runs without deadlock holding the warm-up's microbatches, and pp 2 x vpp 2 with
N = 4 trains like one process (gloo)."""
import pytest

from dist_utils import run_distributed
from megallama.errors import ConfigError
from megallama.memory_stage import _in_flight
from megallama.mpu import parallel_state as ps
from megallama.pipeline import allreduce_embedding_gradients, build_model_chunks, get_forward_backward_func
from megallama.pipeline.schedules import build_schedule, interleaved_1f1b, schedule_table, validate_schedule
from megallama.pipeline.simulate import simulate
from pp_harness import MBS, SEED, SEQ, check_against_reference, collect, forward_step, make_batches, reference, \
    tiny_config
from test_pipeline_schedules import _check_programs


def test_schedule_table_is_megatrons():
    # the example in megatron/core/pipeline_parallel/schedules.py: PP2 N3 M5 with VP2
    table = schedule_table(5, 2, 3)
    assert [m for m, _ in table] == [0, 1, 2, 0, 1, 2, 3, 4, 3, 4]
    assert [c for _, c in table] == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    assert schedule_table(4, 2, 2) == [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1)]  # N = pp


def test_order_is_megatrons():
    """p=2, v=2, N=3, m=5, by hand from Megatron's schedule: warm-up (p - rank - 1) * 2 + (v - 1) * N forwards
    of the table (5 on rank 0, 3 on rank 1), then one forward / one backward, backwards in table order on the
    mirrored chunk (chunk v-1-c), then the rest of the backwards."""
    stage0 = ["F0", "F1", "F2", "F0.1", "F1.1",
              "F2.1", "B0.1", "F3", "B1.1", "F4", "B2.1", "F3.1", "B0", "F4.1", "B1",
              "B2", "B3.1", "B4.1", "B3", "B4"]
    stage1 = ["F0", "F1", "F2",
              "F0.1", "B0.1", "F1.1", "B1.1", "F2.1", "B2.1", "F3", "B0", "F4", "B1", "F3.1", "B2", "F4.1", "B3.1",
              "B4.1", "B3", "B4"]
    assert [str(a) for a in interleaved_1f1b(2, 5, 0, 2, 3)] == stage0
    assert [str(a) for a in interleaved_1f1b(2, 5, 1, 2, 3)] == stage1
    sched = build_schedule("interleaved", 2, 5, 2, 3)
    assert [[str(a) for a in st] for st in sched.actions] == [stage0, stage1]
    # N = pp is the order megallama always ran (and the default)
    assert build_schedule("interleaved", 4, 8, 2, 4).actions == build_schedule("interleaved", 4, 8, 2).actions


@pytest.mark.parametrize("p, m, n, msg", [
    (2, 4, 1, r"should range in \[PP=2, M=4\]"), (4, 8, 9, r"should range in \[PP=4, M=8\]"),
    (4, 13, 6, "remainder of M=13 .* divided by N=6 should be 0, or larger than or equal to the pipeline-parallel "
               "size 4, but it is 1"), (3, 8, 6, "but it is 2")])
def test_megatrons_checks(p, m, n, msg):
    with pytest.raises(ConfigError, match=msg):
        build_schedule("interleaved", p, m, 2, n)
    build_schedule("interleaved", 4, 9, 2, 5)  # a last group of pp or more microbatches is allowed (9 % 5 = 4)


def test_group_size_is_for_the_interleaved_schedule():
    with pytest.raises(ConfigError, match="interleaved schedule, not '1f1b'"):
        build_schedule("1f1b", 2, 8, 1, 4)
    assert build_schedule("1f1b", 2, 8, 1, 2).actions == build_schedule("1f1b", 2, 8).actions  # N = pp: the default


def test_every_allowed_layout_runs_and_holds_its_warm_up():
    """No deadlock (simulated, and the blocking-send check of the plans), every op once, and the peak of
    microbatch-chunks in flight is the warm-up + 1, as the memory estimate prices it."""
    n_layouts = 0
    for p in (2, 3, 4):
        for v in (2, 3):
            for n in range(p + 1, 2 * p + 2):
                for m in range(n, 3 * n + 1):
                    if 0 < m % n < p:
                        continue
                    sched = build_schedule("interleaved", p, m, v, n)
                    validate_schedule(sched)
                    tl = simulate(sched)
                    want = [min(m * v, 2 * (p - s - 1) + (v - 1) * n + 1) for s in range(p)]
                    assert tl.peak_in_flight == want == [_in_flight("interleaved", p, s, m, v, n) for s in range(p)]
                    if m <= 8:
                        _check_programs(sched)
                        _check_programs(sched.forward_only())
                    n_layouts += 1
    assert n_layouts > 100


def _train(rank, world, runs):
    ps.initialize_model_parallel(1, world)
    out = {}
    for m, group in runs:
        chunks = build_model_chunks(tiny_config(4), seed=SEED, schedule="interleaved", num_layers_per_virtual_stage=1)
        fb = get_forward_backward_func(world, "interleaved", microbatch_group_size=group)
        losses = fb(forward_step, iter(make_batches(m)), chunks, m, SEQ, MBS)
        allreduce_embedding_gradients(chunks)
        out[(m, group)] = collect(chunks, losses, fb)
    return out


RUNS = [(4, 4), (6, 4), (4, None)]


@pytest.fixture(scope="module")
def trained():
    return run_distributed(_train, 2, RUNS)


@pytest.mark.parametrize("m", [4, 6])
def test_pp2_vpp2_group_of_4_matches_one_process(trained, m):
    ref_losses, ref_grads = reference(tiny_config(4), m)
    per_rank = {r: v[(m, 4)] for r, v in trained.items()}
    check_against_reference(per_rank, ref_losses, ref_grads, m, 2)
    # the runner held what the schedule says: warm-up (1 - rank) * 2 + 4 forwards, + 1 (capped at m * v)
    assert [per_rank[r]["peak"] for r in (0, 1)] == [min(2 * m, 7), 5]
    if m == 4:
        assert [trained[r][(4, None)]["peak"] for r in (0, 1)] == [5, 3]  # groups of pp = 2
