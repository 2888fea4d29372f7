#!/usr/bin/env python
"""Instruction fine-tuning (SFT): ``torchrun --nproc_per_node N finetune_llama.py --model llama3_8b_instruct
--pretrained-checkpoint CKPT --data-path chat.jsonl --strategy lora --lora-rank 16 ...``.

Same flags and training loop as ``pretrain_llama.py``; what differs is the data and the start:

* data: a jsonl of ``{"messages": [{"role", "content"}, ...]}`` rows (or ShareGPT ``conversations``, TRL
  ``prompt``/``completion``, ``prompt``/``response``, Alpaca ``instruction``/``input``/``output``) in Meta's Llama 3
  or Llama 2 chat format (``--chat-template``; auto: the tokenizer's, a resume: the run's), loss only on the
  assistant answers, normalised by the answer tokens of the whole global batch (default: the bundled sample);
  one padded conversation per sample, or ``--sft-packing``;
* start: ``--pretrained-checkpoint`` is a megallama checkpoint of any layout, or an HF model folder
  (config.json + safetensors; converted once into ``pretrained_from_hf/`` under ``--save``, or under the working
  directory without one, again when its config or weights change);
  ``--load X --finetune`` means the same;
  its tokenizer (an HF folder's tokenizer.json, or the run's) unless ``--tokenizer-*`` name one, and with
  ``--use-checkpoint-args`` its shape;
* strategy: ``standard`` fine-tunes everything, ``lora`` adapters on a frozen base (``--save-adapter`` writes
  them in PEFT's layout; ``--load-adapter DIR`` starts them from such a folder, its rank/alpha/targets taken for
  unset --lora-* flags; a resume of this run loads its own checkpoint's adapters instead), ``moe``/``hybrid``
  upcycle the dense MLPs into experts.

``--dry-run`` prints this run's resolved flags (chat data, the pretrained model's tokenizer) and per-GPU memory
estimate, as ``megallama train --dry-run`` does for pretraining (``--gpus``/``--nodes`` plan a launch); it builds,
converts and writes nothing.
"""
import os
import sys
import time

from megallama.checkpointing.hf_config import is_hf_model_dir
from megallama.errors import ConfigError


_HF_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")


def hf_source_key(hf_dir: str) -> dict:
    """What a conversion depends on: the folder's resolved path, config.json's bytes, and each weight file's name,
    size and mtime (hashing the weights would take minutes on a large model; a re-export rewrites them, which
    changes their mtime). Two folders of the same name, or one re-exported in place, get different keys."""
    from megallama.data.tokenizer import file_sha256
    src = os.path.realpath(hf_dir)
    files = {}
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name.endswith(_HF_WEIGHT_SUFFIXES) and os.path.isfile(path):
            st = os.stat(path)
            files[name] = [st.st_size, st.st_mtime_ns]
    return {"source": src, "config_sha256": file_sha256(os.path.join(src, "config.json")), "weights": files}


def convert_hf_once(hf_dir: str, cache_root: str) -> str:
    """Convert an HF folder to a megallama checkpoint once (rank 0 writes, others wait for the finished dir). The
    cache directory is named by the folder's ``hf_source_key``, so a different or re-exported model is converted
    anew (next to the old conversion, which is left in place) instead of reusing stale weights."""
    import hashlib
    import json
    key = hf_source_key(hf_dir)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    out = os.path.join(cache_root, "pretrained_from_hf", f"{os.path.basename(key['source'])}-{digest}")
    done, source = os.path.join(out, "CONVERTED"), os.path.join(out, "SOURCE.json")
    if os.path.isfile(done):
        with open(source, encoding="utf-8") as f:
            if json.load(f) != key:
                raise ConfigError(f"{out} holds a conversion of another HF folder than {key['source']}; move it "
                                  "away (or pass another --save) so the folder is converted afresh")
        return out
    if int(os.environ.get("RANK", "0")) == 0:
        from megallama.initialize import print_rank_0
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
        from convert_checkpoint import hf_to_megallama
        print_rank_0(f"converting {key['source']} into {out} (reused while its config and weights are unchanged)")
        os.makedirs(out, exist_ok=True)
        hf_to_megallama(hf_dir, out)
        with open(source, "w", encoding="utf-8") as f:
            json.dump(key, f, indent=1, sort_keys=True)
        open(done, "w").close()
    else:
        while not os.path.isfile(done):
            time.sleep(1.0)
    return out


