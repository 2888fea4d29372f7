"""The tokenizer of a run, written next to an HF export so ``AutoTokenizer.from_pretrained(folder)`` reads it.

An imported HF model's ``tokenizer.json`` is copied with its configs, and so is the tokenizer of a run trained
from scratch with ``--tokenizer-type hf`` whose template starts a text with a bos (its documents began with it);
one without gets it rewritten to start a text with the eod (below), as does a GPT2BPETokenizer run (its
vocab.json/merges.txt written as one tokenizer.json).
A sentencepiece ``.model`` (the bundled tokenizer, Llama 1/2) becomes ``tokenizer.model`` for HF's
``LlamaTokenizer``, which gives the same ids as sentencepiece except on runs of spaces at the start of a text
(HF's normalisation). Llama 3's tiktoken ranks file, which HF cannot read, becomes a byte-level BPE tokenizer.json
(``tiktoken_to_hf``) that gives tiktoken's ids.

The written tokenizer starts a text with the token ``tools/generate.py`` puts before a prompt (``prompt_token``):
a megallama run's documents follow an eod and have no bos, so it prepends the eod (as HF's bos_token); an imported
HF model keeps its bos. So HF ``generate`` on the exported folder sees the context megallama's generation sees.

A run that trained on chat data also gets a ``chat_template`` (``export_chat_template``) in the format it trained with
(Llama 3's or Llama 2's, its saved ``chat_format``) that renders, token for token, what ``chat_templates`` trained on
and ``tools/generate.py --chat`` prompts with.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional, Tuple

from megallama.data.tokenizer import build_tokenizer, checkpoint_tokenizer
from megallama.errors import ConfigError

_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Meta's Llama 3 Instruct template (meta-llama/Meta-Llama-3-8B-Instruct, tokenizer_config.json), with its quoted
# pieces as fields: filled with Llama 3's special tokens and bos_token it is Meta's text to the character.
_LLAMA3_TEMPLATE = ("{{% set loop_messages = messages %}}{{% for message in loop_messages %}}{{% set content = "
                    "{start} + message['role'] + {end}+ {content} + {eot} %}}{first}{{{{ content }}}}{{% endfor %}}"
                    "{{% if add_generation_prompt %}}{{{{ {prompt} }}}}{{% endif %}}")
_FIRST = "{{% if loop.index0 == 0 %}}{{% set content = {bos} + content %}}{{% endif %}}"
# Meta's Llama 2 chat template (meta-llama/Llama-2-7b-chat-hf, tokenizer_config.json), its begin/end tokens and the
# text after them as fields: with bos_token, eos_token and no separator it is Meta's text to the character.
_LLAMA2_TEMPLATE = (
    "{{% if messages[0]['role'] == 'system' %}}{{% set loop_messages = messages[1:] %}}{{% set system_message = "
    "messages[0]['content'] %}}{{% else %}}{{% set loop_messages = messages %}}{{% set system_message = false %}}"
    "{{% endif %}}{{% for message in loop_messages %}}{{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}}"
    "{{{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}}}{{% endif %}}"
    "{{% if loop.index0 == 0 and system_message != false %}}{{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}}{{% else %}}{{% set content = message['content'] %}}{{% endif %}}"
    "{{% if message['role'] == 'user' %}}{{{{ {bos} + {inst} + content.strip() + ' [/INST]' }}}}"
    "{{% elif message['role'] == 'assistant' %}}{{{{ ' '  + content.strip() + ' ' + {eos} }}}}{{% endif %}}{{% endfor %}}")
# conversations the written template is checked on: system or not, several turns, spaces to trim, an empty turn
_PROBES = (
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 12 plus 30?\n"},
      {"role": "assistant", "content": "It is 42."}, {"role": "user", "content": "And  café  times 2?"}], True),
    ([{"role": "user", "content": "Hello there"}], True),
    ([{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": "Ok.\nDone"}], False),
    ([{"role": "system", "content": ""}, {"role": "user", "content": "x"}], True),
)


def auto_prompt_prefix(saved_args: dict, tok=None) -> str:
    """What generation_cli's ``--prompt-prefix auto`` puts before a plain prompt: "bos" for a model converted from
    HF or fine-tuned from one (``inherited_prompt_prefix``, set by training_setup from --pretrained-checkpoint) and
    for a run whose documents began with their tokenizer's bos (``data_starts_with_bos``), "eod" for other
    megallama-pretrained runs (whose documents follow an eod). ``tok``: the run's tokenizer, when already built."""
    inherited = saved_args.get("inherited_prompt_prefix")
    if inherited:
        return inherited
    return "bos" if saved_args.get("converted_from") or data_starts_with_bos(saved_args, tok) else "eod"


