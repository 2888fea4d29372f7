#!/usr/bin/env python
"""Convert between HF Llama checkpoints (config.json + safetensors) and megallama checkpoints, both ways, exactly.

    python tools/convert_checkpoint.py hf-to-megallama --hf-dir Llama-3.2-1B --output ckpt/llama32_1b
    python tools/convert_checkpoint.py megallama-to-hf --load runs/my_run --output hf_out [--dtype bf16]

Names are HF's on both sides, so conversion is a change of container: tensors keep their bytes (and dtype unless
``--dtype`` asks otherwise), so HF -> megallama -> HF and megallama -> HF -> megallama are bit-exact. A megallama
checkpoint of any tp/pp/dp/ZeRO layout converts (its shards are assembled by name); a converted HF model loads
into any layout with ``--load`` (iteration 0, fresh optimizer) or ``--finetune``. Tensors stream one at a time, so
memory stays near one output file (``--max-shard-size``) even for 405B.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from typing import Dict, Iterator, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megallama.arg_parser import OneLineErrorParser  # noqa: E402
from megallama.checkpointing.hf_config import (hf_config_to_model_config, hf_shapes, model_config_to_hf_config,  # noqa: E402,F401
                                               read_hf_config)
from megallama.config import ModelConfig  # noqa: E402
from megallama.errors import ConfigError  # noqa: E402

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|"
                       r"input_layernorm|post_attention_layernorm)\.weight$")
_TOP = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # config.json facts our ModelConfig does not hold
# what tokenizer_export reads from an imported model's tokenizer folder: copied into the checkpoint with it
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_DIR = "tokenizer"  # inside the checkpoint (iter_0000000/tokenizer), recorded relative to it


def check_names(names, cfg: ModelConfig, source: str) -> None:
    """Every tensor the model needs is there, nothing unknown is (a tied lm_head copy is tolerated)."""
    need = set(hf_shapes(cfg)) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    names = set(names)
    missing = sorted(need - names)
    if missing:
        raise ConfigError(f"{source} lacks {len(missing)} tensors the config needs (first: {missing[0]}); the "
                          "checkpoint does not match its config")
    unknown = sorted(n for n in names - need if not (n == "lm_head.weight" or n.endswith("rotary_emb.inv_freq")))
    if unknown:
        raise ConfigError(f"{source} has tensors megallama's Llama does not (first: {unknown[0]}); not convertible")


def check_shapes(hf_dir: str, where: Dict[str, str], cfg: ModelConfig) -> None:
    """Every tensor has the shape config.json implies (safetensors headers), checked before anything is written."""
    need = hf_shapes(cfg)
    paths = {os.path.join(hf_dir, file) for file in where.values()}
    for path in sorted(p for p in paths if os.path.isfile(p)):  # a missing shard is reported when it is read
        with _safe_open(path) as f:
            for name in sorted(f.keys(), key=_natural):
                got = list(f.get_slice(name).get_shape())
                if name in need and tuple(got) != need[name]:
                    raise ConfigError(f"{path}: {name} has shape {got}, but config.json implies {list(need[name])}; "
                                      "the weights do not match their config.json (fix or re-download it)")


def refuse_existing(output: str) -> None:
    """Nothing is written over: an output that is a file or a non-empty directory is refused."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"--output {output} is a file; pick a new directory")
    if os.path.isdir(output) and os.listdir(output):
        raise ConfigError(f"--output {output} exists and is not empty; pick a new directory")


def _natural(name: str):
    m = _LAYER_RE.match(name)
    return (1, int(m.group(1)), name) if m else ((0 if name == "model.embed_tokens.weight" else 2), 0, name)


# ---------------------------------------------------------------- HF -> megallama
def _hf_weight_files(hf_dir: str) -> Dict[str, str]:
    """{tensor name: safetensors file} from model.safetensors or the sharded index."""
    idx = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(idx):
        try:
            with open(idx) as f:
                return dict(json.load(f)["weight_map"])
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{idx} is malformed ({e}); re-download the checkpoint") from None
    single = os.path.join(hf_dir, "model.safetensors")
    if not os.path.isfile(single):
        raise ConfigError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json; convert "
                          ".bin checkpoints to safetensors first")
    with _safe_open(single) as f:
        return {k: "model.safetensors" for k in f.keys()}


def require_safetensors():
    """The safetensors package (HF's weight files), an optional extra: missing, one line naming it and the install,
    raised before anything is read or written."""
    try:
        import safetensors.torch
    except ImportError:
        raise ConfigError("converting HF checkpoints needs the 'safetensors' package, which is not installed; "
                          "pip install -e \".[hf]\" (megallama's hf extra) or pip install safetensors") from None
    return safetensors


