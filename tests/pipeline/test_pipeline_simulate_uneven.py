"""The simulator with per-part costs: an uneven split (a layout, E-only / L-only stages) and the interleaved
schedule's microbatch groups (N > pp), against hand computations."""
import pytest

from megallama.pipeline.layout import parse_layout
from megallama.pipeline.partition import StageCosts
from megallama.pipeline.schedules import B, F, W, build_schedule
from megallama.pipeline.simulate import part_weights, simulate
from megallama.pipeline.timeline import render_text


def test_uneven_parts_makespan_by_hand():
    """pp 2, 2 chunks, m 2, parts (model order) cost [1, 3, 1, 1] x (F 1, B 2). Stage 0 runs parts 0 and 2, stage 1
    parts 1 and 3. Stage 0: F0p0 0-1, F1p0 1-2; stage 1: F0p1 1-4, F1p1 4-7; stage 0: F0p2 4-5, F1p2 7-8; stage 1:
    F0p3 7-8, B0p3 8-10, F1p3 10-11, B1p3 11-13; stage 0: B0p2 10-12, B1p2 13-15; stage 1: B0p1 13-19, B1p1 19-25;
    stage 0: B0p0 19-21, B1p0 25-27. Busy 12 + 24 of 2 x 27: bubble 1/3."""
    sched = build_schedule("interleaved", 2, 2, 2)
    tl = simulate(sched, {F: 1.0, B: 2.0}, [1, 3, 1, 1])
    assert tl.makespan == 27.0
    assert tl.busy == [12.0, 24.0]
    assert tl.bubble_fraction() == pytest.approx(1 / 3)
    assert [(s, e) for s, e, _ in tl.intervals[1]][:2] == [(1.0, 4.0), (4.0, 7.0)]
    # the even model, with the same total work (1.5 a part) or unit parts, predicts something else
    assert simulate(sched, {F: 1.0, B: 2.0}, [1.5] * 4).makespan == 22.5
    assert simulate(sched).makespan == 15.0
    assert simulate(sched, {F: 1.0, B: 2.0}, [1.5] * 4).bubble_fraction() < tl.bubble_fraction()


def test_part_weights_from_a_layout_and_the_cost_model():
    counts = parse_layout("Et|ttt|t|tL", 2, 6)
    assert counts == [1, 3, 1, 1]
    assert part_weights(counts) == [1, 3, 1, 1]
    assert part_weights(counts, StageCosts(embedding=0.5, head=2.0)) == [1.5, 3, 1, 3]
    moe = StageCosts(layers=(1, 2, 1, 2, 1, 2))  # each layer its own cost
    assert part_weights(counts, moe) == [1, 5, 1, 2]
    # E-only and L-only stages: zero-cost ops run, the drawing skips them
    sched = build_schedule("interleaved", 2, 4, 2)
    w = part_weights(parse_layout("E|tt|tt|L", 2, 4))
    assert w == [0, 2, 2, 0]
    tl = simulate(sched, None, w)
    assert tl.busy == [2 * 4 * 3.0, 2 * 4 * 3.0]  # 4 microbatches x (F 1 + B 2) x 2 layers on each stage
    assert "part weights ['0', '2', '2', '0']" in render_text(sched, part_costs=w)


def test_measured_part_costs_as_dicts_match_scaled_floats():
    sched = build_schedule("zb-h1", 3, 4)
    scale = [1.0, 2.0, 0.5]
    base = {F: 1.0, B: 3.0, W: 1.0}
    by_dict = simulate(sched, part_costs=[{k: v * s for k, v in base.items()} for s in scale])
    assert by_dict.makespan == simulate(sched, base, scale).makespan != simulate(sched, base).makespan
    with pytest.raises(ValueError, match="2 part costs for a schedule of 3"):
        simulate(sched, base, [1.0, 2.0])


@pytest.mark.parametrize("p,m,n", [(2, 8, 4), (2, 8, 8), (3, 6, 6)])
def test_group_size_raises_the_in_flight_count_as_schedules_says(p, m, n):
    """schedules.interleaved_1f1b: warm-up (p - stage - 1) * 2 + (v - 1) * N forwards, then one more before the
    first backward; so the peak is that + 1 (capped at v * m)."""
    v = 2
    got = simulate(build_schedule("interleaved", p, m, v, n)).peak_in_flight
    want = [min((p - s - 1) * 2 + (v - 1) * n + 1, v * m) for s in range(p)]
    assert got == want
    assert got != simulate(build_schedule("interleaved", p, m, v)).peak_in_flight
