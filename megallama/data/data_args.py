"""Megatron's data flags resolved into blends: ``--data-args-path FILE`` (a file holding the --data-path value, for
blends too long for a command line), ``--train/--valid/--test-data-path`` (each a blend of whole corpora, written as
--data-path's are) and ``--per-split-data-args-path FILE.json`` (the three in one file). The two ways of giving data
(one blend split by --split, or a blend per split) exclude each other, as in Megatron (get_blend_and_blend_per_split
and validate_args); each mix is refused in one line.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from megallama.data.blended_dataset import parse_data_blend
from megallama.errors import ConfigError

SPLITS = ("train", "valid", "test")
PER_SPLIT_FLAGS = "--train-data-path/--valid-data-path/--test-data-path"
_JSON_SHAPE = '{"train": ["0.3", "web_text_document", "0.7", "code_text_document"], "valid": [...], "test": [...]}'


def resolve_data_args(args) -> None:
    """--data-args-path -> args.data_path/data_blend; the per-split flags -> args.data_blend_per_split ({split:
    [(weight or None, path)] or None}, None without per-split data). Refuses Megatron's forbidden mixes. Once per
    args (the per-split paths a JSON file gives are filled in, so a second call would see both)."""
    if hasattr(args, "data_blend_per_split"):
        return
    file = getattr(args, "data_args_path", None)
    if file:
        if args.data_path:
            raise ConfigError(f"--data-path and --data-args-path {file} both give the data; pass one (the file holds "
                              "the --data-path value)")
        values = read_data_args(file)
        args.data_blend = parse_data_blend(values, f"--data-args-path {file}") if len(values) > 1 else None
        args.data_path = " ".join(values)
    args.data_blend_per_split = blends = data_blend_per_split(args)
    if blends is None:
        return
    if getattr(args, "per_split_data_args_path", None):  # seen as given (validation at the end, saved args)
        for split in SPLITS:
            setattr(args, f"{split}_data_path", [p for _, p in blends[split]] if blends[split] else None)
    if "split" in (getattr(args, "given_flags", None) or ()):
        raise ConfigError(f"--split divides --data-path's corpora, but {_per_split_source(args)} gives whole "
                          "corpora per split; drop --split")


def data_blend_per_split(args) -> Optional[Dict[str, Optional[list]]]:
    """{split: blend or None} from --train/--valid/--test-data-path or --per-split-data-args-path; None without
    either. A blend is [(weight or None, path)] (None: weighted by size, as Megatron's prefixes without weights)."""
    flags = {s: getattr(args, f"{s}_data_path", None) for s in SPLITS}
    file = getattr(args, "per_split_data_args_path", None)
    if file and any(flags.values()):
        raise ConfigError(f"{PER_SPLIT_FLAGS} and --per-split-data-args-path both give the per-split data; pass one")
    if not file and not any(flags.values()):
        return None
    if args.data_path or getattr(args, "data_blend", None):
        data = "--data-args-path" if getattr(args, "data_args_path", None) else "--data-path"
        raise ConfigError(f"pass {data} (split by --split) or {_per_split_source(args)}, not both")
    if file:
        values = read_per_split_data_args(file)
        where = {s: f'--per-split-data-args-path {file} "{s}"' for s in SPLITS}
    else:
        values = {s: [v] if isinstance(v, str) else list(v or []) for s, v in flags.items()}
        where = {s: f"--{s}-data-path" for s in SPLITS}
        if not values["train"]:
            raise ConfigError("--valid-data-path/--test-data-path need --train-data-path (the corpus to train on)")
    blends = {}
    for split in SPLITS:
        v = values[split]
        blends[split] = None if not v else [(None, v[0])] if len(v) == 1 else parse_data_blend(v, where[split])
        for _, path in blends[split] or []:
            if not corpus_exists(path):
                raise ConfigError(f"{where[split]}: {path} not found; pass an existing .jsonl file or the prefix of "
                                  "a .bin/.idx pair (for x_text_document.bin/.idx pass x_text_document)")
    return blends


def _per_split_source(args) -> str:
    return "--per-split-data-args-path" if getattr(args, "per_split_data_args_path", None) else PER_SPLIT_FLAGS


def read_data_args(path: str) -> List[str]:
    """The --data-path value a --data-args-path file holds (whitespace-separated, as Megatron reads it)."""
    values = _read(path, "--data-args-path").split()
    if not values:
        raise ConfigError(f"--data-args-path {path} is empty; write the --data-path value in it, e.g. "
                          "0.3 web_text_document 0.7 code_text_document")
    return values


def read_per_split_data_args(path: str) -> Dict[str, List[str]]:
    """{split: [values]} from a --per-split-data-args-path JSON file: each split a list (or a whitespace-separated
    string, as Megatron takes) of --data-path values, or null / absent for none; "train" is required."""
    flag = f"--per-split-data-args-path {path}"
    try:
        data = json.loads(_read(path, "--per-split-data-args-path"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} is not JSON ({e.msg} at line {e.lineno}); write {_JSON_SHAPE}") from None
    if not isinstance(data, dict) or not data.get("train"):
        raise ConfigError(f'{flag} has no "train" blend; write {_JSON_SHAPE}')
    unknown = sorted(set(data) - set(SPLITS))
    if unknown:
        raise ConfigError(f"{flag} has keys {', '.join(unknown)}; the keys are train, valid and test")
    out = {}
    for split in SPLITS:
        v = data.get(split)
        if isinstance(v, str):
            v = v.split()
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, (str, int, float)) for x in v)):
            raise ConfigError(f'{flag} "{split}" is {json.dumps(v)}; give a list of weights and paths (or a '
                              "string of them, or null)")
        out[split] = [str(x) for x in v or []]
    return out


def _read(path: str, flag: str) -> str:
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path}: no such file; pass the file that holds the data paths")
    with open(path, encoding="utf-8") as f:
        return f.read()


def corpus_exists(data: str) -> bool:
    """What the dataset builders open: a (jsonl) file, or a .bin/.idx prefix (or either file of the pair)."""
    from megallama.data.gpt_dataset import existing_prefix
    return (os.path.isfile(data) and not data.endswith((".bin", ".idx"))) or existing_prefix(data) is not None
