"""Show what a pipeline schedule does: one row per stage, time left to right (like the Megatron/Chimera figures).

    python tools/pipeline_timeline.py --schedule 1f1b --stages 4 --microbatches 8
    python tools/pipeline_timeline.py --schedule interleaved --stages 4 --microbatches 8 --chunks 2
    python tools/pipeline_timeline.py --schedule chimera --stages 4 --microbatches 4 --png chimera.png
    python tools/pipeline_timeline.py --compare --stages 4 --microbatches 8   # bubble of every schedule

Costs default to backward = 2 x forward (``--backward-cost``); ``--png`` needs matplotlib.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallama.errors import ConfigError  # noqa: E402
from megallama.pipeline.schedules import SCHEDULES, build_schedule  # noqa: E402
from megallama.pipeline.simulate import simulate, theoretical_bubble_fraction  # noqa: E402
from megallama.pipeline.timeline import render_png, render_text  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", default="1f1b", help=f"one of {', '.join(SCHEDULES)}")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=2, help="virtual chunks per stage (interleaved)")
    ap.add_argument("--forward-cost", type=float, default=1.0)
    ap.add_argument("--backward-cost", type=float, default=2.0, help="full backward; zb-h1 splits it B + W")
    ap.add_argument("--weight-grad-cost", type=float, default=1.0, help="W's share of the backward (zb-h1)")
    ap.add_argument("--png", help="also write a PNG timeline here (matplotlib)")
    ap.add_argument("--compare", action="store_true", help="print the bubble of every schedule instead")
    a = ap.parse_args(argv)
    costs = {"F": a.forward_cost, "B": a.backward_cost, "W": a.weight_grad_cost}
    try:
        if a.compare:
            print(f"{'schedule':12s} {'bubble':>8s} {'theory':>8s}  peak activations per stage")
            for name in SCHEDULES:
                v = a.chunks if name == "interleaved" else 1
                tl = simulate(build_schedule(name, a.stages, a.microbatches, v), costs)
                th = theoretical_bubble_fraction(name, a.stages, a.microbatches, v)
                print(f"{name:12s} {tl.bubble_fraction():8.3f} {th:8.3f}  {tl.peak_in_flight}")
            return 0
        v = a.chunks if a.schedule.lower().startswith("interleaved") else 1
        sched = build_schedule(a.schedule, a.stages, a.microbatches, v)
        print(render_text(sched, costs))
        if a.png:
            try:
                print(f"wrote {render_png(sched, a.png, costs)}")
            except ImportError:
                print("--png needs matplotlib (pip install matplotlib); the text timeline is above", file=sys.stderr)
                return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
