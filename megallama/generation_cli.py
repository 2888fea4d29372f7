"""``megallama generate`` / ``tools/generate.py``: sample text from a checkpoint; the model, tokenizer and
strategy (LoRA, MoE) are read from the checkpoint.

    python tools/generate.py --load checkpoints/tiny --prompt "The module" --max-new-tokens 40
    python tools/generate.py --load runs/sft --chat --prompt "How do I open a file?" --greedy
    python tools/generate.py --load runs/sft --chat --system-prompt "Be brief." --prompt "Name a color."
    python tools/generate.py --load ckpt/base --load-adapter runs/sft_adapter --prompt "..."  # base + LoRA folder
    torchrun --nproc_per_node 2 tools/generate.py --load ckpt/llama32_1b --prompt "..."   # tensor parallel 2

From Python: ``loaded = load_for_generation("checkpoints/tiny")`` then ``generate_text(loaded, ["The module"],
SamplingConfig(max_new_tokens=40))``; with ``chat=True`` a prompt may be a conversation, HF-style:
``[[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]]``.

Any megallama checkpoint loads (any training layout; an HF model after ``tools/convert_checkpoint.py
hf-to-megallama``, with the tokenizer.json of the folder it came from unless ``--tokenizer-*`` say otherwise). The
ranks of a torchrun launch split the model tensor-parallel. Prompts run in batches of ``--batch-size``, left-padded
to the batch's longest. ``--chat`` wraps each prompt as a user turn (after ``--system-prompt``'s system turn)
of the chat template the run trained with (Llama 3 or Llama 2, recorded in the checkpoint; a model that never
trained on chats: the one its tokenizer names, with a warning) and stops at the end of the assistant's turn
(<|eot_id|>, Llama 2's </s>). ``--greedy`` with a sampling flag (--temperature, --top-k, --top-p) is refused: one
of them would be ignored.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional


def build_arg_parser() -> argparse.ArgumentParser:
    from megallama.arg_parser import OneLineErrorParser  # a mistyped flag is one line, not the 13-line usage first
    p = OneLineErrorParser(prog="megallama generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint directory (a run's --save directory or one iter_*)")
    p.add_argument("--load-adapter", default=None, metavar="DIR", help="a LoRA adapter folder (--save-adapter's or "
                   "HF peft's) applied to the --load model, which is then its base: the output equals the fine-tuned "
                   "run's")
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompt-file", help="one prompt a line")
    p.add_argument("--chat", action="store_true", help="chat template: the prompt is the user's turn")
    p.add_argument("--chat-template", choices=["auto", "llama3", "llama2"], default="auto",
                   help="with --chat; auto: the one the checkpoint trained with, else the tokenizer's")
    p.add_argument("--system-prompt", default=None, metavar="TEXT", help="with --chat: a system turn before each "
                   "prompt (Llama 2 folds it into the first user turn)")
    p.add_argument("--prompt-prefix", choices=["auto", "bos", "eod", "none"], default="auto",
                   help="token before a plain prompt. auto: bos for a converted HF model; eod for a megallama run")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="argmax (the same as --temperature 0); refused with "
                   "sampling flags")
    p.add_argument("--temperature", type=float, default=None, help="default 1; 0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together (left-padded)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--tokenizer-type", default=None, help="override the checkpoint's")
    p.add_argument("--tokenizer-model", default=None, help="override the checkpoint's")
    p.add_argument("--decode-mode", choices=["auto", "eager", "static", "graph"], default="auto",
                   help="auto: one CUDA graph per batch on GPUs (dense models), else eager")
    p.add_argument("--no-fused-kernels", action="store_true")
    return p


def run_args(opts, saved: dict, world: int):
    """The training arguments the checkpoint was saved with, on defaults, re-laid out for generation."""
    import torch
    from megallama.arguments import build_parser
    from megallama.config import ModelConfig
    args = build_parser().parse_args([])
    known = vars(args).keys()
    for k, v in saved.items():
        if k in known and k != "model_config":
            setattr(args, k, v)
    args.model_config = ModelConfig.from_dict(saved["model_config"])
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = opts.dtype if opts.dtype != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    for k in ("tokenizer_type", "tokenizer_model"):
        if getattr(opts, k) is not None:
            setattr(args, k, getattr(opts, k))
    if opts.tokenizer_type is None and opts.tokenizer_model is None:  # the checkpoint's (an HF model: its own)
        from megallama.data.tokenizer import checkpoint_tokenizer
        args.tokenizer_type, args.tokenizer_model = checkpoint_tokenizer(saved)
    args.__dict__.update(
        world_size=world, tensor_model_parallel_size=world, pipeline_model_parallel_size=1, context_parallel_size=1,
        expert_model_parallel_size=1, num_layers_per_virtual_pipeline_stage=None, sequence_parallel=False,
        compile=False, recompute_granularity=None, pretrained_checkpoint=None, load_adapter=None, moe_upcycle=False,
        dry_run=False,
        device=device, bf16=dtype == "bf16", fp16=dtype == "fp16", params_dtype=dtype, seed=opts.seed,
        no_fused_kernels=opts.no_fused_kernels, distributed_backend=None)
    return args


def check_tokenizer(tokenizer, saved: dict, model_vocab: int) -> Optional[str]:
    """Refuse (ConfigError) a tokenizer that is not the one the run trained with: its ids would mean other words to
    the model and generation prints fluent-looking garbage. Returns a warning line for a doubtful one, else None.
    A recorded ``tokenizer_fingerprint`` must match; without one, a run whose embedding followed the tokenizer
    (``vocab_size`` None) padded it to a multiple of tp x --make-vocab-size-divisible-by, so the tokenizer has
    more than ``model_vocab`` minus that step tokens. Converted HF models and runs with an explicit --vocab-size may
    pad further."""
    from megallama.errors import ConfigError
    fix = "pass the tokenizer it was trained with (--tokenizer-type/--tokenizer-model)"
    if tokenizer.vocab_size > model_vocab:
        raise ConfigError(f"tokenizer '{tokenizer.name}' has {tokenizer.vocab_size} tokens but the model only "
                          f"{model_vocab}; {fix}")
    if saved.get("mock_data"):
        return None  # trained on random ids: no tokenizer to match
    recorded = saved.get("tokenizer_fingerprint")
    if recorded and getattr(tokenizer, "fingerprint", None) and recorded != tokenizer.fingerprint:
        raise ConfigError(f"tokenizer '{tokenizer.name}' ({tokenizer.fingerprint}) is not the one this checkpoint "
                          f"was trained with ({recorded}); {fix}")
    tp = max(int(saved.get("tensor_model_parallel_size") or 1), 1)
    step = tp * max(int(saved.get("make_vocab_size_divisible_by") or 1), 1)  # build_data's padding
    if "vocab_size" in saved and saved["vocab_size"] is None and not saved.get("converted_from") \
            and tokenizer.vocab_size <= model_vocab - step:
        trained = f"{model_vocab - step + 1}..{model_vocab}" if step > 1 else f"{model_vocab}"
        raise ConfigError(f"tokenizer '{tokenizer.name}' has {tokenizer.vocab_size} tokens but this run's embedding "
                          f"({model_vocab}, tensor parallel {tp}) followed a tokenizer of {trained} tokens; {fix}")
    if tokenizer.vocab_size < 0.9 * model_vocab:
        return (f"tokenizer '{tokenizer.name}' has {tokenizer.vocab_size} tokens, far fewer than the model's "
                f"{model_vocab}; if the output is garbage, {fix}")
    return None


def check_world(world: int, model_config) -> None:
    """Generation splits the model tensor-parallel over every rank of the launch; the training check's advice
    (--tensor-model-parallel-size) names a flag generation does not have, so a size that does not divide the model
    is refused here in terms of the launch."""
    from megallama.errors import ConfigError
    from megallama.mpu.parallel_state import validate_model_shapes
    try:
        validate_model_shapes(world, model_config)
    except ConfigError as e:
        what = str(e).split("; ")[0].split(" does not divide the ")[-1]
        raise ConfigError(f"generation runs tensor parallel over all {world} processes of the launch, and {world} "
                          f"does not divide the {what}; launch a number of processes that does (torchrun "
                          "--nproc_per_node), or one process") from None


class LoadedModel:
    """What ``load_for_generation`` returns: the model (this rank's tensor-parallel shard), its tokenizer, the
    checkpoint directory and its saved arguments."""

    def __init__(self, model, tokenizer, checkpoint: str, common: dict, args):
        self.model, self.tokenizer, self.checkpoint, self.common, self.args = model, tokenizer, checkpoint, common, args
        self.chat_warned = False  # warn_untrained_chat's: said once per loaded model, not per generate_text call


def load_for_generation(load: str, device=None, dtype: str = "auto", tokenizer_type=None, tokenizer_model=None,
                        seed: int = 1234, no_fused_kernels: bool = False, adapter: Optional[str] = None
                        ) -> LoadedModel:
    """Rebuild a checkpoint's model (its strategy included) on this process group's ranks, tensor parallel over
    all of them, and load its weights: ``load`` is a run's --save directory or one iter_* directory. ``adapter``:
    a LoRA adapter folder added to that model (``adapter_args.apply_adapter_for_generation``)."""
    from megallama.checkpointing import load_checkpoint
    from megallama.checkpointing.full import open_checkpoint
    from megallama.errors import ConfigError
    from megallama.initialize import initialize_megatron
    from megallama.training_setup import build_model_chunks, build_tokenizer_from_args
    if device is not None and str(device).split(":")[0] not in ("cpu", "cuda"):  # the rest ran on the CPU unsaid
        raise ConfigError(f"--device {device} is not supported; use cpu or cuda (cuda:N)")
    if adapter is not None:  # a bad folder is one line before the model is read
        from megallama.adapter_args import read_adapter_config
        read_adapter_config(adapter)
    ckpt, common, reader = open_checkpoint(load, verify=False)
    reader.close()
    from megallama.checkpointing.files import tracker_gap
    from megallama.initialize import warn_rank_0
    gap = tracker_gap(load, ckpt)
    if gap:  # the newest present is used, as training's --load and the HF export do, but not unsaid
        warn_rank_0(gap)
    if "model_config" not in common.get("args", {}):
        raise ConfigError(f"checkpoint {ckpt} records no model configuration; it was not written by megallama")
    opts = argparse.Namespace(device=device, dtype=dtype, tokenizer_type=tokenizer_type,
                              tokenizer_model=tokenizer_model, seed=seed, no_fused_kernels=no_fused_kernels)
    args = run_args(opts, common["args"], int(os.environ.get("WORLD_SIZE", "1")))
    check_world(args.world_size, args.model_config)
    dev = initialize_megatron(args)
    tokenizer = build_tokenizer_from_args(args)
    warning = check_tokenizer(tokenizer, common["args"], args.model_config.vocab_size)
    if warning:
        from megallama.initialize import print_rank_0
        print_rank_0(f"warning: {warning}")
    model = build_model_chunks(args, dev)[0]
    load_checkpoint(ckpt, [model], None, args, finetune=True, quiet=True)
    if adapter is not None:
        from megallama.adapter_args import apply_adapter_for_generation
        apply_adapter_for_generation(model, adapter, args, seed)
    return LoadedModel(model, tokenizer, ckpt, common, args)


def chat_template_of(loaded: LoadedModel, chat_template: str = "auto"):
    """The chat template to prompt with: the one the checkpoint's run trained with (``chat_format``; older chat
    runs: llama3), else (auto) the tokenizer's; ``chat_template`` names one instead."""
    from megallama.data.chat_templates import build_chat_template, resolve_chat_format, saved_chat_format
    name = saved_chat_format(loaded.common["args"]) if chat_template in (None, "auto") else None
    return build_chat_template(name or resolve_chat_format(chat_template, loaded.tokenizer)[0], loaded.tokenizer)


