"""Megatron-LM's GPT2BPETokenizer: GPT-2's byte-level BPE from a local ``vocab.json`` and ``merges.txt``
(``--tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt``), through the
``tokenizers`` package. Same ids as Megatron's ``_GPT2BPETokenizer``: GPT-2's pre-tokenizer regex, no prefix
space, no bos, eod = ``<|endoftext|>``, vocabulary = the vocab.json's entries (padded by the run as for any
tokenizer). ``<|endoftext|>`` written inside a document is plain text, as in Megatron's encoder.

megallama names a tokenizer by (type, model) everywhere (checkpoints, data records, pickling), so the two files
travel as one ``--tokenizer-model`` value, ``VOCAB:MERGES`` (absolute paths joined by ``os.pathsep``):
``gpt2_flags_to_model`` turns the Megatron flags into it, and it is what ``--tokenizer-model`` takes for tools that
have no --vocab-file/--merge-file (tools/generate.py, convert_checkpoint.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Tuple

from megallama.data.tokenizer import _Tokenizer, file_sha256
from megallama.errors import ConfigError

EOD_TOKEN = "<|endoftext|>"
GPT2_TYPES = ("gpt2", "gpt2bpetokenizer")
_NEEDS = "needs --vocab-file VOCAB.json and --merge-file MERGES.txt (GPT-2's vocab.json and merges.txt)"


def is_gpt2_type(tokenizer_type: Optional[str]) -> bool:
    return (tokenizer_type or "").lower() in GPT2_TYPES


def gpt2_tokenizer_model(vocab_file: str, merge_file: str) -> str:
    """The ``--tokenizer-model`` value naming both files (absolute: checkpoints must not depend on the cwd)."""
    return f"{os.path.abspath(vocab_file)}{os.pathsep}{os.path.abspath(merge_file)}"


def split_gpt2_model(tokenizer_model: str, spelled: str = "GPT2BPETokenizer") -> Tuple[str, str]:
    """(vocab file, merges file) of a ``VOCAB:MERGES`` value; each must exist."""
    vocab, sep, merges = tokenizer_model.rpartition(os.pathsep)
    if not sep or not vocab or not merges:
        raise ConfigError(f"--tokenizer-type {spelled} {_NEEDS}; as one --tokenizer-model value write "
                          f"VOCAB.json{os.pathsep}MERGES.txt (got {tokenizer_model})")
    for flag, path, what in (("--vocab-file", vocab, "vocab.json"), ("--merge-file", merges, "merges.txt")):
        if not os.path.isfile(path):
            raise ConfigError(f"{flag} {path}: no such file; pass GPT-2's {what} (no network: it is never downloaded)")
    return vocab, merges


def gpt2_flags_to_model(tokenizer_type: Optional[str], tokenizer_model: Optional[str], vocab_file: Optional[str],
                        merge_file: Optional[str]) -> Optional[str]:
    """Megatron's --vocab-file/--merge-file -> the --tokenizer-model value (unchanged for other tokenizers); one
    ConfigError line for a missing file, a missing flag, or the flags given with another tokenizer type."""
    given = [f for f, v in (("--vocab-file", vocab_file), ("--merge-file", merge_file)) if v is not None]
    if not is_gpt2_type(tokenizer_type):
        if given:
            raise ConfigError(f"{given[0]} is read by --tokenizer-type GPT2BPETokenizer only, not "
                              f"{tokenizer_type or 'the default (bundled)'}; pass --tokenizer-type GPT2BPETokenizer "
                              f"or drop {' and '.join(given)}")
        return tokenizer_model
    if tokenizer_model is not None:
        if given:
            raise ConfigError(f"--tokenizer-model and {' and '.join(given)} both name the GPT-2 files; pass "
                              "--vocab-file and --merge-file only")
        return tokenizer_model
    if len(given) < 2:
        missing = "--merge-file MERGES.txt" if vocab_file is not None else "--vocab-file VOCAB.json"
        raise ConfigError(f"--tokenizer-type {tokenizer_type} {_NEEDS}; add {missing}")
    model = gpt2_tokenizer_model(vocab_file, merge_file)
    split_gpt2_model(model, tokenizer_type)  # both exist, said now (before any data is read)
    return model


class GPT2BPETokenizer(_Tokenizer):
    """GPT-2 byte-level BPE (see the module docstring). Pickles as (type, VOCAB:MERGES) like the others."""

    def __init__(self, vocab_file: str, merge_file: str, tokenizer_type: str = "gpt2"):
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        except ImportError:
            raise ConfigError("--tokenizer-type GPT2BPETokenizer needs the 'tokenizers' package, which is not "
                              "installed; pip install tokenizers") from None
        self.tokenizer_type, self.vocab_file, self.merge_file = tokenizer_type, vocab_file, merge_file
        self.path = gpt2_tokenizer_model(vocab_file, merge_file)
        vocab = _read_vocab(vocab_file)
        if EOD_TOKEN not in vocab:
            raise ConfigError(f"--vocab-file {vocab_file} has no {EOD_TOKEN} token (GPT-2's end of text, the eod "
                              "that separates documents); pass GPT-2's vocab.json or one that holds it")
        merges = _read_merges(merge_file)
        try:
            bpe = models.BPE(vocab, merges)
        except Exception as e:  # a merge of tokens the vocabulary lacks
            raise ConfigError(f"--merge-file {merge_file} does not fit --vocab-file {vocab_file} "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); pass the pair that was "
                              "trained together") from None
        self.tok = Tokenizer(bpe)
        self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex
        self.tok.decoder = decoders.ByteLevel()
        self.vocab_size = max(len(vocab), max(vocab.values()) + 1)  # len(vocab.json), as Megatron's
        self.eos_id = self.pad_id = vocab[EOD_TOKEN]  # Megatron's GPT-2 tokenizer has no pad
        self.bos_id = None  # nor a bos
        self.name = f"gpt2-bpe:{os.path.basename(vocab_file)}"
        both = f"{file_sha256(vocab_file)}:{file_sha256(merge_file)}"
        self.fingerprint = f"gpt2:{hashlib.sha256(both.encode()).hexdigest()}"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _read_vocab(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--vocab-file {path} is not JSON ({str(e).splitlines()[0]}); pass GPT-2's vocab.json "
                          "(token -> id)") from None
    if not isinstance(vocab, dict) or not vocab or not all(isinstance(i, int) and i >= 0 for i in vocab.values()):
        raise ConfigError(f"--vocab-file {path} is not a token -> id mapping; pass GPT-2's vocab.json")
    return vocab


def _read_merges(path: str) -> list:
    """merges.txt: an optional '#version' line, then 'a b' per line (byte-level tokens hold no spaces)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError:
        raise ConfigError(f"--merge-file {path} is not UTF-8 text; pass GPT-2's merges.txt") from None
    merges = []
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--merge-file {path} line {lineno} is not two tokens 'a b'; pass GPT-2's merges.txt")
        merges.append((parts[0], parts[1]))
    return merges
