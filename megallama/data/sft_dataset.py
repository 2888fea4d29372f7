"""Instruction fine-tuning data: chat template, loss masks on assistant answers, padding or packing.

A chat jsonl holds ``messages`` rows, or ShareGPT, TRL prompt/completion, prompt/response or Alpaca rows
(``sft_formats``), all read as message lists. Each conversation is rendered in the ``--chat-template``
(``chat_templates``: Meta's Llama 3 or Llama 2 format; auto: the one the tokenizer names), and only the assistant
contents and their end-of-turn token (``<|eot_id|>``, Llama 2's ``</s>``) are trained on (a conversation with an
empty answer is skipped, counted in one warning). Llama 3's format uses Llama 3's special tokens where the tokenizer
has them; others (the bundled BPE) get ``bos``/``eos`` and the header markers as plain text, so a checkpoint
pretrained with that tokenizer fine-tunes without resizing its vocabulary. A tokenizer without an eos cannot end a
turn and is refused.

Samples are ``seq_length + 1`` tokens: one conversation padded (``packing=False``), or several whole conversations
packed first-fit in a shuffled order (each into the first sample with room), with ``position_ids`` restarting at
each conversation and ``document_ids`` telling the attention where documents end. ``ds[i]`` past the first epoch
reads the same samples in a new order per epoch, a function of (seed, i) alone, so resuming stays exact. The loss
is normalised by the number of answer tokens in the whole global batch (all micro-batches, all data-parallel
ranks): ``wrap_iterator`` attaches that count to each batch.
"""
from __future__ import annotations

import os
from collections import deque
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from megallama.data.chat_templates import (ChatTemplate, Llama2ChatTemplate, build_chat_template,  # noqa: F401
                                           own_chat_template, resolve_chat_format, template_format)
from megallama.data.sft_formats import ROLES, print_rank0, read_chat_jsonl, read_chat_rows  # noqa: F401
from megallama.data.sft_formats import warn_rank0 as _warn_rank0
from megallama.errors import ConfigError

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def get_bundled_chat_path() -> str:
    """A small bundled chat jsonl (synthetic arithmetic / word tasks; tools/make_chat_sample.py)."""
    return os.path.join(_ASSETS, "chat_sample.jsonl.gz")