def untrained_chat_warning(loaded: LoadedModel, chat_template: str = "auto") -> Optional[str]:
    """--chat on a checkpoint that records no chat format (a pretraining run): auto then guesses the template from
    the tokenizer, which the model never saw, so say so and how to pick one. None where the run trained on a
    format, ``chat_template`` names one, or the tokenizer ships its own template."""
    from megallama.data.chat_templates import own_chat_template, resolve_chat_format, saved_chat_format, \
        template_format
    if chat_template not in (None, "auto") or saved_chat_format(loaded.common["args"]) or \
            template_format(own_chat_template(loaded.tokenizer)):
        return None
    name, why = resolve_chat_format("auto", loaded.tokenizer)
    return (f"{loaded.checkpoint} was not trained on a chat format (none recorded), so the chat template is the "
            f"tokenizer's default/guess, {name} ({why}); pass --chat-template llama3 or llama2 to pick one")


def warn_untrained_chat(loaded: LoadedModel, chat_template: str = "auto") -> None:
    """``untrained_chat_warning`` as a ``warning:`` line, once per loaded model: chat generation through the CLI and
    the Python API alike (a template guessed for a model that never saw it is worth saying once, not per batch)."""
    if getattr(loaded, "chat_warned", False):
        return
    warning = untrained_chat_warning(loaded, chat_template)
    if warning:
        from megallama.initialize import print_rank_0
        print_rank_0(f"warning: {warning}")
        loaded.chat_warned = True