def prepare_finetune_args(args):
    """Chat data on, and the pretrained weights resolved (HF folders converted)."""
    args.chat_template = True
    from megallama.checkpointing import check_save_dir
    from megallama.training_setup import adopt_checkpoint_tokenizer, resumes_run
    # before an HF folder is converted into --save: a run there is resumed (--load) or kept. Before --load X
    # --finetune becomes --pretrained-checkpoint X, so that --load X --finetune --save X is told to drop --finetune
    # (as pretraining is) rather than to pass the --load it already has
    check_save_dir(args)
    if args.finetune and args.load and not args.pretrained_checkpoint:
        args.pretrained_checkpoint, args.load = args.load, None
    if not args.pretrained_checkpoint and not args.load:
        from megallama.initialize import print_rank_0
        print_rank_0("warning: no --pretrained-checkpoint (or --load): fine-tuning randomly initialised weights")
    if args.pretrained_checkpoint and not os.path.exists(args.pretrained_checkpoint) and resumes_run(args):
        _resume_without_pretrained(args)
    _follow_chat_format(args)
    if args.pretrained_checkpoint:
        _check_pretrained_path(args.pretrained_checkpoint)
        if is_hf_model_dir(args.pretrained_checkpoint) and not args.dry_run:  # a plan reads the folder as it is
            args.pretrained_checkpoint = convert_hf_once(args.pretrained_checkpoint, args.save or os.getcwd())
        if args.mock_data:
            pass  # random ids: no tokenizer to follow or match
        elif args.tokenizer_type is None and args.tokenizer_model is None:
            adopt_checkpoint_tokenizer(args, _saved_args(args.pretrained_checkpoint), "the pretrained checkpoint's")
        else:
            _check_named_tokenizer(args)
    return args


def _follow_chat_format(args) -> None:
    """The chat template of the checkpoint a run continues: a resume keeps its run's (another one is refused: the
    run would switch formats midway); a fine-tune of a chat-trained checkpoint takes its unless --chat-template says
    otherwise, which is warned about (the model unlearns the format it answers in)."""
    from megallama.checkpointing.files import holds_checkpoint
    from megallama.data.chat_templates import saved_chat_format
    from megallama.initialize import print_rank_0
    from megallama.training_setup import resumes_run
    if args.mock_data:
        return
    resume = resumes_run(args)
    source = args.load if resume else args.pretrained_checkpoint
    if not source or not holds_checkpoint(source):
        return
    theirs = saved_chat_format(_saved_args(source))
    if theirs is None or args.chat_format == theirs:
        return
    if args.chat_format == "auto":
        args.chat_format = theirs
        print_rank_0(f"chat template: {theirs}, as {source} trained with (--chat-template overrides it)")
    elif resume:
        raise ConfigError(f"--chat-template {args.chat_format}, but the run in --load {source} trained with "
                          f"{theirs}; drop --chat-template to resume in {theirs}, or fine-tune into a new --save "
                          f"with --pretrained-checkpoint {source} to switch formats")
    else:
        print_rank_0(f"warning: --chat-template {args.chat_format}, but {source} was chat-trained with {theirs}: "
                     f"the model learns the new format (drop --chat-template to keep {theirs})")


def _check_pretrained_path(path: str) -> None:
    """One line naming --pretrained-checkpoint (the checkpoint reader's own errors name --load) for a path that is
    missing, a file, or a --save-adapter folder (adapters alone, without the weights they adapt)."""
    fix = "pass a megallama checkpoint directory or an HF model folder"
    if not os.path.exists(path):
        raise ConfigError(f"--pretrained-checkpoint {path} does not exist; {fix}")
    if os.path.isfile(path):
        raise ConfigError(f"--pretrained-checkpoint {path} is a file; {fix} (the one that holds it)")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise ConfigError(f"--pretrained-checkpoint {path} holds LoRA adapters only (--save-adapter), not model "
                          "weights; pass the base model (base_model_name_or_path in its adapter_config.json) or the "
                          "LoRA run merged (tools/convert_checkpoint.py megallama-to-hf)")


