"""The tokenizer of a run, written next to an HF export so ``AutoTokenizer.from_pretrained(folder)`` reads it.

An imported HF model's ``tokenizer.json`` is copied with its configs; a run trained from scratch with
``--tokenizer-type hf`` gets it rewritten to start a text with the eod (below).
A sentencepiece ``.model`` (the bundled tokenizer, Llama 1/2) becomes ``tokenizer.model`` for HF's
``LlamaTokenizer``, which gives the same ids as sentencepiece except on runs of spaces at the start of a text
(HF's normalisation). Llama 3's tiktoken ranks file has no HF reader of its own: it is not written (Meta's HF
repositories ship the matching tokenizer.json).

The written tokenizer starts a text with the token ``tools/generate.py`` puts before a prompt (``prompt_token``):
a megallama run's documents follow an eod and have no bos, so it prepends the eod (as HF's bos_token); an imported
HF model keeps its bos. So HF ``generate`` on the exported folder sees the context megallama's generation sees.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Tuple

from megallama.data.tokenizer import build_tokenizer, checkpoint_tokenizer

_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def auto_prompt_prefix(saved_args: dict) -> str:
    """What generation_cli's ``--prompt-prefix auto`` puts before a plain prompt: "bos" for a model converted from
    HF or fine-tuned from one (``inherited_prompt_prefix``, set by training_setup from --pretrained-checkpoint),
    "eod" for a megallama-pretrained run (whose documents follow an eod)."""
    return saved_args.get("inherited_prompt_prefix") or ("bos" if saved_args.get("converted_from") else "eod")


def prompt_token(saved_args: dict, tok) -> Optional[int]:
    """The token ``auto_prompt_prefix`` names, for this tokenizer."""
    return tok.bos_id if auto_prompt_prefix(saved_args) == "bos" else tok.eod


def run_tokenizer(saved_args: dict):
    """The tokenizer a checkpoint's saved arguments name (none named: the bundled one)."""
    t, path = checkpoint_tokenizer(saved_args)
    return build_tokenizer(t or ("bundled" if path is None else "sentencepiece"), path)


def export_tokenizer(saved_args: dict, out_dir: str) -> Tuple[Optional[int], Optional[int], str]:
    """Write the run's tokenizer files into ``out_dir``; returns (bos id, eos id, a line saying what was done).
    The bos id is the token the written tokenizer prepends (an HF tokenizer.json's own bos; else
    ``prompt_token``), given even when no file could be written."""
    tok = run_tokenizer(saved_args)
    t, path = tok.tokenizer_type, tok.path  # canonical: Megatron's spellings (Llama2Tokenizer ...) mapped
    bos, eos = prompt_token(saved_args, tok), tok.eos_id
    if t == "hf":
        src = path if os.path.isdir(path) else os.path.dirname(path)
        file = path if os.path.isfile(path) else os.path.join(src, "tokenizer.json")
        if auto_prompt_prefix(saved_args) == "bos":  # an imported model's files, as they are (its own bos)
            for name in _HF_FILES[1:]:
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copy(os.path.join(src, name), os.path.join(out_dir, name))
            shutil.copy(file, os.path.join(out_dir, "tokenizer.json"))
            return tok.bos_id, eos, f"tokenizer: {file} (tokenizer.json)"
        piece = _eod_first_tokenizer_json(tok, src, out_dir)
        return bos, eos, f"tokenizer: {file} (tokenizer.json, which starts a text with {piece} as tools/generate.py does)"
    if t in ("bundled", "sentencepiece", "llama2"):
        model_file = tok.path
        shutil.copy(model_file, os.path.join(out_dir, "tokenizer.model"))
        sp = tok.sp
        cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": bos is not None and bos >= 0,
               "add_eos_token": False, "legacy": False, "model_max_length": _max_length(saved_args)}
        for key, i in (("bos_token", bos), ("eos_token", eos), ("unk_token", sp.unk_id())):
            if i is not None and i >= 0:
                cfg[key] = sp.id_to_piece(i)
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        first = f", which starts a text with {cfg['bos_token']} as tools/generate.py does" if "bos_token" in cfg else ""
        return bos, eos, f"tokenizer: {model_file} (sentencepiece, as tokenizer.model for HF's LlamaTokenizer{first})"
    return bos, eos, (f"tokenizer: not written ({t} ranks files have no HF reader; use the tokenizer.json of the "
                      "model's HF release)")


def _eod_first_tokenizer_json(tok, src: str, out_dir: str) -> str:
    """A run trained from scratch with an HF tokenizer saw documents after an eod, never after the file's bos: write
    its tokenizer.json with a post-processor that prepends the eod, and a config read by PreTrainedTokenizerFast
    (the tokenizer.json as is, which is what megallama tokenized with) naming the eod as bos."""
    from tokenizers.processors import TemplateProcessing
    piece = tok.tok.id_to_token(tok.eod)
    hf = tok.tok.__class__.from_str(tok.tok.to_str())  # a copy: the run's tokenizer object stays as it was
    hf.post_processor = TemplateProcessing(single=f"{piece} $A", pair=f"{piece} $A {piece} $B",
                                           special_tokens=[(piece, tok.eod)])
    hf.save(os.path.join(out_dir, "tokenizer.json"))
    cfg_file = os.path.join(src, "tokenizer_config.json")
    cfg = json.load(open(cfg_file, encoding="utf-8")) if os.path.isfile(cfg_file) else {}
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", bos_token=piece, add_bos_token=True,
               eos_token=tok.tok.id_to_token(tok.eos_id))
    if tok.pad_id is not None:
        cfg.setdefault("pad_token", tok.tok.id_to_token(tok.pad_id))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return piece


def _max_length(saved_args: dict) -> int:
    """The run's sequence length; a converted model (no run, no seq_length): its context, not a made-up 4096."""
    ctx = (saved_args.get("model_config") or {}).get("max_position_embeddings")
    return int(saved_args.get("seq_length") or ctx or 4096)
