"""Megatron's ``--pipeline-model-parallel-layout``: a string naming what every (virtual) pipeline stage holds.

Stages are separated by ``|`` in model order (stage k = virtual stage k // pp of pipeline rank k % pp, megallama's
part numbering too); ``E`` is the embedding, ``t`` a decoder layer, ``L`` the output layer and loss, ``m`` an MTP
layer; ``X*n`` and ``(...)*n`` repeat, commas are cosmetic: ``"Et*3|(tt|)*29,m|L"``. megallama places the
embedding on the first part and the loss on the last one always, so a layout is its decoder-layer count per part,
any counts, virtual stages included (``"Ett|t|t|tttL"``: pp 2, rank 0 holds [2, 1], rank 1 [1, 3]); the first
(last) part may hold the embedding (loss) alone, as in ``"E|(tt|)*7,L"``, and a part between them may hold nothing
(Megatron: "it is legal to have empty stages, e.g., E||t|L"): it passes its input on unchanged, forward and
backward, and a rank whose parts are all empty holds no parameters. ``parse_layout`` checks it as Megatron's
``PipelineParallelLayerLayout`` does, in one error line each.
"""
from __future__ import annotations

import re
from typing import List

from megallama.errors import ConfigError

FLAG = "--pipeline-model-parallel-layout"


def _unroll(text: str) -> str:
    """Megatron's two rewrites, in its order: ``(ab|)*2`` -> ``ab|ab|``, then ``t*3`` -> ``ttt``."""
    for pattern in (r"\(([^)]+)\)\*(\d+)", r"(.)\*(\d+)"):
        text = re.sub(pattern, lambda g: g.group(1) * int(g.group(2)), text)
    return text


def parse_layout(layout: str, pipeline_model_parallel_size: int, num_layers: int) -> List[int]:
    """Decoder layers of each model part (``pp x v`` of them, in model order) of a Megatron layout string."""
    stages = _unroll(layout.replace(",", "")).split("|")
    bad = sorted(set("".join(stages)) - set("EtLm"))
    if bad:
        raise ConfigError(f"{FLAG} '{layout}': unknown layer character(s) {' '.join(map(repr, bad))}; use E "
                          "(embedding), t (decoder layer), L (loss), | between stages, X*n and (...)*n to repeat")
    flat = "".join(stages)
    if "m" in flat:
        raise ConfigError(f"{FLAG} '{layout}' places MTP layers (m), which megallama's Llama has none of; drop them")
    pp = pipeline_model_parallel_size
    if len(stages) % pp:
        raise ConfigError(f"{FLAG} '{layout}' has {len(stages)} stages, not a multiple of "
                          f"--pipeline-model-parallel-size {pp}; give pp x (virtual stages per rank) stages")
    if flat.count("E") != 1 or flat.count("L") != 1 or not flat.startswith("E") or not flat.endswith("L"):
        raise ConfigError(f"{FLAG} '{layout}' must start with the embedding E and end with the loss L, once each "
                          "(e.g. 'Ett|tt|ttL')")
    if not stages[0].startswith("E") or not stages[-1].endswith("L"):  # Megatron's rule too
        where = "first" if not stages[0].startswith("E") else "last"
        raise ConfigError(f"{FLAG} '{layout}': the {where} stage is empty, but the embedding E opens the first stage "
                          "and the loss L closes the last one; only stages between them may be empty (e.g. 'Et||tL')")
    if flat.count("t") != num_layers:
        raise ConfigError(f"{FLAG} '{layout}' places {flat.count('t')} decoder layers (t) but the model has "
                          f"{num_layers}; make them match (or set --num-layers {flat.count('t')})")
    return [s.count("t") for s in stages]
