"""Draw a schedule's timeline like the figures of the Megatron and Chimera papers: text, or a PNG (matplotlib).

One row per stage, time left to right, one cell per time unit; a cell shows the op kind and microbatch
(``F3`` forward of microbatch 3, ``b3``/``B3`` backward, ``w3`` weight grads), ``.`` is idle. Chunks other than
0 are marked with a letter suffix (``F3b`` = chunk 1) so interleaved and Chimera's two pipelines stay readable.
``part_costs`` (see ``simulate``) draws an uneven split to scale; the text keeps at most ``MAX_CELLS`` cells a row,
so an op far shorter than the longest (an E-only part) takes one cell, or none when it costs nothing.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

from megallama.pipeline.schedules import PipelineSchedule
from megallama.pipeline.simulate import Timeline, simulate, theoretical_bubble_fraction

MAX_CELLS = 240


def _label(a) -> str:
    return f"{a.kind}{a.microbatch}" + ("" if a.chunk == 0 else "abcdefghijklmnopqrstuvwxyz"[a.chunk])


def render_text(sched: PipelineSchedule, costs: Optional[Dict[str, float]] = None, timeline: Timeline = None,
                part_costs: Optional[Sequence] = None, group_size: Optional[int] = None) -> str:
    """``group_size`` only labels the header (the schedule already holds its order)."""
    tl = timeline or simulate(sched, costs, part_costs)
    unit = max(min(e - s for st in tl.intervals for s, e, _ in st if e > s), tl.makespan / MAX_CELLS)
    width = max(len(_label(a)) for st in tl.intervals for _, _, a in st) + 1
    n_cells = int(math.ceil(tl.makespan / unit - 1e-9))
    rows = []
    for s, st in enumerate(tl.intervals):
        cells = ["." * (width - 1)] * n_cells
        for t0, t1, a in st:
            if t1 <= t0:
                continue
            first = min(int(round(t0 / unit)), n_cells - 1)
            last = min(max(int(round(t1 / unit)), first + 1), n_cells)
            for c in range(first, last):
                cells[c] = _label(a) if c == first else "-" * (width - 1)
        rows.append(f"stage {s:>2} | " + " ".join(c.ljust(width - 1) for c in cells))
    v = sched.num_chunks if sched.name == "interleaved" else 1
    head = (f"{sched.name}: {sched.num_stages} stages, {sched.num_microbatches} microbatches"
            + (f", {v} chunks per stage" if v > 1 else "")
            + (f", groups of {group_size} microbatches" if group_size and v > 1 else "") + f"; op costs {tl.op_cost}"
            + (f" x part weights {[_fmt(w) for w in part_costs]}" if part_costs is not None else ""))
    theory = theoretical_bubble_fraction(sched.name, sched.num_stages, sched.num_microbatches, v)
    foot = (f"bubble {tl.bubble_fraction():.3f} ({'even-split ' if part_costs is not None else ''}theory {theory:.3f})"
            f"; peak activations in flight per stage {tl.peak_in_flight}")
    return "\n".join([head] + rows + [foot])


def _fmt(w) -> str:
    return f"{w:.3g}" if isinstance(w, (int, float)) else str(w)


def render_png(sched: PipelineSchedule, path: str, costs: Optional[Dict[str, float]] = None,
               part_costs: Optional[Sequence] = None) -> str:
    """Coloured boxes per op (forwards blue, backwards green, weight grads orange; later chunks lighter)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tl = simulate(sched, costs, part_costs)
    colors = {"F": (0.22, 0.42, 0.80), "B": (0.20, 0.63, 0.32), "W": (0.95, 0.60, 0.20)}
    fig, ax = plt.subplots(figsize=(min(30.0, max(6.0, tl.makespan * 0.35)), 0.5 * sched.num_stages + 1.2))
    for s, st in enumerate(tl.intervals):
        for t0, t1, a in st:
            r, g, b = colors[a.kind]
            k = 0.35 * a.chunk / max(1, sched.num_chunks - 1) if sched.num_chunks > 1 else 0.0
            ax.broken_barh([(t0, t1 - t0)], (s - 0.4, 0.8), facecolors=(r + (1 - r) * k, g + (1 - g) * k,
                                                                       b + (1 - b) * k), edgecolor="black")
            ax.text((t0 + t1) / 2, s, str(a.microbatch), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(sched.num_stages))
    ax.set_yticklabels([f"stage {s}" for s in range(sched.num_stages)])
    ax.invert_yaxis()
    ax.set_xlabel("time (op cost units)")
    ax.set_title(f"{sched.name}: p={sched.num_stages}, m={sched.num_microbatches}, bubble "
                 f"{tl.bubble_fraction():.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
