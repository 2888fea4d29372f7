"""The tokenizer of a run, written next to an HF export so ``AutoTokenizer.from_pretrained(folder)`` reads it.

An HF ``tokenizer.json`` (an imported HF model's, or ``--tokenizer-type hf``) is copied with its configs.
A sentencepiece ``.model`` (the bundled tokenizer, Llama 1/2) becomes ``tokenizer.model`` for HF's
``LlamaTokenizer``, which gives the same ids as sentencepiece except on runs of spaces at the start of a text
(HF's normalisation). Llama 3's tiktoken ranks file has no HF reader of its own: it is not written (Meta's HF
repositories ship the matching tokenizer.json).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Tuple

from megallama.data.tokenizer import build_tokenizer, checkpoint_tokenizer

_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_tokenizer(saved_args: dict, out_dir: str) -> Tuple[Optional[int], Optional[int], str]:
    """Write the run's tokenizer files into ``out_dir``; returns (bos id, eos id, a line saying what was done).
    The ids are the tokenizer's even when no file could be written."""
    t, path = checkpoint_tokenizer(saved_args)
    t = (t or ("bundled" if path is None else "sentencepiece")).lower()
    tok = build_tokenizer(t, path)
    bos, eos = tok.bos_id, tok.eos_id
    if t == "hf":
        src = path if os.path.isdir(path) else os.path.dirname(path)
        file = path if os.path.isfile(path) else os.path.join(src, "tokenizer.json")
        shutil.copy(file, os.path.join(out_dir, "tokenizer.json"))
        for name in _HF_FILES[1:]:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), os.path.join(out_dir, name))
        return bos, eos, f"tokenizer: {file} (tokenizer.json)"
    if t in ("bundled", "sentencepiece", "llama2"):
        model_file = tok.path
        shutil.copy(model_file, os.path.join(out_dir, "tokenizer.model"))
        sp = tok.sp
        cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
               "model_max_length": int(saved_args.get("seq_length") or 4096)}
        for key, i in (("bos_token", bos), ("eos_token", eos), ("unk_token", sp.unk_id())):
            if i is not None and i >= 0:
                cfg[key] = sp.id_to_piece(i)
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        return bos, eos, f"tokenizer: {model_file} (sentencepiece, as tokenizer.model for HF's LlamaTokenizer)"
    return bos, eos, (f"tokenizer: not written ({t} ranks files have no HF reader; use the tokenizer.json of the "
                      "model's HF release)")
