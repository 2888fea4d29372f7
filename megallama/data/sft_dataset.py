"""Instruction fine-tuning data: Llama 3 chat template, loss masks on assistant answers, padding or packing.

A jsonl line is ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``. Each conversation is
rendered as Meta's Llama 3 format::

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n{content}<|eot_id|>...

and only the assistant contents and their closing ``<|eot_id|>`` are trained on (a conversation with an empty
answer is skipped, counted in one warning). Tokenizers that have Llama 3's
special tokens (the tiktoken ranks file, HF tokenizer.json of Llama 3) use them; others (the bundled BPE, Llama 2)
get ``bos``/``eos`` for begin-of-text/end-of-turn and the header markers as plain text, so a checkpoint pretrained
with that tokenizer fine-tunes without resizing its vocabulary. A tokenizer without a bos (GPT-2, Qwen) starts each
conversation at its first header, as those models' own chat formats do; one without an eos cannot end a turn and is
refused.

Samples are ``seq_length + 1`` tokens: one conversation padded (``packing=False``), or several whole conversations
packed first-fit in a shuffled order (each into the first sample with room), with ``position_ids`` restarting at
each conversation and ``document_ids`` telling the attention where documents end. ``ds[i]`` past the first epoch
reads the same samples in a new order per epoch, a function of (seed, i) alone, so resuming stays exact. The loss
is normalised by the number of answer tokens in the whole global batch (all micro-batches, all data-parallel
ranks): ``wrap_iterator`` attaches that count to each batch.
"""
from __future__ import annotations

import gzip
import json
import os
import warnings
import zlib
from collections import deque
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megallama.errors import ConfigError

ROLES = ("system", "user", "assistant", "ipython", "tool")
_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def get_bundled_chat_path() -> str:
    """A small bundled chat jsonl (synthetic arithmetic / word tasks; tools/make_chat_sample.py)."""
    return os.path.join(_ASSETS, "chat_sample.jsonl.gz")


class ChatTemplate:
    """Llama 3 chat format on any tokenizer with ``encode``/``bos_id``/``eos_id``."""

    SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ids = {s: self._special_id(tokenizer, s) for s in self.SPECIALS}
        self.native = all(v is not None for v in ids.values())
        if self.native:
            self.bos, self.start_header, self.end_header, self.eot = (ids[s] for s in self.SPECIALS)
        else:  # text markers; one-token begin/end so generation can stop on eos
            self.bos, self.eot = _token_id(tokenizer.bos_id), _token_id(tokenizer.eos_id)
            self.start_header, self.end_header = None, None
            if self.eot is None:
                raise ConfigError(f"tokenizer '{getattr(tokenizer, 'name', tokenizer)}' has no end-of-text token, "
                                  "which the chat template ends every turn with; fine-tune with a tokenizer that has "
                                  "an eos (or Llama 3's <|eot_id|>)")
        pad = _token_id(getattr(tokenizer, "pad_id", None))
        self.pad_id = self.eot if pad is None else pad

    @staticmethod
    def _special_id(tok, s: str) -> Optional[int]:
        specials = getattr(tok, "special_tokens", None)
        if isinstance(specials, dict) and s in specials:
            return specials[s]
        inner = getattr(tok, "tok", None)  # HF tokenizers.Tokenizer
        if inner is not None and hasattr(inner, "token_to_id"):
            return inner.token_to_id(s)
        return None

    def header(self, role: str) -> List[int]:
        if self.native:
            return [self.start_header] + self.tokenizer.encode(role) + [self.end_header] + \
                self.tokenizer.encode("\n\n")
        return self.tokenizer.encode(f"<|start_header_id|>{role}<|end_header_id|>\n\n")

    def encode_dialog(self, messages: Sequence[dict], add_generation_prompt: bool = False
                      ) -> Tuple[List[int], List[int]]:
        """(tokens, mask): mask is 1 on the tokens an assistant message contributes (content + end of turn)."""
        tokens = [] if self.bos is None else [self.bos]  # no bos (GPT-2, Qwen): the first header starts it
        mask = [0] * len(tokens)
        for m in messages:
            h = self.header(m["role"])
            body = self.tokenizer.encode(m["content"].strip()) + [self.eot]
            tokens += h + body
            train = 1 if m["role"] == "assistant" else 0
            mask += [0] * len(h) + [train] * len(body)
        if add_generation_prompt:
            h = self.header("assistant")
            tokens += h
            mask += [0] * len(h)
        return tokens, mask


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


def _token_id(i) -> Optional[int]:
    """A special token's id, or None where the tokenizer has none (HF: None; sentencepiece: -1)."""
    return None if i is None or int(i) < 0 else int(i)


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