def _dialog(prompt, i: int) -> list:
    """A chat prompt as the template's messages: a str is one user turn; a list is HF-style message dicts (a
    system prompt, earlier turns), as ``apply_chat_template`` takes them."""
    from megallama.errors import ConfigError
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return list(prompt)
    raise ConfigError(f"chat prompt {i + 1} is {_describe(prompt)}; with chat a prompt is a str (one user turn) or "
                      "a non-empty list of {'role': str, 'content': str} dicts (one conversation), and prompts a "
                      "list of those")


def _describe(prompt) -> str:
    if isinstance(prompt, (list, tuple)):
        return "an empty list" if not prompt else "a list with an item that is not a {'role', 'content'} dict"
    return f"a {type(prompt).__name__}"


def model_eos_ids(saved: dict) -> list:
    """The eos ids of the HF config an imported model came with (Llama 3.x Instruct lists several): HF's generate
    stops at each of them, so ours does too."""
    eos = (saved.get("hf_token_ids") or {}).get("eos_token_id")
    return [int(t) for t in (eos if isinstance(eos, list) else [eos]) if isinstance(t, int)]


def encode_prompts(loaded: LoadedModel, prompts, chat: bool = False, prompt_prefix: str = "auto",
                   chat_template: str = "auto"):
    """(token ids per prompt, stop ids): ``generate_text``'s prompts as the model reads them."""
    from megallama.errors import ConfigError
    if isinstance(prompts, str):  # one prompt, not one per character
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("no prompts given; pass a list of prompts (a str is one prompt)")
    tok = loaded.tokenizer
    stop = [tok.eos_id] + model_eos_ids(loaded.common["args"])
    if chat:
        dialogs = [_dialog(p, i) for i, p in enumerate(prompts)]  # all checked before the template is built
        template = chat_template_of(loaded, chat_template)
        ids = [template.encode_dialog(d, add_generation_prompt=True)[0] for d in dialogs]
        stop.append(template.eot)
    else:
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                hint = "; a list of messages is a chat prompt: pass chat=True (--chat)" \
                    if isinstance(p, (list, tuple)) else ""
                raise ConfigError(f"prompt {i + 1} is a {type(p).__name__}, not a str{hint}")
        if prompt_prefix == "auto":
            from megallama.data.tokenizer_export import auto_prompt_prefix
            prompt_prefix = auto_prompt_prefix(loaded.common["args"], tok)  # the tokenizer loaded with the model
        first = {"bos": [tok.bos_id], "eod": [tok.eod], "none": []}[prompt_prefix]
        ids = [[t for t in first if t is not None] + tok.encode(p) for p in prompts]
    return ids, tuple(sorted(set(stop)))