def data_starts_with_bos(saved_args: dict, tok=None) -> bool:
    """Whether the run's documents start with its tokenizer's bos: an HF tokenizer.json whose template puts one
    first, which tools/preprocess_data.py and the jsonl cache keep (``preprocess.adds_special_tokens``), so the
    model learned "bos document eod". A tokenizer that no longer loads here: False (the caller's own load says why)."""
    from megallama.data.preprocess import adds_special_tokens
    if tok is None:
        try:
            tok = run_tokenizer(saved_args)
        except (ConfigError, OSError, ValueError):
            return False
    if not adds_special_tokens(tok) or tok.bos_id is None:
        return False
    return tok.encode_batch(["a"], add_special_tokens=True)[0][:1] == [tok.bos_id]


def prompt_token(saved_args: dict, tok) -> Optional[int]:
    """The token ``auto_prompt_prefix`` names, for this tokenizer."""
    return tok.bos_id if auto_prompt_prefix(saved_args, tok) == "bos" else tok.eod


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
        if auto_prompt_prefix(saved_args, tok) == "bos":  # an imported model's files, as they are (its own bos)
            for name in _HF_FILES[1:]:
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copy(os.path.join(src, name), os.path.join(out_dir, name))
            shutil.copy(file, os.path.join(out_dir, "tokenizer.json"))
            return tok.bos_id, eos, f"tokenizer: {file} (tokenizer.json)"
        piece = _eod_first_tokenizer_json(tok, src, out_dir)
        return bos, eos, f"tokenizer: {file} (tokenizer.json, which starts a text with {piece} as tools/generate.py does)"
    if t == "gpt2":  # its tokenizers object saved as tokenizer.json, the eod first as for an hf run
        piece = _eod_first_tokenizer_json(tok, os.path.dirname(tok.vocab_file), out_dir)
        return bos, eos, (f"tokenizer: {tok.vocab_file} + {tok.merge_file} (GPT-2 BPE, as a tokenizer.json, which "
                          f"starts a text with {piece} as tools/generate.py does)")
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
    if t in ("llama3", "tiktoken"):
        piece = _tiktoken_tokenizer_json(saved_args, tok, bos, out_dir)
        return bos, eos, (f"tokenizer: {tok.path} (tiktoken ranks, as a byte-level BPE tokenizer.json, which starts a "
                          f"text with {piece} as tools/generate.py does)")
    return bos, eos, f"tokenizer: not written ({t} has no HF form)"


def trained_on_chat(saved_args: dict) -> bool:
    """Whether the run fine-tuned on chat data: finetune_llama.py and *_instruct models record ``chat_template``;
    a --mock-data run read random ids, not chats."""
    return bool(saved_args.get("chat_template")) and not saved_args.get("mock_data")