def read_chat_jsonl(path: str) -> List[List[dict]]:
    """Conversations of a jsonl file; a malformed line raises ConfigError naming the file and line."""
    if not os.path.isfile(path):
        raise ConfigError(f"chat data {path} does not exist; pass --data-path with a .jsonl of "
                          '{"messages": [{"role": ..., "content": ...}]} lines')
    out, empty = [], []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where} is not valid JSON ({e.msg}); fix or remove that line") from None
        msgs = obj.get("messages") if isinstance(obj, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise ConfigError(f'{where} has no "messages" list; each line must be {{"messages": [{{"role": '
                              f'..., "content": ...}}, ...]}}')
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ConfigError(f"{where}: every message needs a role in {', '.join(ROLES)} and a string "
                                  f"content, got {str(m)[:80]}")
            try:
                m["content"].encode("utf-8")
            except UnicodeEncodeError as e:  # a lone "\udXXX" escape: no character, no token
                raise ConfigError(f"{where}: a {m['role']} content holds an unpaired surrogate escape "
                                  f"({m['content'][e.start]!r}); write the character itself or its full "
                                  f"surrogate pair") from None
        if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
            empty.append(lineno)  # trained on, it would teach the model to end its turn at once
            continue
        out.append(msgs)
    if empty and not out:
        raise ConfigError(f"every conversation of {path} has an empty assistant answer (lines {empty[0]}..."
                          f"{empty[-1]}); fill in the answers")
    if empty:
        _warn_rank0(f"{path}: skipped {len(empty)} conversations with an empty assistant answer (first at line "
                    f"{empty[0]}), which would train the model to end its turn at once; fill them in or drop them")
    if not out:
        raise ConfigError(f"{path} holds no conversations; give at least one line")
    return out


def _warn_rank0(msg: str) -> None:
    """Every rank reads the data; one warning is enough."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        warnings.warn(msg, stacklevel=3)


class SFTDataset(torch.utils.data.Dataset):
    """Fixed samples built from tokenized conversations ((tokens, mask) pairs). ``len`` is ``num_samples`` if given
    (as GPTDataset: the samples a run reads), else one epoch; ``ds[i]`` works for any i >= 0."""

    def __init__(self, conversations: List[Tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int,
                 packing: bool = False, seed: int = 1234, name: str = "train", num_samples: Optional[int] = None):
        self.seq_length, self.pad_id, self.packing, self.name, self.seed = seq_length, pad_id, packing, name, seed
        n = seq_length + 1
        convs, truncated, dropped = [], 0, 0
        for toks, mask in conversations:
            if len(toks) > n:
                toks, mask, truncated = toks[:n], mask[:n], truncated + 1
            if mask[1:].sum() == 0:  # nothing left to learn (no answer, or answer truncated away)
                dropped += 1
                continue
            convs.append((toks, mask))
        if truncated or dropped:
            _warn_rank0(f"{name}: {truncated} conversations truncated to --seq-length {seq_length} (+1 label "
                        f"token), {dropped} without answer tokens dropped; raise --seq-length to keep more")
        if not convs:
            if not any(m[1:].sum() for _, m in conversations):  # none to truncate: a longer sequence won't help
                raise ConfigError(f"no {name} conversation has an assistant turn, and only assistant answers are "
                                  "trained on; add assistant messages to the chat data")
            raise ConfigError(f"no {name} conversation has an assistant answer within --seq-length {seq_length}")
        order = np.random.RandomState(seed).permutation(len(convs))
        self.convs = convs
        self.samples: List[List[int]] = []
        if packing:
            bins = first_fit([len(convs[i][0]) for i in order], n)
            self.samples = [[int(order[p]) for p in b] for b in bins]
        else:
            self.samples = [[int(i)] for i in order]
        self.samples_per_epoch = len(self.samples)
        self.num_samples = self.samples_per_epoch if num_samples is None else int(num_samples)
        self._perm: Tuple[int, Optional[np.ndarray]] = (0, None)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def sample_conversations(self, idx: int) -> List[int]:
        """The conversations of sample ``idx``: epoch 0 in the built order, each later epoch a permutation of the
        same samples seeded by (seed, epoch), so a sample never depends on what was read before it."""
        if idx < 0:
            raise IndexError(f"sample index {idx} < 0")
        epoch, k = divmod(int(idx), self.samples_per_epoch)
        if epoch:
            if self._perm[0] != epoch:
                rng = np.random.RandomState([self.seed & 0xFFFFFFFF, epoch])
                self._perm = (epoch, rng.permutation(self.samples_per_epoch))
            k = int(self._perm[1][k])
        return self.samples[k]

    @property
    def num_answer_tokens(self) -> int:
        return int(sum(m[1:].sum() for _, m in self.convs))

    def __getitem__(self, idx: int) -> dict:
        n = self.seq_length + 1
        toks = np.full(n, self.pad_id, dtype=np.int64)
        mask = np.zeros(n, dtype=np.float32)
        pos = np.zeros(n, dtype=np.int64)
        doc = np.zeros(n, dtype=np.int64)
        at = 0
        for j, i in enumerate(self.sample_conversations(idx)):
            t, m = self.convs[i]
            toks[at:at + len(t)], mask[at:at + len(t)] = t, m
            pos[at:at + len(t)] = np.arange(len(t))
            doc[at:at + len(t)] = j
            at += len(t)
        pos[at:] = np.arange(n - at)
        doc[at:] = doc[at - 1] + 1 if at else 0
        out = {"input_ids": torch.from_numpy(toks[:-1].copy()), "labels": torch.from_numpy(toks[1:].copy()),
               "loss_mask": torch.from_numpy(mask[1:].copy())}
        if self.packing:
            out["position_ids"] = torch.from_numpy(pos[:-1].copy())
            out["document_ids"] = torch.from_numpy(doc[:-1].copy())
        return out

    def wrap_iterator(self, iterator, num_microbatches: int):
        """The training loop's hook: attach the global answer-token count of each iteration's batches."""
        return GlobalTokenCountIterator(iterator, num_microbatches)


def first_fit(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Positions of ``lengths`` (each <= capacity) grouped into bins: each goes into the first bin with room, else a
    new one. A max-tree over the bins' free space finds that bin in O(log n), so n items take O(n log n)."""
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [capacity] * (2 * size)  # leaves: a bin's free space (unopened bins: all of it); inner: max of children
    bins: List[List[int]] = []
    for pos, ln in enumerate(lengths):
        node = 1
        while node < size:  # the leftmost leaf with room
            node = 2 * node if free[2 * node] >= ln else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(pos)
        free[node] -= ln
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


class GlobalTokenCountIterator:
    """Reads one iteration's ``num_microbatches`` batches ahead, all-reduces their ``loss_mask`` sum over the data
    parallel group, and attaches it to each batch as ``num_loss_tokens``. With it the loss
    ``sum(loss * mask) * num_microbatches * dp * cp / num_loss_tokens`` averages (over micro-batches, then dp x cp
    ranks) to the exact per-token mean of the global batch, however unevenly answers fall into micro-batches.
    Context-parallel ranks read the same samples (each keeps its share of the sequence later), so they are left
    out of the sum: counted over dp x cp, every sample would count cp times."""

    def __init__(self, iterator, num_microbatches: int):
        self.iterator, self.m, self.buffer = iterator, num_microbatches, deque()

    def __iter__(self):
        return self

    def __next__(self):
        if not self.buffer:
            from megallama.mpu import parallel_state as ps
            batches = [next(self.iterator) for _ in range(self.m)]
            n = torch.stack([b["loss_mask"].sum() for b in batches]).sum().double().reshape(1)
            if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
                dev = ps.default_device() if dist.get_backend() == "nccl" else torch.device("cpu")
                n = n.to(dev)
                dist.all_reduce(n, group=ps.get_data_parallel_group())
                n = n.cpu()
            for b in batches:
                b["num_loss_tokens"] = n[0].clone()
            self.buffer.extend(batches)
        return self.buffer.popleft()


def tokenize_conversations(conversations: List[List[dict]], template: ChatTemplate):
    out = []
    for msgs in conversations:
        t, m = template.encode_dialog(msgs)
        out.append((np.asarray(t, dtype=np.int64), np.asarray(m, dtype=np.int64)))
    return out


def build_sft_datasets(path: Optional[str], tokenizer, seq_length: int, seed: int = 1234, split="98,2,0",
                       packing: bool = False, num_train_samples: Optional[int] = None):
    """(train, valid) SFT datasets from a chat jsonl (default: the bundled sample). valid is None when its split is
    empty. Conversations are split by contiguous ranges (as pretraining documents) before shuffling.
    ``num_train_samples``: the train set's length (the samples the run reads, later epochs reshuffled); default one
    epoch."""
    from megallama.data.gpt_dataset import split_document_ranges
    path = path or get_bundled_chat_path()
    template = ChatTemplate(tokenizer)
    own = own_chat_template(tokenizer)
    if own and "<|start_header_id|>" not in own:  # e.g. Llama 2's [INST] or ChatML: another format than ours
        _warn_rank0(f"tokenizer '{getattr(tokenizer, 'name', tokenizer)}' ships a chat template that is not Llama "
                    "3's; fine-tuning formats chats as Llama 3's (the model learns that format), so prompt the "
                    "result with tools/generate.py --chat, or export it with tools/convert_checkpoint.py megallama-to-hf "
                    "(which writes the Llama 3 template it trained on)")
    convs = tokenize_conversations(read_chat_jsonl(path), template)
    ranges = split_document_ranges(len(convs), split)
    if ranges[0][1] <= ranges[0][0]:
        raise ConfigError(f"--split {split} leaves no training conversations out of {len(convs)}; give the first "
                          f"weight more")
    train = SFTDataset(convs[ranges[0][0]:ranges[0][1]], seq_length, template.pad_id, packing, seed, "train",
                       num_train_samples)
    valid = None
    if ranges[1][1] > ranges[1][0]:
        try:
            valid = SFTDataset(convs[ranges[1][0]:ranges[1][1]], seq_length, template.pad_id, packing, seed + 1,
                               "valid")
        except ConfigError as e:
            warnings.warn(f"no validation set: {e}")
    return train, valid