def _resume_without_pretrained(args) -> None:
    """A resume reads no pretrained weight (the run's checkpoint holds them all, as Megatron's --pretrained-checkpoint
    is read only when --load has none), so a base deleted or moved since the start (cleaned off scratch, a node
    without it) is not needed: what the run took from it, the tokenizer and prompt convention, is in the run's own
    checkpoint, and the adapters keep its path as their base model."""
    from megallama.checkpointing.full import saved_args
    from megallama.data.tokenizer import checkpoint_tokenizer
    from megallama.data.tokenizer_export import auto_prompt_prefix
    from megallama.initialize import print_rank_0
    own = saved_args(args.load)
    print_rank_0(f"--pretrained-checkpoint {args.pretrained_checkpoint} is not there; not needed to resume "
                 f"{args.load}, whose checkpoint holds every weight")
    args.adapter_base_model = own.get("adapter_base_model") or os.path.abspath(args.pretrained_checkpoint)
    args.inherited_prompt_prefix = auto_prompt_prefix(own)
    args.pretrained_checkpoint = None
    if args.tokenizer_type is None and args.tokenizer_model is None and not args.mock_data:
        args.tokenizer_type, args.tokenizer_model = checkpoint_tokenizer(own)


def _saved_args(pretrained: str) -> dict:
    """The pretrained model's saved arguments; an HF folder not converted yet (--dry-run) as its conversion records
    them."""
    if is_hf_model_dir(pretrained):
        return {"converted_from": os.path.abspath(pretrained)}
    from megallama.checkpointing.full import saved_args
    return saved_args(pretrained)


def _check_named_tokenizer(args) -> None:
    """Tokenizer flags given: refuse one that is not the pretrained model's, whose ids would mean other words to it
    (generation's ``check_tokenizer``: the recorded fingerprint, else the vocabulary size)."""
    from megallama.data.tokenizer import build_tokenizer, checkpoint_tokenizer
    from megallama.generation_cli import check_tokenizer
    from megallama.initialize import print_rank_0
    saved = _saved_args(args.pretrained_checkpoint)
    if "model_config" not in saved:
        return
    tokenizer = build_tokenizer(args.tokenizer_type or "bundled", args.tokenizer_model)
    try:
        warning = check_tokenizer(tokenizer, saved, saved["model_config"]["vocab_size"])
    except ConfigError as e:
        try:
            theirs = " ".join(str(x) for x in checkpoint_tokenizer(saved) if x) or "bundled"
        except ConfigError:
            theirs = "its own"
        raise ConfigError(f"{str(e).split('; ')[0]}: {args.pretrained_checkpoint} was trained with tokenizer "
                          f"{theirs}; drop --tokenizer-type/--tokenizer-model to fine-tune with the checkpoint's"
                          ) from None
    if warning:
        print_rank_0(f"warning: {warning}")


def check_pretrained_shape(args) -> None:
    """Refuse, as the run's load would, a pretrained model of another shape than the planned one (a plan that
    printed a memory table for a model the checkpoint cannot fill would pass where the run fails). Its experts do
    not count: the run builds the strategy's own around the loaded weights."""
    import argparse

    from megallama.checkpointing import model_config_from_checkpoint
    from megallama.checkpointing.compat import check_compatible
    saved = model_config_from_checkpoint(args.pretrained_checkpoint).to_dict()
    as_saved = argparse.Namespace(**vars(args))
    as_saved.model_config = args.model_config.replace(num_experts=saved.get("num_experts") or 0)
    common = {"args": {"model": saved.get("name"), "model_config": saved}}
    check_compatible(common, as_saved, args.pretrained_checkpoint, finetune=True)


def dry_run(argv) -> None:
    """Print the fine-tuning run's resolved configuration and memory estimate for ``--gpus`` x ``--nodes``
    (default one process), as ``megallama train --dry-run`` does; the pretraining command would show another
    run (no chat data, the bundled tokenizer)."""
    from megallama.arguments import parse_args
    from megallama.autoconfig_args import follow_tokenizer
    from megallama.cli import _world
    from megallama.memory_advice import format_table
    from megallama.memory_args import estimate_for_args
    gpus, nodes = _world(argv)
    args = prepare_finetune_args(parse_args(argv, world_size=gpus * nodes))
    vocab = follow_tokenizer(args)
    if args.pretrained_checkpoint:
        check_pretrained_shape(args)
    lines = ["resolved configuration:"] + [f"  {k:40s} {getattr(args, k)}" for k in sorted(vars(args))
                                          if k != "model_config"]
    print("\n".join(lines + [f"  model_config {args.model_config.to_dict()}", f"  {vocab}", ""]))
    print(format_table(estimate_for_args(args, gpus, nodes)))


def main(argv=None) -> int:
    from megallama.arguments import parse_args
    from megallama.initialize import run_script
    from megallama.training import pretrain
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--dry-run" in argv:
        return run_script(lambda: dry_run(argv))
    return run_script(lambda: pretrain(prepare_finetune_args(parse_args(argv))))


if __name__ == "__main__":
    sys.exit(main())