def generate_text(loaded: LoadedModel, prompts, cfg, chat: bool = False, prompt_prefix: str = "auto",
                  decode_mode: str = "auto", batch_size: Optional[int] = None, chat_template: str = "auto"):
    """Completions (strings) of ``prompts`` (a list; a str is one prompt). ``chat``: each prompt is a user turn
    (a str) or a conversation (a list of HF-style {"role", "content"} dicts: a system prompt, earlier turns) in the
    run's chat template (``chat_template_of``; ``chat_template`` names another), and the answer stops at its end
    of turn; a checkpoint that trained on no chat format gets a warning (once per loaded model) that the template
    is a guess, as ``--chat`` does. ``batch_size``: prompts decoded together (None: all). ``prompt_prefix`` (plain
    prompts): bos, eod, none, or auto (bos for a converted HF model; eod for a megallama run, whose pretraining
    documents follow an eod and have no bos)."""
    from megallama.generation import generate
    ids, stop = encode_prompts(loaded, prompts, chat, prompt_prefix, chat_template)
    if chat:  # after the prompts are checked: a malformed one is its own error, not after a warning
        warn_untrained_chat(loaded, chat_template)
    cfg = dataclasses.replace(cfg, stop_ids=stop)  # the caller's config stays as given
    outs = generate(loaded.model, ids, cfg, vocab_size=loaded.tokenizer.vocab_size, decode_mode=decode_mode,
                    batch_size=batch_size)
    return [loaded.tokenizer.decode(new) for new in outs]


