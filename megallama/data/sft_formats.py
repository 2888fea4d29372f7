"""The instruction-data row formats a chat jsonl may hold, each turned into one message list
(``[{"role", "content"}, ...]``), so the chat template and the loss mask are the same whatever the source.

The format is detected per file from its first row, and every row must have it:

* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` (OpenAI / TRL);
* ShareGPT: ``{"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"system", "value": ...}, ...]}``;
* TRL prompt-completion: ``{"prompt": ..., "completion": ...}``, both strings (one user turn, one answer) or both
  message lists (TRL's conversational form; only the completion is trained on, as TRL's completion-only loss);
* ``{"prompt": ..., "response": ...}``: one user turn, one answer;
* Alpaca: ``{"instruction", "input" (optional, may be empty), "output"}``: the user turn is the instruction, and
  ``"{instruction}\\n\\n{input}"`` where there is an input (Alpaca's template separates them by a blank line).

TRL tokenizes a string prompt/completion pair as plain text; here every format is a chat, formatted by
``--chat-template`` as the messages file it is equivalent to.
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from typing import List, Optional, Tuple

import torch.distributed as dist

from megallama.errors import ConfigError

ROLES = ("system", "user", "assistant", "ipython", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# format: (the keys that make a row that format, what a row of it looks like)
FORMATS = {
    "messages": (("messages",), '{"messages": [{"role": ..., "content": ...}, ...]}'),
    "sharegpt": (("conversations",), '{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}'),
    "alpaca": (("instruction", "output"), '{"instruction": ..., "input": ..., "output": ...}'),
    "prompt_completion": (("prompt", "completion"), '{"prompt": ..., "completion": ...}'),
    "prompt_response": (("prompt", "response"), '{"prompt": ..., "response": ...}'),
}
# a row holding some keys of a format but not all: the key it lacks
_PARTIAL = (("instruction", "alpaca"), ("output", "alpaca"), ("completion", "prompt_completion"),
            ("response", "prompt_response"), ("prompt", "prompt_completion"))
_ACCEPTED = "; ".join(v[1] for v in FORMATS.values())


def detect_format(row) -> Optional[str]:
    """The first format (in ``FORMATS`` order) whose keys the row has all of; None if none."""
    if isinstance(row, dict):
        for name, (keys, _) in FORMATS.items():
            if all(k in row for k in keys):
                return name
    return None


def _missing(row, fmt: str, where: str) -> ConfigError:
    keys, shape = FORMATS[fmt]
    lacks = next(k for k in keys if k not in row) if isinstance(row, dict) else keys[0]
    return ConfigError(f'{where} has no "{lacks}" key, which every row of this {fmt} file needs ({shape})')


def row_messages(row: dict, fmt: str, where: str) -> List[dict]:
    """The message list of one row of format ``fmt``; a bad row is one ConfigError naming ``where``."""
    def text(key: str, obj=row, allow_missing=False) -> str:
        v = obj.get(key, "" if allow_missing else None)
        if not isinstance(v, str):
            raise ConfigError(f'{where}: "{key}" must be a string, got {str(v)[:60]}')
        return v

    if fmt == "messages":
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ConfigError(f'{where} has no "messages" list; each line must be {{"messages": [{{"role": '
                              f'..., "content": ...}}, ...]}}')
        return [_message(m, where) for m in msgs]
    if fmt == "sharegpt":
        turns = row["conversations"]
        if not isinstance(turns, list) or not turns:
            raise ConfigError(f'{where}: "conversations" must be a non-empty list of {{"from": ..., "value": ...}}')
        out = []
        for t in turns:
            for key in ("from", "value"):
                if not isinstance(t, dict) or key not in t:
                    raise ConfigError(f'{where}: a turn has no "{key}" key, got {str(t)[:80]}; ShareGPT turns are '
                                      '{"from": "human"|"gpt"|"system", "value": ...}')
            if t["from"] not in SHAREGPT_ROLES:
                raise ConfigError(f'{where}: "from": {str(t["from"])[:30]!r} is not one of '
                                  f'{", ".join(SHAREGPT_ROLES)}; rename it in the data')
            out.append(_message({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]}, where))
        return out
    if fmt == "alpaca":
        instruction, extra = text("instruction"), text("input", allow_missing=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [_message({"role": "user", "content": user}, where),
                _message({"role": "assistant", "content": text("output")}, where)]
    answer_key = "completion" if fmt == "prompt_completion" else "response"
    prompt, answer = row["prompt"], row[answer_key]
    if isinstance(prompt, list) and isinstance(answer, list) and fmt == "prompt_completion":
        if not prompt or not answer:
            raise ConfigError(f'{where}: conversational "prompt" and "completion" must be non-empty message lists')
        return [dict(_message(m, where), train=False) if m.get("role") == "assistant" else _message(m, where)
                for m in prompt] + [_message(m, where) for m in answer]
    if isinstance(prompt, list) or isinstance(answer, list):
        raise ConfigError(f'{where}: "prompt" and "{answer_key}" must both be strings'
                          + (" or both message lists" if fmt == "prompt_completion" else ""))
    return [_message({"role": "user", "content": text("prompt")}, where),
            _message({"role": "assistant", "content": text(answer_key)}, where)]


def _message(m, where: str) -> dict:
    if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
        raise ConfigError(f"{where}: every message needs a role in {', '.join(ROLES)} and a string content, got "
                          f"{str(m)[:80]}")
    try:
        m["content"].encode("utf-8")
    except UnicodeEncodeError as e:  # a lone "\udXXX" escape: no character, no token
        raise ConfigError(f"{where}: a {m['role']} content holds an unpaired surrogate escape "
                          f"({m['content'][e.start]!r}); write the character itself or its full surrogate pair"
                          ) from None
    return {"role": m["role"], "content": m["content"]}


def _lines(path: str):
    """(line number, text) of a jsonl or jsonl.gz; bytes that are not UTF-8 and a truncated or corrupt gzip are one
    ConfigError each, naming the file and line (they raised UnicodeDecodeError / EOFError)."""
    lineno = 0
    try:
        f = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise ConfigError(f"chat data {path} cannot be read ({e.strerror}); check the path and its permissions"
                          ) from None
    with f:
        try:
            for lineno, raw in enumerate(f, 1):
                try:
                    yield lineno, raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise ConfigError(f"{path} line {lineno} is not UTF-8 (byte {raw[e.start]:#04x} at column "
                                      f"{e.start + 1}); re-save the file as UTF-8") from None
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise ConfigError(f"{path} is a truncated or corrupt gzip file (it breaks off after line {lineno}: "
                              f"{e}); re-create or re-download it") from None


def read_chat_rows(path: str) -> Tuple[str, List[Tuple[int, List[dict]]]]:
    """(format, [(line number, messages), ...]) of a chat jsonl; conversations with an empty assistant answer are
    skipped with one warning (trained on, they would teach the model to end its turn at once)."""
    if not os.path.isfile(path):
        raise ConfigError(f"chat data {path} does not exist; pass --data-path with a .jsonl of "
                          '{"messages": [{"role": ..., "content": ...}]} lines (or ShareGPT, prompt/completion, '
                          "Alpaca rows)")
    fmt, first, out, empty = None, 0, [], []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not valid JSON ({e.msg}); fix or remove that line") from None
        this = detect_format(row)
        if fmt is None:
            if this is None:
                if not isinstance(row, dict) or not any(k in row for k, _ in _PARTIAL):
                    raise ConfigError(f'{where} has no "messages" list nor another chat format\'s keys; each line '
                                      f"must be one of: {_ACCEPTED}")
                raise _missing(row, next(f for k, f in _PARTIAL if k in row), where)
            fmt, first = this, lineno
        elif this is None:
            raise _missing(row, fmt, where)
        elif this != fmt:
            raise ConfigError(f"{where} is a {this} row, but line {first} made {path} a {fmt} file; give each file "
                              "rows of one format (split it, or convert the rows)")
        msgs = row_messages(row, fmt, where)
        if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
            empty.append(lineno)
            continue
        out.append((lineno, msgs))
    if empty and not out:
        raise ConfigError(f"every conversation of {path} has an empty assistant answer (lines {empty[0]}..."
                          f"{empty[-1]}); fill in the answers")
    if empty:
        warn_rank0(f"{path}: skipped {len(empty)} conversations with an empty assistant answer (first at line "
                   f"{empty[0]}), which would train the model to end its turn at once; fill them in or drop them")
    if not out:
        raise ConfigError(f"{path} holds no conversations; give at least one line")
    return fmt, out


def read_chat_jsonl(path: str) -> List[List[dict]]:
    """Conversations (message lists) of a chat jsonl of any ``FORMATS`` row format."""
    return [msgs for _, msgs in read_chat_rows(path)[1]]


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def warn_rank0(msg: str) -> None:
    """Every rank reads the data; one ``warning:`` line is enough (the project's one-line form: ``warnings.warn``
    echoed the calling source line under it)."""
    from megallama.initialize import warn_rank_0
    warn_rank_0(msg)


def print_rank0(msg: str) -> None:
    if _rank0():
        print(msg, flush=True)