def _safe_open(path: str):
    """safetensors' reader, its errors on a damaged file (a cut download: "incomplete metadata") as one line."""
    st = require_safetensors()
    try:
        return st.safe_open(path, "pt")
    except st.SafetensorError as e:
        raise ConfigError(f"{path} is corrupt or incomplete ({e}); re-download it") from None


def hf_to_megallama(hf_dir: str, output: str, model_name: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None, max_file_bytes: int = 2 << 30) -> str:
    SafetensorError = require_safetensors().SafetensorError
    from megallama.checkpointing.full import write_full_checkpoint
    refuse_existing(output)
    created = not os.path.exists(output)
    hf = read_hf_config(hf_dir)
    cfg = hf_config_to_model_config(hf, model_name or os.path.basename(os.path.normpath(hf_dir)))
    where = _hf_weight_files(hf_dir)
    check_names(where, cfg, hf_dir)
    check_shapes(hf_dir, where, cfg)
    keep = [n for n in sorted(where, key=_natural)
            if not n.endswith("rotary_emb.inv_freq") and not (n == "lm_head.weight" and cfg.tie_word_embeddings)]

    def tensors() -> Iterator[Tuple[str, torch.Tensor]]:
        handles = {}
        try:
            for name in keep:
                file = where[name]
                if file not in handles:
                    path = os.path.join(hf_dir, file)
                    if not os.path.isfile(path):
                        raise ConfigError(f"{path} (listed in the index) is missing; the download is incomplete")
                    handles[file] = _safe_open(path)
                try:
                    t = handles[file].get_tensor(name)
                except SafetensorError as e:
                    raise ConfigError(f"{os.path.join(hf_dir, file)} is corrupt or incomplete ({e}); re-download "
                                      "it") from None
                yield name, (t.to(dtype) if dtype is not None else t)
        finally:
            handles.clear()

    args = {"model": cfg.name, "model_config": cfg.to_dict(), "converted_from": os.path.abspath(hf_dir),
            "hf_token_ids": {k: hf[k] for k in _TOKEN_IDS if hf.get(k) is not None}}  # written back on export
    recorded, files = folder_tokenizer(hf_dir, hf.get("bos_token_id"))
    args.update(recorded)
    try:
        return write_full_checkpoint(output, tensors(), args, iteration=0, max_file_bytes=max_file_bytes,
                                     files=files)
    except BaseException:  # what this run made, so that a re-run after fixing the input is not refused
        from megallama.checkpointing.files import checkpoint_dir
        shutil.rmtree(checkpoint_dir(output, 0) + ".tmp", ignore_errors=True)
        if created and os.path.isdir(output) and not os.listdir(output):
            os.rmdir(output)
        raise


def folder_tokenizer(hf_dir: str, bos_token_id: Optional[int] = None) -> Tuple[dict, Dict[str, str]]:
    """(arguments to record, {name in the checkpoint: file}) for the folder's tokenizer: its tokenizer.json, else a
    ``tokenizer.model`` (what an export of a sentencepiece run writes, Llama 1/2's releases; or a Llama 3 tiktoken
    ranks file), copied into the checkpoint with the configs the export reads, so that it outlives the folder
    (``checkpoint_tokenizer`` reads it by ``tokenizer_files``). A tokenizer.model folder whose bos is the
    tokenizer's eod (an export of a megallama run) keeps that run's prompt convention."""
    from megallama.data.tokenizer import build_tokenizer, tokenizer_model_kind
    present = [n for n in _TOKENIZER_FILES if os.path.isfile(os.path.join(hf_dir, n))]
    if "tokenizer.json" not in present and "tokenizer.model" not in present:
        return {}, {}
    out = {"tokenizer_files": TOKENIZER_DIR}
    files = {f"{TOKENIZER_DIR}/{n}": os.path.join(os.path.abspath(hf_dir), n) for n in present}
    if "tokenizer.json" not in present:
        model = os.path.join(hf_dir, "tokenizer.model")
        tok = build_tokenizer(tokenizer_model_kind(model), model)
        if bos_token_id is not None and bos_token_id == tok.eod != tok.bos_id:
            out["inherited_prompt_prefix"] = "eod"
    return out, files


