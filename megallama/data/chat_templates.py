"""Chat templates SFT trains with and ``tools/generate.py --chat`` prompts with: Meta's Llama 3 and Llama 2 formats.

``--chat-template auto`` (the default) picks what the tokenizer says: a tokenizer shipping a chat template of either
format (``tokenizer_config.json``'s ``chat_template``, as HF TRL uses it) gets that format; otherwise Llama 3's
special tokens mean llama3, a Llama 1/2 vocabulary (``--tokenizer-type llama2``, or sentencepiece's 32000/32016
pieces with ``<s>``/``</s>``) means llama2, and anything else (the bundled BPE, GPT-2 style) llama3's layout with
bos/eos and the header markers as text. The resolved name is saved with the checkpoint (``chat_format``), so
generation and the HF export use the format the run trained on.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence, Tuple

from megallama.errors import ConfigError

CHAT_TEMPLATES = ("llama3", "llama2")


def _token_id(i) -> Optional[int]:
    """A special token's id, or None where the tokenizer has none (HF: None; sentencepiece: -1)."""
    return None if i is None or int(i) < 0 else int(i)


def _special_id(tok, s: str) -> Optional[int]:
    specials = getattr(tok, "special_tokens", None)
    if isinstance(specials, dict) and s in specials:
        return specials[s]
    inner = getattr(tok, "tok", None)  # HF tokenizers.Tokenizer
    if inner is not None and hasattr(inner, "token_to_id"):
        return inner.token_to_id(s)
    return None


def _eos_or_refuse(tokenizer, template: str) -> int:
    eos = _token_id(tokenizer.eos_id)
    if eos is None:
        raise ConfigError(f"tokenizer '{getattr(tokenizer, 'name', tokenizer)}' has no end-of-text token, which the "
                          f"{template} chat template ends every turn with; fine-tune with a tokenizer that has an eos "
                          "(or Llama 3's <|eot_id|>)")
    return eos


class ChatTemplate:
    """Llama 3 chat format on any tokenizer with ``encode``/``bos_id``/``eos_id``::

        <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>...

    Tokenizers without Llama 3's special tokens get bos/eos for begin-of-text/end-of-turn and the header markers as
    text (a tokenizer without a bos starts at the first header, as GPT-2's and Qwen's formats do)."""

    name = "llama3"
    SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ids = {s: _special_id(tokenizer, s) for s in self.SPECIALS}
        self.native = all(v is not None for v in ids.values())
        if self.native:
            self.bos, self.start_header, self.end_header, self.eot = (ids[s] for s in self.SPECIALS)
        else:  # text markers; one-token begin/end so generation can stop on eos
            self.bos, self.start_header, self.end_header = _token_id(tokenizer.bos_id), None, None
            self.eot = _eos_or_refuse(tokenizer, "Llama 3")
        pad = _token_id(getattr(tokenizer, "pad_id", None))
        self.pad_id = self.eot if pad is None else pad

    _special_id = staticmethod(_special_id)

    def header(self, role: str) -> List[int]:
        if self.native:
            return [self.start_header] + self.tokenizer.encode(role) + [self.end_header] + \
                self.tokenizer.encode("\n\n")
        return self.tokenizer.encode(f"<|start_header_id|>{role}<|end_header_id|>\n\n")

    def encode_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = False
                      ) -> Tuple[List[int], List[int]]:
        """(tokens, mask): mask is 1 on the tokens an assistant message contributes (content + end of turn)."""
        tokens = [] if self.bos is None else [self.bos]
        mask = [0] * len(tokens)
        for m in messages:
            h = self.header(m["role"])
            body = self.tokenizer.encode(m["content"].strip()) + [self.eot]
            tokens += h + body
            mask += [0] * len(h) + [int(_trained(m))] * len(body)
        if add_generation_prompt:
            h = self.header("assistant")
            tokens += h
            mask += [0] * len(h)
        return tokens, mask