class SFTDataset(torch.utils.data.Dataset):
    """Fixed samples built from tokenized conversations ((tokens, mask) pairs). ``len`` is ``num_samples`` if given
    (as GPTDataset: the samples a run reads), else one epoch; ``ds[i]`` works for any i >= 0."""

    def __init__(self, conversations: List[Tuple[np.ndarray, np.ndarray]], seq_length: int, pad_id: int,
                 packing: bool = False, seed: int = 1234, name: str = "train", num_samples: Optional[int] = None):
        self.seq_length, self.pad_id, self.packing, self.name, self.seed = seq_length, pad_id, packing, name, seed
        n = seq_length + 1
        convs, truncated, cut_away, no_answer = [], 0, 0, 0
        for toks, mask in conversations:
            if mask[1:].sum() == 0:  # no assistant turn at all: a longer sequence would not help
                no_answer += 1
                continue
            cut = len(toks) > n
            if cut:
                toks, mask = toks[:n], mask[:n]
            if mask[1:].sum() == 0:  # its answer was truncated away
                cut_away += 1
                continue
            truncated += cut  # counted once: a conversation cut and then dropped is only "dropped"
            convs.append((toks, mask))
        if not convs:
            if not cut_away:  # none to truncate: a longer sequence won't help
                raise ConfigError(f"no {name} conversation has an assistant turn, and only assistant answers are "
                                  "trained on; add assistant messages to the chat data")
            raise ConfigError(f"no {name} conversation has an assistant answer within --seq-length {seq_length}")
        if no_answer:
            _warn_rank0(f"{name}: {no_answer} conversations without an assistant turn dropped (only assistant "
                        "answers are trained on)")
        said = ([f"{truncated} conversations truncated to --seq-length {seq_length} (+1 label token) and kept"]
                if truncated else []) + ([f"{cut_away} dropped whose answer was truncated away"] if cut_away else [])
        if said:
            _warn_rank0(f"{name}: {', '.join(said)}; raise --seq-length to keep more")
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
    out of the sum: counted over dp x cp, every sample would count cp times. Under ``--rampup-batch-size`` the loop
    sets ``num_microbatches`` before each iteration (the buffer is empty then), and each batch carries the count
    its loss is scaled by, so an iteration's count never takes in the next one's samples."""

    def __init__(self, iterator, num_microbatches: int):
        self.iterator, self.num_microbatches, self.buffer = iterator, num_microbatches, deque()

    def __iter__(self):
        return self

    def __next__(self):
        if not self.buffer:
            from megallama.mpu import parallel_state as ps
            batches = [next(self.iterator) for _ in range(self.num_microbatches)]
            n = torch.stack([b["loss_mask"].sum() for b in batches]).sum().double().reshape(1)
            if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
                dev = ps.default_device() if dist.get_backend() == "nccl" else torch.device("cpu")
                n = n.to(dev)
                dist.all_reduce(n, group=ps.get_data_parallel_group())
                n = n.cpu()
            for b in batches:
                b["num_loss_tokens"], b["num_microbatches"] = n[0].clone(), self.num_microbatches
            self.buffer.extend(batches)
        return self.buffer.popleft()


def tokenize_conversations(conversations: List[List[dict]], template, where: Optional[Sequence[str]] = None):
    """(tokens, mask) arrays per conversation; ``where`` names each one's file line in a template's refusal (Llama
    2's role order)."""
    out = []
    for i, msgs in enumerate(conversations):
        try:
            t, m = template.encode_dialog(msgs)
        except ConfigError as e:
            raise ConfigError(f"{where[i]}: {e}" if where else str(e)) from None
        out.append((np.asarray(t, dtype=np.int64), np.asarray(m, dtype=np.int64)))
    return out


_NAMES = {"llama3": "Llama 3", "llama2": "Llama 2"}


def chat_template_for(tokenizer, chat_format: Optional[str] = "auto"):
    """The template to train with (``--chat-template``; auto: the tokenizer's), said in one start-up line; a
    tokenizer that ships another format than the one used is warned about (the model learns the one used)."""
    name, why = resolve_chat_format(chat_format, tokenizer)
    template = build_chat_template(name, tokenizer)
    tok_name = getattr(tokenizer, "name", tokenizer)
    print_rank0(f"chat template: {name} ({why}{'' if why == '--chat-template' else '; --chat-template overrides it'})"
                f", tokenizer {tok_name}")
    own = own_chat_template(tokenizer)
    if own and template_format(own) != name:  # e.g. ChatML, or Llama 2's [INST] under --chat-template llama3
        _warn_rank0(f"tokenizer '{tok_name}' ships a chat template that is not {_NAMES[name]}'s; fine-tuning "
                    f"formats chats as {_NAMES[name]}'s (the model learns that format), so prompt the result with "
                    "tools/generate.py --chat, or export it with tools/convert_checkpoint.py megallama-to-hf (which "
                    f"writes the {_NAMES[name]} template it trained on)")
    return template


def build_sft_datasets(path: Optional[str], tokenizer, seq_length: int, seed: int = 1234, split="98,2,0",
                       packing: bool = False, num_train_samples: Optional[int] = None, chat_format: str = "auto"):
    """(train, valid) SFT datasets from a chat jsonl (default: the bundled sample). valid is None when its split is
    empty. Conversations are split by contiguous ranges (as pretraining documents) before shuffling.
    ``num_train_samples``: the train set's length (the samples the run reads, later epochs reshuffled); default one
    epoch. ``chat_format``: ``--chat-template``; the one used is ``train.chat_format`` (saved with the run)."""
    from megallama.data.gpt_dataset import split_document_ranges
    path = path or get_bundled_chat_path()
    template = chat_template_for(tokenizer, chat_format)
    rows = read_chat_rows(path)[1]
    convs = tokenize_conversations([m for _, m in rows], template, [f"{path} line {n}" for n, _ in rows])
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
            _warn_rank0(f"no validation set: {e}")
    if packing and len(train.convs) > 1 and train.samples_per_epoch == len(train.convs):
        print_rank0(f"note: --sft-packing packed nothing: no two of the {len(train.convs)} train conversations fit "
                    f"one sequence of --seq-length {seq_length} (+1 label token); a longer --seq-length packs more")
    train.chat_format = template.name
    return train, valid