# ---------------------------------------------------------------- megallama -> HF
def megallama_to_hf(load: str, output: str, dtype: Optional[torch.dtype] = None,
                    max_shard_bytes: int = 5 << 30, notes: Optional[list] = None,
                    tokenizer_type: Optional[str] = None, tokenizer_model: Optional[str] = None) -> str:
    """Write an HF folder; a LoRA run's adapters are merged into their weights, the run's tokenizer (or the one
    ``tokenizer_type``/``tokenizer_model`` name) is written beside them (``megallama.data.tokenizer_export``);
    config.json's token ids are those an imported HF model came with, else the tokenizer's; a run fine-tuned on
    chats gets their ``chat_template`` and its end-of-turn token among the eos ids. ``notes`` collects what was
    done, for the CLI."""
    save_file = require_safetensors().torch.save_file
    from megallama.checkpointing.full import model_tensor_names, open_checkpoint
    from megallama.data.tokenizer_export import export_chat_template, export_tokenizer
    from megallama.strategies import strategy_from_args
    notes = notes if notes is not None else []
    refuse_existing(output)  # before reading a 405B checkpoint, not after
    ckpt, common, reader = open_checkpoint(load)
    from megallama.checkpointing.files import tracker_gap
    from megallama.initialize import warn_rank_0
    gap = tracker_gap(load, ckpt)
    if gap:
        warn_rank_0(gap)
    cfg_dict = common.get("args", {}).get("model_config")
    if not cfg_dict:
        raise ConfigError(f"{ckpt} records no model config; it was not written by megallama")
    cfg = ModelConfig.from_dict(cfg_dict)
    saved = common.get("args", {})
    strategy = strategy_from_args(argparse.Namespace(**saved))
    if strategy.uses_moe:
        raise ConfigError(f"{ckpt} is a mixture-of-experts run: HF's Llama has no experts, so it does not convert; "
                          "export a dense run")
    lora = strategy.lora_config()
    all_names = model_tensor_names(common)
    names = sorted((n for n in all_names if ".lora_" not in n), key=_natural)
    check_names(names, cfg, ckpt)
    adapted = [n for n in names if n.replace(".weight", ".lora_A.weight") in all_names]
    out_dtype = dtype or next((getattr(torch, common["index"][n]["dtype"]) for n in names
                               if common["index"][n].get("dtype")), torch.float32)
    tmp = output.rstrip("/") + ".tmp"
    try:
        if tokenizer_type is not None or tokenizer_model is not None:
            saved = _with_tokenizer(saved, tokenizer_type, tokenizer_model, cfg.vocab_size, notes)
        too_big = None if tokenizer_type or tokenizer_model else _tokenizer_too_big(saved, cfg.vocab_size)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        shards, cur, size = [], {}, 0
        for name in names:
            t = reader.read(name)
            if lora is not None and name in adapted:  # W + (alpha / r) B A, in fp32, back in W's dtype
                a, b = (reader.read(name.replace(".weight", f".lora_{k}.weight"), torch.float32) for k in "AB")
                t = (t.float() + lora.scaling * (b @ a)).to(t.dtype)
            cur[name] = t.to(dtype) if dtype is not None else t
            size += t.numel() * cur[name].element_size()
            if size >= max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
        if cur or not shards:
            shards.append(cur)
        n = len(shards)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            for k, v in shard.items():
                weight_map[k] = fname
                total += v.numel() * v.element_size()
        if n > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        try:
            if too_big:
                raise ConfigError(too_big)
            bos, eos, said = export_tokenizer(saved, tmp)
        except ConfigError as e:  # the weights still export (a tokenizer path of another machine, say)
            bos, eos, said = None, None, f"tokenizer: not written ({e})"
        ids = dict({"bos_token_id": bos, "eos_token_id": eos}, **saved.get("hf_token_ids", {}))
        end_of_turn, chat_said = export_chat_template(saved, tmp)
        if end_of_turn is not None:  # HF generate and vLLM stop there, as Meta's Instruct configs list it
            old = ids["eos_token_id"]
            old = [] if old is None else list(old) if isinstance(old, (list, tuple)) else [old]
            ids["eos_token_id"] = old + [end_of_turn] if end_of_turn not in old else old
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(model_config_to_hf_config(cfg, out_dtype, ids), f, indent=2, sort_keys=True)
        notes.extend([said] + ([chat_said] if chat_said else []))
        notes.append(f"exported iteration {int(common.get('iteration', 0))} ({ckpt})")
        if adapted:
            notes.append(f"merged the LoRA adapters of {len(adapted)} weights (scaling alpha/r = {lora.scaling:g})")
        refuse_existing(output)  # written meanwhile
        if os.path.exists(output):
            os.rmdir(output)
        os.replace(tmp, output)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"could not write {output} ({e.strerror or e}); free space or pick another directory") \
            from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        reader.close()
    return output


def _tokenizer_too_big(saved: dict, model_vocab: int) -> Optional[str]:
    """Why the run's tokenizer cannot go with this model (its ids would index past the embedding), or None: a
    --mock-data run records no tokenizer, and the bundled one is larger than a small test vocabulary."""
    from megallama.data.tokenizer_export import run_tokenizer
    try:
        tok = run_tokenizer(saved)
    except ConfigError:
        return None  # export_tokenizer says why it cannot write it
    if tok.vocab_size <= model_vocab:
        return None
    return (f"the run's tokenizer '{tok.name}' has {tok.vocab_size} tokens but the model only {model_vocab}"
            f"{' (the run trained on --mock-data)' if saved.get('mock_data') else ''}; name the model's tokenizer "
            "with --tokenizer-type/--tokenizer-model")