class Llama2ChatTemplate:
    """Meta's Llama 2 chat format (llama/generation.py ``chat_completion``), each user/answer pair one encoded text::

        <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user2} [/INST]

    System (first message only) folds into the first user turn; user and assistant alternate. Trained: each answer
    and its ``</s>`` (the tokens after the prompt's ``[/INST]``). The generation prompt ends at ``[/INST]``."""

    name = "llama2"
    native = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos = _token_id(tokenizer.bos_id)
        self.eot = _eos_or_refuse(tokenizer, "Llama 2")
        pad = _token_id(getattr(tokenizer, "pad_id", None))
        self.pad_id = self.eot if pad is None else pad

    @staticmethod
    def turns(messages: Sequence[dict]) -> List[Tuple[str, Optional[dict]]]:
        """(user text, answer message or None) pairs, the system folded in as Meta does; other orders refused."""
        msgs = list(messages)
        system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else None
        fix = "Llama 2's format has one optional system message first, then user and assistant alternating; " \
              "fix the conversation or fine-tune with --chat-template llama3"
        for i, m in enumerate(msgs):
            want = "user" if i % 2 == 0 else "assistant"
            if m["role"] != want:
                raise ConfigError(f"message {i + (system is not None) + 1} is a {m['role']} message where "
                                  f"{'a user' if want == 'user' else 'an assistant'} one belongs; {fix}")
        if not msgs:
            raise ConfigError(f"a conversation without a user message; {fix}")
        if system is not None:
            msgs[0] = dict(msgs[0], content=f"<<SYS>>\n{system}\n<</SYS>>\n\n{msgs[0]['content']}")
        return [(msgs[i]["content"], msgs[i + 1] if i + 1 < len(msgs) else None) for i in range(0, len(msgs), 2)]

    def encode_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = False
                      ) -> Tuple[List[int], List[int]]:
        """(tokens, mask). ``add_generation_prompt`` adds nothing: a prompt ends at its last ``[/INST]``."""
        first = [] if self.bos is None else [self.bos]
        tokens: List[int] = []
        mask: List[int] = []
        for user, answer in self.turns(messages):
            prompt = f"[INST] {user.strip()} [/INST]"
            p = self.tokenizer.encode(prompt)
            if answer is None:
                tokens += first + p
                mask += [0] * (len(first) + len(p))
                continue
            full = self.tokenizer.encode(f"{prompt} {answer['content'].strip()} ")  # one text, as Meta encodes it
            k = next((i for i, (a, b) in enumerate(zip(full, p)) if a != b), min(len(full), len(p)))
            train = int(_trained(answer))
            tokens += first + full + [self.eot]
            mask += [0] * (len(first) + k) + [train] * (len(full) - k + 1)
        return tokens, mask


def _trained(m: dict) -> bool:
    """Assistant turns are trained on, except those of a TRL prompt (``train`` False: prompt/completion rows train
    the completion only)."""
    return m["role"] == "assistant" and m.get("train", True)


def build_chat_template(name: str, tokenizer):
    if name == "llama2":
        return Llama2ChatTemplate(tokenizer)
    if name == "llama3":
        return ChatTemplate(tokenizer)
    raise ConfigError(f"--chat-template {name} is not one of auto, {', '.join(CHAT_TEMPLATES)}")


def template_format(jinja: Optional[str]) -> Optional[str]:
    """Which of our formats an HF Jinja chat template renders (by its markers), None for another (ChatML ...)."""
    if not jinja:
        return None
    if "<|start_header_id|>" in jinja:
        return "llama3"
    if "[INST]" in jinja:
        return "llama2"
    return None


def resolve_chat_format(requested: Optional[str], tokenizer) -> Tuple[str, str]:
    """(template name, why) for ``--chat-template`` (auto: see the module docstring)."""
    if requested and requested != "auto":
        build_chat_template(requested, tokenizer)  # refuses an unknown name
        return requested, "--chat-template"
    own = template_format(own_chat_template(tokenizer))
    if own:
        return own, "the tokenizer's own chat template"
    if all(_special_id(tokenizer, s) is not None for s in ChatTemplate.SPECIALS):
        return "llama3", "the tokenizer has Llama 3's special tokens"
    if is_llama2_vocabulary(tokenizer):
        return "llama2", "a Llama 2 tokenizer"
    return "llama3", "the default; the tokenizer names no chat format"


def is_llama2_vocabulary(tokenizer) -> bool:
    """Megatron's Llama2Tokenizer, or Llama 1/2's (and Code Llama's) vocabulary: 32000/32016 pieces with <s>/</s>."""
    if getattr(tokenizer, "tokenizer_type", None) == "llama2":
        return True
    if tokenizer.vocab_size not in (32000, 32016) or _token_id(tokenizer.bos_id) is None:
        return False
    piece = tokenizer.sp.id_to_piece if getattr(tokenizer, "sp", None) is not None else \
        (tokenizer.tok.id_to_token if getattr(tokenizer, "tok", None) is not None else None)
    return piece is not None and (piece(tokenizer.bos_id), piece(tokenizer.eos_id)) == ("<s>", "</s>")


def saved_chat_format(saved_args: dict) -> Optional[str]:
    """The template a checkpoint's run trained with: its ``chat_format``; a chat run saved before that was recorded
    trained with llama3 (the only one then); None for a run that did not train on chats."""
    fmt = saved_args.get("chat_format")
    if fmt in CHAT_TEMPLATES and saved_args.get("chat_template"):
        return fmt
    return "llama3" if saved_args.get("chat_template") and not saved_args.get("mock_data") else None


def own_chat_template(tokenizer) -> Optional[str]:
    """The chat template an HF tokenizer folder ships (tokenizer_config.json's ``chat_template``, or a
    chat_template.jinja / chat_template.json beside it), else None."""
    path = getattr(tokenizer, "path", None)
    if not isinstance(path, str) or not os.path.exists(path):
        return None
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                tpl = json.load(f).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
            tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None)
        if isinstance(tpl, str):
            return tpl
    return None