def check_flags(opts) -> None:
    """Flags that would be silently ignored together are refused before anything loads."""
    from megallama.errors import ConfigError
    if opts.system_prompt is not None and not opts.chat:
        raise ConfigError("--system-prompt is a chat turn; add --chat, or drop --system-prompt")
    if opts.greedy:  # argmax reads no temperature, top-k or top-p: one of the two asks would be dropped
        given = [f for f, v, off in (("--temperature", opts.temperature, (None, 0.0)), ("--top-k", opts.top_k, (0,)),
                                     ("--top-p", opts.top_p, (1.0,))) if v not in off]
        if given:
            raise ConfigError(f"--greedy takes the most likely token, so {', '.join(given)} would be ignored; drop "
                              f"--greedy to sample, or drop {' and '.join(given)}")


def main(argv=None) -> int:
    from megallama.initialize import run_script
    opts = build_arg_parser().parse_args(argv)

    def body():
        from megallama.errors import ConfigError
        from megallama.generation import SamplingConfig
        from megallama.initialize import print_rank_0

        prompts = list(opts.prompt)
        if opts.prompt_file:
            try:
                with open(opts.prompt_file, encoding="utf-8") as f:
                    prompts += [line.rstrip("\r\n") for line in f if line.strip()]  # one per line, CRLF too
            except OSError as e:
                raise ConfigError(f"--prompt-file {opts.prompt_file} cannot be read ({e.strerror}); check the path")
        if not prompts:
            raise ConfigError("no prompt given; pass --prompt TEXT (repeatable) or --prompt-file FILE")
        if opts.batch_size < 1:
            raise ConfigError(f"--batch-size {opts.batch_size} must be >= 1")
        check_flags(opts)
        temperature = 0.0 if opts.greedy else (1.0 if opts.temperature is None else opts.temperature)
        cfg = SamplingConfig(opts.max_new_tokens, temperature, opts.top_k, opts.top_p,
                             opts.seed).validate()  # before anything is loaded
        loaded = load_for_generation(opts.load, opts.device, opts.dtype, opts.tokenizer_type, opts.tokenizer_model,
                                     opts.seed, opts.no_fused_kernels, opts.load_adapter)
        tp = loaded.args.tensor_model_parallel_size
        n = sum(p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
                for p in loaded.model.parameters())  # tp shards count tp times, replicated norms once
        print_rank_0(f"loaded {loaded.checkpoint} (iteration {loaded.common.get('iteration', 0)}): {n:,} parameters, "
                     f"tokenizer {loaded.tokenizer.name}, tensor parallel {tp}")
        if opts.load_adapter:
            print_rank_0(f"LoRA adapter {opts.load_adapter} applied")
        if opts.chat:
            print_rank_0(f"chat template: {chat_template_of(loaded, opts.chat_template).name}")
            warn_untrained_chat(loaded, opts.chat_template)  # generate_text would too; said before the answers
        system = [] if opts.system_prompt is None else [{"role": "system", "content": opts.system_prompt}]
        inputs = [system + [{"role": "user", "content": p}] for p in prompts] if opts.chat else prompts
        texts = generate_text(loaded, inputs, cfg, opts.chat, opts.prompt_prefix, opts.decode_mode,
                              opts.batch_size, opts.chat_template)
        for p, text in zip(prompts, texts):
            print_rank_0(f"--- prompt: {p}\n{text}")
    return run_script(body)