def _with_tokenizer(saved: dict, tokenizer_type, tokenizer_model, model_vocab: int, notes: list) -> dict:
    """The saved arguments with the tokenizer flags in place of the recorded tokenizer, refused (as generation
    refuses it) when it is not one this model can have been trained with."""
    from megallama.data.tokenizer_export import run_tokenizer
    from megallama.generation_cli import check_tokenizer
    out = dict(saved, **{k: v for k, v in (("tokenizer_type", tokenizer_type), ("tokenizer_model", tokenizer_model))
                         if v is not None})
    if tokenizer_model is None and (tokenizer_type or "").lower() == "bundled":  # ours ships in the package: the
        out["tokenizer_model"] = None  # checkpoint's file (of another tokenizer, maybe gone) is not it
    warning = check_tokenizer(run_tokenizer(out), saved, model_vocab)
    if warning:
        notes.append(f"warning: {warning}")
    return out


# ---------------------------------------------------------------- CLI
def _size(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip().upper())
    if not m:
        raise ConfigError(f"--max-shard-size '{text}' is not a size like 5GB or 500MB")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser("convert_checkpoint", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-megallama", help="HF directory (config.json + safetensors) -> megallama checkpoint")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--output", required=True, help="megallama checkpoint directory (use it as --load/--finetune)")
    a.add_argument("--model-name", default=None, help="name recorded in the checkpoint (default: the directory)")
    a.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast (default: keep HF's dtype)")
    a.add_argument("--max-file-size", default="2GB")
    b = sub.add_parser("megallama-to-hf", help="megallama checkpoint (any layout) -> HF directory")
    b.add_argument("--load", required=True, help="a run directory (newest good checkpoint) or one iter_* directory")
    b.add_argument("--output", required=True)
    b.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast (default: keep the saved dtype)")
    b.add_argument("--max-shard-size", default="5GB")
    b.add_argument("--tokenizer-type", default=None, help="the tokenizer to write (default: the checkpoint's)")
    b.add_argument("--tokenizer-model", default=None, help="its file or folder (default: the checkpoint's)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dtype = _DTYPES[args.dtype] if args.dtype else None
        if args.direction == "hf-to-megallama":
            out = hf_to_megallama(args.hf_dir, args.output, args.model_name, dtype, _size(args.max_file_size))
            from megallama.checkpointing.full import saved_args
            saved = saved_args(out)  # its tokenizer_files made absolute
            cfg = ModelConfig.from_dict(saved["model_config"])
            print(f"wrote {out}\ntrain from it with: --load {args.output} --use-checkpoint-args [--finetune]"
                  f"{tokenizer_flags(saved)}\n(or name the shape yourself: {flags_for(cfg)})")
        else:
            notes = []
            out = megallama_to_hf(args.load, args.output, dtype, _size(args.max_shard_size), notes,
                                  args.tokenizer_type, args.tokenizer_model)
            print("\n".join([f"wrote {out}"] + notes))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def tokenizer_flags(saved: dict) -> str:
    """The model's own tokenizer as training flags, named in the hint so that the command says what it trains with
    (a --load without them takes the same one from the checkpoint; a folder without a tokenizer needs them)."""
    from megallama.data.tokenizer import checkpoint_tokenizer
    try:
        t, path = checkpoint_tokenizer(saved)
    except ConfigError:
        return " --tokenizer-type ... --tokenizer-model ... (the folder has no tokenizer: name the model's)"
    return f" --tokenizer-type {t} --tokenizer-model {path}" if t else ""


def flags_for(cfg: ModelConfig) -> str:
    """pretrain_llama.py flags that build exactly this model (so the checkpoint's shapes match)."""
    f = (f"--num-layers {cfg.num_layers} --hidden-size {cfg.hidden_size} --ffn-hidden-size {cfg.ffn_hidden_size} "
         f"--num-attention-heads {cfg.num_attention_heads} --num-query-groups {cfg.num_query_groups} "
         f"--vocab-size {cfg.vocab_size} --max-position-embeddings {cfg.max_position_embeddings} "
         f"--rope-theta {cfg.rope_theta} --norm-epsilon {cfg.norm_eps}")
    if not cfg.tie_word_embeddings:
        f += " --untie-embeddings-and-output-weights"
    return f


if __name__ == "__main__":
    sys.exit(main())