def export_chat_template(saved_args: dict, out_dir: str) -> Tuple[Optional[int], Optional[str]]:
    """Put the chat format the run trained on into ``out_dir``'s tokenizer_config.json (HF's ``chat_template``,
    which ``apply_chat_template`` and vLLM use); returns (its end-of-turn id where that is not the eos, for
    config.json's stop ids; a line saying what was done), (None, None) when nothing was to do.

    Written only for a run that trained on chat data (``trained_on_chat``): a base model gets none, as Meta ships
    chat templates with Instruct models only (an imported model's own files are still copied as they are). A
    source tokenizer's template is kept when it renders the same ids as megallama's on a few conversations;
    otherwise megallama's replaces it. Checked with transformers where it is installed."""
    from megallama.data.chat_templates import build_chat_template, own_chat_template, saved_chat_format
    cfg_file = os.path.join(out_dir, "tokenizer_config.json")
    if not trained_on_chat(saved_args) or not os.path.isfile(cfg_file):
        return None, None
    tok = run_tokenizer(saved_args)
    fmt = saved_chat_format(saved_args)
    try:
        chat = build_chat_template(fmt, tok)
    except ConfigError as e:
        return None, f"chat_template: not written ({e})"
    with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    bos_token = cfg.get("bos_token")
    bos_token = bos_token.get("content") if isinstance(bos_token, dict) else bos_token
    source = cfg.get("chat_template") or own_chat_template(tok)
    source = source if isinstance(source, str) else None
    check, unchecked = _hf_check(out_dir, chat)
    eos_token = cfg.get("eos_token")
    eos_token = eos_token.get("content") if isinstance(eos_token, dict) else eos_token
    candidates = [llama2_chat_template(tok, bos_token, eos_token, sep) if fmt == "llama2" else
                  megallama_chat_template(tok, bos_token, sep) for sep in _separators(tok)]
    ours, wrong = candidates[0], None
    if check is not None:  # the first whose ids are megallama's; none: the likeliest, with a warning
        wrongs = [check(tpl) for tpl in candidates]
        ours, wrong = next(((t, w) for t, w in zip(candidates, wrongs) if w is None), (candidates[0], wrongs[0]))
    if source is not None and (source == ours or (check is not None and check(source) is None)):
        cfg["chat_template"] = source
        said = "chat_template: the source tokenizer's, which renders what the run trained on"
    else:
        cfg["chat_template"] = ours
        said = ("chat_template: " + ("Llama 2's" if fmt == "llama2" else "Llama 3's" if chat.native else
                                     "Llama 3's layout with text markers") +
                ", as the run trained on" +
                (" (replacing the source tokenizer's, which renders another format)" if source else ""))
        if wrong is not None:
            said += f"; warning: HF's tokenizer encodes it differently ({wrong}); tools/generate.py --chat is exact"
    if check is None:
        said += f" (not checked: {unchecked})"
    with open(cfg_file, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    return (chat.eot if chat.eot != tok.eos_id else None), said


def megallama_chat_template(tok, bos_token: Optional[str] = None, sep: str = "") -> str:
    """Jinja rendering ``ChatTemplate(tok).encode_dialog``: Meta's Llama 3 template where the tokenizer has Llama 3's
    special tokens, else the same layout with bos/eos and the header markers as text. ``bos_token``: the exported
    tokenizer's (used by name when it is the template's begin token, as Meta's does). ``sep``: put before each text
    piece, where megallama's tokenizer gave each its own start (sentencepiece's dummy prefix)."""
    from megallama.data.sft_dataset import ChatTemplate
    chat = ChatTemplate(tok)
    begin, start, end, eot = ChatTemplate.SPECIALS
    if not chat.native:
        begin = None if chat.bos is None else _piece(tok, chat.bos)
        eot = _piece(tok, chat.eot)
    content = "message['content'] | trim"
    if sep:  # an empty content is no tokens, so no separator
        content = f"({_quote(sep)} + {content} if {content} else '')"
    bos = "bos_token" if begin is not None and begin == bos_token else _quote(begin or "")
    return _LLAMA3_TEMPLATE.format(start=_quote(sep + start), end=_quote(end + "\n\n"), content=content,
                                   eot=_quote(eot), first=_FIRST.format(bos=bos) if begin is not None else "",
                                   prompt=_quote(f"{sep}{start}assistant{end}\n\n"))


def llama2_chat_template(tok, bos_token: Optional[str] = None, eos_token: Optional[str] = None, sep: str = "") -> str:
    """Jinja rendering ``Llama2ChatTemplate(tok).encode_dialog``: Meta's Llama-2-chat template, with the exported
    tokenizer's ``bos_token``/``eos_token`` by name where they are the template's begin/end tokens. ``sep``: put
    after the begin token, where megallama's tokenizer gave each turn its own start (sentencepiece's dummy
    prefix)."""
    from megallama.data.chat_templates import Llama2ChatTemplate
    chat = Llama2ChatTemplate(tok)
    begin = None if chat.bos is None else _piece(tok, chat.bos)
    end = _piece(tok, chat.eot)
    bos = "bos_token" if begin is not None and begin == bos_token else _quote(begin or "")
    eos = "eos_token" if end == eos_token else _quote(end)
    return _LLAMA2_TEMPLATE.format(bos=bos, eos=eos, inst=_quote(sep + "[INST] "))


def _separators(tok) -> list:
    """What may stand between the template's pieces, the likelier first: a space where the tokenizer starts every
    encoded text with one (sentencepiece's dummy prefix: megallama encodes header and content apart)."""
    sp = getattr(tok, "sp", None)
    prefixed = sp is not None and sp.id_to_piece(tok.encode("a")[0]).startswith("\u2581")
    return [" ", ""] if prefixed else ["", " "]


def _hf_check(out_dir: str, chat):
    """(check, None): check(template) is None, or where HF's ids first differ from megallama's on ``_PROBES``,
    through transformers on the exported folder; (None, why) where that cannot be done."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None, "transformers is not installed"
    try:
        hf = AutoTokenizer.from_pretrained(out_dir)
    except Exception as e:  # a folder this transformers cannot read: the template goes unchecked, with a note
        return None, f"transformers cannot read the folder: {str(e).splitlines()[0] if str(e) else type(e).__name__}"

    def check(template: str) -> Optional[str]:
        for messages, gen in _PROBES:
            want = chat.encode_dialog(messages, add_generation_prompt=gen)[0]
            try:
                got = list(hf.apply_chat_template(messages, chat_template=template, tokenize=True,
                                                  add_generation_prompt=gen, return_dict=False))
            except Exception as e:  # a template that does not render (raise_exception, a bad role)
                return f"it does not render: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            if got != want:
                i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                return f"token {i} of a {len(want)}-token conversation"
        return None
    return check, None


def _piece(tok, i: int) -> str:
    """The text of token ``i`` as the exported tokenizer spells it."""
    if getattr(tok, "sp", None) is not None:
        return tok.sp.id_to_piece(i)
    if getattr(tok, "tok", None) is not None:
        return tok.tok.id_to_token(i)
    return tok.decode([i])


def _quote(text: str) -> str:
    """A Jinja string literal (Jinja's own escapes; the template text keeps \\n as Meta's does)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


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


def _tiktoken_tokenizer_json(saved_args: dict, tok, bos: int, out_dir: str) -> str:
    """Write a Llama 3 tiktoken ranks file as tokenizer.json (starting a text with ``bos``) and the configs
    PreTrainedTokenizerFast reads; returns the bos token's text. ``clean_up_tokenization_spaces`` is off so decode
    gives the text back, as tiktoken's does."""
    from megallama.data.tiktoken_to_hf import tiktoken_to_hf
    hf = tiktoken_to_hf(tok.path, tok.special_tokens, first_token=bos)
    hf.save(os.path.join(out_dir, "tokenizer.json"))
    names = {i: name for name, i in tok.special_tokens.items()}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names[bos], "eos_token": names[tok.eos_id],
           "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
           "model_max_length": _max_length(saved_args),
           "model_input_names": ["input_ids", "attention_mask"]}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": names[bos], "eos_token": names[tok.eos_id]}, f, indent=2, sort_keys=True)
    return names[bos]


def _max_length(saved_args: dict) -> int:
    """The model's context (config.json's max_position_embeddings), as HF's Llama tokenizers have it: the run's
    --seq-length is only what it trained on, and as the limit it made HF warn (and users truncate) below the context.
    A checkpoint recording no context: its seq_length, else 4096."""
    ctx = (saved_args.get("model_config") or {}).get("max_position_embeddings")
    return int(ctx or saved_args.get("seq_length") or 4096)
