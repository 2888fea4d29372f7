"""Show what a pipeline schedule does: one row per stage, time left to right (like the Megatron/Chimera figures).

    python tools/pipeline_timeline.py --schedule 1f1b --stages 4 --microbatches 8
    python tools/pipeline_timeline.py --schedule interleaved --stages 4 --microbatches 8 --chunks 2
    python tools/pipeline_timeline.py --schedule chimera --stages 4 --microbatches 4 --png chimera.png
    python tools/pipeline_timeline.py --compare --stages 4 --microbatches 8   # bubble of every schedule
    python tools/pipeline_timeline.py --pipeline-model-parallel-size 2 --microbatches 8 \\
        --pipeline-model-parallel-layout 'Et|ttt|t|tL' --microbatch-group-size-per-virtual-pipeline-stage 4

Costs default to backward = 2 x forward (``--backward-cost``); ``--png`` needs matplotlib. The training script's
split flags take the same values here: a layout (``Ett|t|tt|tttL``, E-only / L-only stages) makes each part cost
its decoder layers, ``--model`` adds the embedding and output-layer costs (the partitioner's ``costs_from_config``)
and, without a layout, splits the layers as training does; with neither, every part costs the same. The vocabulary
is the one training builds for the same flags: the tokenizer's (bundled by default, or --tokenizer-type/-model),
padded to --tensor-model-parallel-size x --make-vocab-size-divisible-by, or --vocab-size (NullTokenizer's
--vocab-size V is its tokenizer's: V + 1 with the eod, padded, as training builds it).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallama.arg_parser import OneLineErrorParser  # noqa: E402
from megallama.errors import ConfigError  # noqa: E402
from megallama.pipeline.layout import FLAG as LAYOUT_FLAG  # noqa: E402
from megallama.pipeline.layout import _unroll, parse_layout  # noqa: E402
from megallama.pipeline.partition import StageCosts  # noqa: E402
from megallama.pipeline.schedules import SCHEDULES, build_schedule, normalize_schedule_name  # noqa: E402
from megallama.pipeline.simulate import part_weights, simulate, theoretical_bubble_fraction  # noqa: E402
from megallama.pipeline.timeline import render_png, render_text  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    ap = OneLineErrorParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schedule", "--pipeline-schedule", dest="schedule", default=None,
                    help=f"one of {', '.join(SCHEDULES)}; default 1f1b, interleaved for a layout with virtual stages")
    ap.add_argument("--stages", "--pipeline-model-parallel-size", dest="stages", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--chunks", "--num-virtual-stages-per-pipeline-rank", dest="chunks", type=int, default=None,
                    help="virtual chunks per stage (interleaved; default 2, or the layout's)")
    ap.add_argument(LAYOUT_FLAG, dest="layout", default=None, help="the training script's layout, e.g. 'Ett|t|tt|tttL' "
                    "(stages beyond --stages are virtual stages): each part costs its decoder layers")
    ap.add_argument("--microbatch-group-size-per-virtual-pipeline-stage", dest="group_size", type=int, default=None,
                    help="interleaved: N microbatches per virtual stage group (default: the stages)")
    ap.add_argument("--model", default=None, help="a named model (megallama.config): adds the embedding and output "
                    "layer costs; without a layout, the split training builds")
    ap.add_argument("--num-layers-per-virtual-pipeline-stage", dest="layers_per_chunk", type=int, default=None,
                    help="layers per model chunk, as training reads it: layers / (stages x this) chunks per stage, "
                    "the interleaved schedule")
    ap.add_argument("--num-layers", type=int, default=None, help="override the model's (or the layout's) layers")
    g = ap.add_argument_group("vocabulary (with --model; the embedding and output layer follow the tokenizer, as "
                              "in training)")
    g.add_argument("--vocab-size", type=int, default=None, help="the model's vocabulary as given (training's flag)")
    g.add_argument("--tokenizer-type", default=None, help="training's; default: the bundled tokenizer, as training")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer's vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer's merges.txt")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=None)
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="pads the vocabulary (tp x divisor)")
    g.add_argument("--mock-data", action="store_true", help="the model's vocabulary, as training on mock data")
    ap.add_argument("--seq-length", type=int, default=None, help="with --model: count attention scores in the costs")
    ap.add_argument("--forward-cost", type=float, default=1.0)
    ap.add_argument("--backward-cost", type=float, default=2.0, help="full backward; zb-h1 splits it B + W")
    ap.add_argument("--weight-grad-cost", type=float, default=1.0, help="W's share of the backward (zb-h1)")
    ap.add_argument("--png", help="also write a PNG timeline here (matplotlib)")
    ap.add_argument("--compare", action="store_true", help="print the bubble of every schedule instead")
    return ap


def _model_config(a):
    """--model as training builds it: its vocabulary follows the tokenizer training would load for these flags
    (autoconfig_args.follow_tokenizer, build_data's rule). Returns (config, the vocabulary line)."""
    from types import SimpleNamespace
    from megallama.autoconfig_args import follow_tokenizer
    from megallama.config import get_model_config
    from megallama.data.gpt2_tokenizer import gpt2_flags_to_model
    ns = SimpleNamespace(model=a.model, vocab_size=a.vocab_size, mock_data=a.mock_data, use_checkpoint_args=False,
                         tokenizer_type=a.tokenizer_type, tensor_model_parallel_size=a.tensor_model_parallel_size,
                         make_vocab_size_divisible_by=a.make_vocab_size_divisible_by,
                         tokenizer_model=gpt2_flags_to_model(a.tokenizer_type, a.tokenizer_model, a.vocab_file,
                                                             a.merge_file),
                         model_config=get_model_config(a.model, num_layers=a.num_layers, vocab_size=a.vocab_size))
    line = follow_tokenizer(ns)
    return ns.model_config, line


def _chunks_from_layers(a, cfg) -> None:
    """--num-layers-per-virtual-pipeline-stage N -> --chunks, as training's derive_pipeline reads it."""
    n = a.layers_per_chunk
    if n is None:
        return
    flag = f"--num-layers-per-virtual-pipeline-stage {n}"
    if a.chunks is not None:
        raise ConfigError(f"--num-virtual-stages-per-pipeline-rank {a.chunks} and {flag} both set the interleaving; "
                          "pass one")
    if a.schedule not in (None, "interleaved"):
        raise ConfigError(f"{flag} needs the interleaved schedule, but --schedule {a.schedule} was given; drop one "
                          "of the two")
    layers = cfg.num_layers if cfg is not None else a.num_layers
    if layers is None:
        raise ConfigError(f"{flag} needs the layer count: add --model or --num-layers")
    if n < 1 or layers % a.stages or (layers // a.stages) % n:
        raise ConfigError(f"{flag} does not split {layers} layers over {a.stages} pipeline stages "
                          f"({layers / a.stages:g} per stage); pick a value dividing the layers per stage")
    a.chunks, a.schedule = layers // (a.stages * n), "interleaved"


_THEORY = {"interleaved": "(p-1)/(v*m+p-1)", "zb-h1": "(p-1)/(3m+p-1)", "chimera": "(p-2)/(2m+p-2)"}
_ASSUMES = {"zb-h1": "F = B = W", "chimera": "F = B"}  # op costs their closed forms are exact for


def _theory_note(name: str, costs: dict) -> str:
    """Which closed form the "theory" number is: each schedule has its own, for equal parts (and op costs)."""
    name = normalize_schedule_name(name)
    off = {"zb-h1": costs["F"] != costs["B"] - costs["W"] or costs["F"] != costs["W"],
           "chimera": costs["F"] != costs["B"]}.get(name, False)
    return (f"theory: {name}'s {_THEORY.get(name, '(p-1)/(m+p-1)')}, for equal parts"
            + (f" and {_ASSUMES[name]}" if name in _ASSUMES else "")
            + ("; these op costs differ, the simulated bubble is the one for them" if off else ""))


def _split(a, cfg):
    """(layer counts per part or None, virtual chunks from the layout or None)."""
    if a.layout is None:
        return None, None
    layers = a.num_layers or (cfg.num_layers if cfg else _unroll(a.layout.replace(",", "")).count("t"))
    counts = parse_layout(a.layout, a.stages, layers)
    return counts, len(counts) // a.stages


def _plan(a, name, cfg, counts, layout_v):
    """(schedule, part weights or None, group size) for one schedule name."""
    name = normalize_schedule_name(name)
    if layout_v is not None and (layout_v > 1) != (name == "interleaved"):
        raise ConfigError(f"{LAYOUT_FLAG} '{a.layout}' lists {layout_v} stage(s) per rank, which schedule '{name}' "
                          "does not run (interleaved needs virtual stages, the others one stage per rank)")
    v = layout_v or ((a.chunks or 2) if name == "interleaved" else 1)
    n = a.group_size if name == "interleaved" else None
    sched = build_schedule(name, a.stages, a.microbatches, v, n)
    costs = None
    if cfg is not None:
        from megallama.pipeline.partition import costs_from_config
        costs = costs_from_config(cfg, a.seq_length)
        if counts is None and a.stages > 1:
            from megallama.pipeline.model_chunks import model_parts
            counts = [len(p) for p in model_parts(cfg, a.stages, name, seq_length=a.seq_length,
                                                  num_virtual_stages=v if v > 1 else None)]
    if counts is None:
        return sched, None, n
    return sched, part_weights(counts, costs or StageCosts()), n


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    costs = {"F": a.forward_cost, "B": a.backward_cost, "W": a.weight_grad_cost}
    try:
        cfg = vocab_line = None
        if a.model:
            cfg, vocab_line = _model_config(a)
        _chunks_from_layers(a, cfg)
        counts, layout_v = _split(a, cfg)
        if a.compare:
            print(f"{'schedule':12s} {'bubble':>8s} {'theory':>8s}  peak activations per stage")
            for name in SCHEDULES:
                if layout_v is not None and (layout_v > 1) != (name == "interleaved"):
                    continue  # the layout's stages per rank fit interleaved only, or only the others
                sched, weights, _ = _plan(a, name, cfg, counts, layout_v)
                tl = simulate(sched, costs, weights)
                th = theoretical_bubble_fraction(name, a.stages, a.microbatches, sched.num_chunks)
                print(f"{name:12s} {tl.bubble_fraction():8.3f} {th:8.3f}  {tl.peak_in_flight}")
            print("theory: each schedule's closed form for equal parts: (p-1)/(m+p-1) gpipe and 1f1b, "
                  f"{_THEORY['interleaved']} interleaved, {_THEORY['zb-h1']} zb-h1 (F = B = W), "
                  f"{_THEORY['chimera']} chimera (F = B)", file=sys.stderr)
            if vocab_line:  # notes under the table: stdout stays the table
                print(f"{a.model} {vocab_line}", file=sys.stderr)
            return 0
        default = "interleaved" if (layout_v or 1) > 1 else "1f1b"
        sched, weights, n = _plan(a, a.schedule or default, cfg, counts, layout_v)
        print(render_text(sched, costs, part_costs=weights, group_size=n))
        print(_theory_note(sched.name, costs))
        if vocab_line:
            print(f"{a.model} {vocab_line}")
        if a.png:
            try:
                print(f"wrote {render_png(sched, a.png, costs, weights)}")
            except ImportError:
                print("--png needs matplotlib (pip install matplotlib); the text timeline is above", file=sys.stderr)
                return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
