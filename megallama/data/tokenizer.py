"""Tokenizers, all from local files (no network ever): the bundled sentencepiece BPE, any Llama 1/2 style
sentencepiece ``.model``, Llama 3's tiktoken ranks file with its 256 special tokens, HF ``tokenizer.json``, and
GPT-2's vocab.json + merges.txt (``gpt2_tokenizer.py``).

Every tokenizer has the same small surface: ``vocab_size``, ``encode(text) -> list[int]`` (no bos/eos added: the
data pipeline decides), ``decode(ids)``, ``bos_id``, ``eos_id`` (== ``eod``, what separates packed documents),
``pad_id``, ``name`` and ``fingerprint`` (a content hash, so that caches of tokenized data know when to rebuild).
Tokenizers pickle by (type, path), so multiprocessing workers rebuild them instead of shipping C objects.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from typing import Optional, Tuple

from megallama.errors import ConfigError

TOKENIZER_TYPES = ("bundled", "sentencepiece", "llama2", "llama3", "tiktoken", "hf", "gpt2", "null")

# Meta's Llama 3 pre-tokenizer pattern and special tokens (meta-llama/llama3, llama/tokenizer.py).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, LLAMA3_NUM_RESERVED_SPECIAL_TOKENS - 5)]
_TIKTOKEN_MAX_ENCODE_CHARS = 400_000  # tiktoken's Rust core can overflow its stack beyond these (Meta splits too)
_MAX_NO_WHITESPACE_CHARS = 25_000


def file_sha256(path: str) -> str:
    """Content hash of a file (tokenizer fingerprints, tokenized-data cache keys): a copy hashes the same."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _require_file(path: str | None, tokenizer_type: str, what: str) -> str:
    if path is None:
        raise ConfigError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model PATH ({what})")
    if not os.path.isfile(path):
        raise ConfigError(f"tokenizer model file not found: {path}; pass --tokenizer-model with an existing {what} "
                          f"(no network: it is never downloaded)")
    return path


class _Tokenizer:
    """Shared plumbing: pickling by (type, path), and the eod alias Megatron's data code uses."""
    tokenizer_type: str
    path: str

    def __reduce__(self):
        return build_tokenizer, getattr(self, "_build_args", (self.tokenizer_type, self.path))

    @property
    def eod(self) -> int:
        return self.eos_id

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """``add_special_tokens``: what the tokenizer file itself puts around a text (only an HF tokenizer.json's
        post-processor does: Megatron's HuggingFaceTokenizer data starts with its bos); nothing for the others,
        as for Megatron's sentencepiece and tiktoken tokenizers."""
        return [self.encode(t) for t in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, path={self.path!r})"


class SentencePieceTokenizer(_Tokenizer):
    """Llama 1/2 style sentencepiece model. Without a pad piece (Llama 2 has none) pad falls back to eos."""

    def __init__(self, path: str, tokenizer_type: str = "sentencepiece", name: str | None = None):
        import sentencepiece as spm
        self.tokenizer_type, self.path = tokenizer_type, path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"{path} is not a sentencepiece model ({str(e).splitlines()[0]}); pass a .model file "
                              f"trained by sentencepiece, or pick the matching --tokenizer-type") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.name = name or f"sentencepiece:{os.path.basename(path)}"
        self.fingerprint = f"sentencepiece:{file_sha256(path)}"

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=1)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def load_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Read a tiktoken ranks file (``base64(token) rank`` per line), as Meta ships Llama 3's tokenizer.model."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ConfigError(f"{path} line {lineno} is not 'base64-token rank': not a tiktoken ranks file; "
                                  f"pass Llama 3's tokenizer.model or pick the matching --tokenizer-type") from None
    if not ranks:
        raise ConfigError(f"{path} holds no tokens; pass Llama 3's tokenizer.model (a tiktoken ranks file)")
    return ranks


def _split_long_runs(s: str, max_len: int):
    """Cut runs of more than max_len consecutive whitespace or non-whitespace chars (Meta's Llama 3 guard)."""
    start, run, is_space = 0, 0, s[:1].isspace()
    for i, ch in enumerate(s):
        if ch.isspace() != is_space:
            is_space, run = not is_space, 1
        else:
            run += 1
            if run > max_len:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


class Llama3Tokenizer(_Tokenizer):
    """Llama 3: tiktoken BPE over a local ranks file; the 256 special tokens follow the base vocabulary (128000+
    for Meta's file). Special-token text inside documents is encoded as plain text, never as control tokens."""

    def __init__(self, path: str, tokenizer_type: str = "llama3"):
        import tiktoken
        self.tokenizer_type, self.path = tokenizer_type, path
        ranks = load_tiktoken_ranks(path)
        n = len(ranks)
        self.special_tokens = {tok: n + i for i, tok in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=os.path.basename(path), pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.vocab_size = n + len(self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.pad_id = self.eos_id  # Llama 3 has no pad token
        self.name = f"llama3:{os.path.basename(path)}"
        self.fingerprint = f"llama3:{file_sha256(path)}"

    def encode(self, text: str) -> list[int]:
        out = []
        for i in range(0, len(text), _TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_long_runs(text[i:i + _TIKTOKEN_MAX_ENCODE_CHARS], _MAX_NO_WHITESPACE_CHARS):
                out += self.model.encode(piece, allowed_special=set(), disallowed_special=())
        return out

    def decode(self, ids) -> str:
        return self.model.decode([int(i) for i in ids])


_HF_BOS = ("<|begin_of_text|>", "<s>", "<bos>", "[BOS]", "<|startoftext|>")
_HF_EOS = ("<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>")
_HF_PAD = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


class HFTokenizer(_Tokenizer):
    """A ``tokenizer.json`` (or a folder holding one) through the ``tokenizers`` package; bos/eos/pad come from a
    ``tokenizer_config.json`` next to it when present, else from the usual special-token spellings. Special-token
    text inside documents is encoded as plain text, never as control tokens (as for Llama 3)."""

    def __init__(self, path: str, tokenizer_type: str = "hf"):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("--tokenizer-type hf needs the 'tokenizers' package, which is not installed; "
                              "pip install tokenizers (or use a sentencepiece/llama3 tokenizer file)") from None
        self.tokenizer_type, self.path = tokenizer_type, path
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise ConfigError(f"tokenizer model file not found: {file}; pass --tokenizer-model with a tokenizer.json "
                              f"or a folder holding one")
        try:
            self.tok = Tokenizer.from_file(file)
        except Exception as e:
            raise ConfigError(f"{file} is not a HF tokenizer.json ({str(e).splitlines()[0]}); pass a tokenizer.json "
                              f"saved by the tokenizers package") from None
        if not hasattr(self.tok, "encode_special_tokens"):
            import tokenizers
            raise ConfigError(f"tokenizers {tokenizers.__version__} cannot encode special-token text as plain text; "
                              "pip install 'tokenizers>=0.15'")
        # Document text that spells '</s>' or '<|eot_id|>' stays plain text, as on the Llama 3 path: a document
        # must not forge an end of text or a chat turn. Control tokens come from ids (ChatTemplate: token_to_id).
        # Not saved by to_str(), so an exported tokenizer.json is unchanged.
        self.tok.encode_special_tokens = True
        # A saved truncation/padding (often left in Hub files) would cut documents and write pads into the data;
        # transformers' AutoTokenizer, which Megatron reads it through, applies neither unless asked. (to_str() does
        # save these two: an export rebuilt from this object has neither, as megallama tokenized; a copied one keeps
        # the file's.)
        self.tok.no_truncation()
        self.tok.no_padding()
        # the embedding must hold the largest id: a hand-edited file may leave gaps (Megatron counts tokens instead)
        self.vocab_size = max(self.tok.get_vocab_size(with_added_tokens=True),
                              max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1)
        cfg = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        named = self._config_tokens(cfg)
        self.bos_id = self._find(named.get("bos_token"), _HF_BOS)
        self.eos_id = self._find(named.get("eos_token"), _HF_EOS)
        if self.eos_id is None:
            raise ConfigError(f"{file} has no end-of-text token (looked for {', '.join(_HF_EOS)}); add one or give "
                              f"a tokenizer_config.json with eos_token next to it")
        pad = self._find(named.get("pad_token"), _HF_PAD)
        self.pad_id = self.eos_id if pad is None else pad
        self.name = f"hf:{os.path.basename(os.path.abspath(path))}"
        self.fingerprint = f"hf:{file_sha256(file)}"
        # eos/bos come from tokenizer_config.json too (Llama 3 base and Instruct share a tokenizer.json but not the
        # eos): the jsonl cache key holds them, so a changed config tokenizes again
        self.special_ids_key = f"bos={self.bos_id},eos={self.eos_id}"

    @staticmethod
    def _config_tokens(cfg: str) -> dict:
        if not os.path.isfile(cfg):
            return {}
        try:
            with open(cfg, encoding="utf-8") as f:
                data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cfg} is not JSON ({str(e).splitlines()[0]}); fix or remove it (the tokenizer's "
                              f"eos/bos/pad tokens are then looked up by name)") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{cfg} is not a JSON object; fix or remove it (the tokenizer's eos/bos/pad tokens are "
                              f"then looked up by name)")
        out = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            v = data.get(key)
            out[key] = v.get("content") if isinstance(v, dict) else v
        return out

    def _find(self, preferred, candidates):
        for tok in ((preferred,) if preferred else ()) + candidates:
            i = self.tok.token_to_id(tok)
            if i is not None:
                return i
        return None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


class NullTokenizer(_Tokenizer):
    """Megatron's NullTokenizer: a text is its token ids, space separated ("12 7 300"); ``vocab_size`` ids plus the
    eod, which is ``vocab_size`` itself (so the vocabulary is one larger, as in Megatron). For corpora tokenized
    elsewhere and for benchmarks."""

    def __init__(self, vocab_size: int):
        self.tokenizer_type, self.path, self._ids = "null", None, int(vocab_size)
        self.vocab_size = self._ids + 1
        self.eos_id = self.pad_id = self._ids
        self.bos_id = None  # Megatron's has none
        self.name = f"null-{self._ids}"
        self.fingerprint = f"null:{self._ids}"

    def __reduce__(self):
        return build_tokenizer, ("null", None, self._ids)

    def encode(self, text: str) -> list[int]:
        ids = [int(x) for x in text.split(" ")]  # Megatron's split: one space between ids
        bad = [i for i in ids if not 0 <= i < self._ids]
        if bad:
            raise ValueError(f"id {bad[0]} is outside [0, {self._ids}) (--vocab-size {self._ids})")
        return ids

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def build_tokenizer(tokenizer_type: str = "bundled", tokenizer_model: str | None = None,
                    vocab_size: int | None = None):
    """The tokenizer for ``--tokenizer-type`` / ``--tokenizer-model`` (Megatron's type names work too). "bundled"
    needs no file (ours ships in the package); "sentencepiece"/"llama2" take a .model, "llama3"/"tiktoken" a tiktoken
    ranks file, "hf" a tokenizer.json or its folder, "gpt2" (GPT2BPETokenizer) ``VOCAB:MERGES`` (what
    --vocab-file/--merge-file become), "null" (NullTokenizer) no file but ``vocab_size``. Bad input raises
    ConfigError naming the value and the fix."""
    tok = _build(tokenizer_type, tokenizer_model, vocab_size)
    if not isinstance(tok, NullTokenizer):  # gpt2: both paths absolute (data records abspath one value)
        tok._build_args = (tokenizer_type, tok.path if tok.tokenizer_type == "gpt2" else tokenizer_model)
    return tok


def checkpoint_tokenizer(saved_args: dict) -> Tuple[Optional[str], Optional[str]]:
    """(--tokenizer-type, --tokenizer-model) a checkpoint was trained with, from its saved arguments; an HF model
    imported by ``convert_checkpoint.py hf-to-megallama`` uses the tokenizer.json (else tokenizer.model) it copied
    into the checkpoint (``tokenizer_files``, made absolute by ``open_checkpoint``); older imports, which copied none,
    that of the folder they came from."""
    t, path = saved_args.get("tokenizer_type"), saved_args.get("tokenizer_model")
    hf_dir = saved_args.get("converted_from")
    own = saved_args.get("tokenizer_files")
    if own and os.path.isabs(own) and os.path.isdir(own):
        hf_dir = own
    if hf_dir and t is None and path is None:
        if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
            return "hf", hf_dir
        model = os.path.join(hf_dir, "tokenizer.model")  # an export of a sentencepiece run, Llama 1/2/3 releases
        if os.path.isfile(model):
            return tokenizer_model_kind(model), model
        raise ConfigError(f"this checkpoint was converted from {hf_dir}, which has no tokenizer.json or "
                          "tokenizer.model; pass the model's tokenizer with --tokenizer-type/--tokenizer-model")
    return t, path


def tokenizer_model_kind(path: str) -> str:
    """A ``tokenizer.model``'s kind: "llama3" for a tiktoken ranks file (text lines "<base64> <rank>"), else
    "sentencepiece"."""
    with open(path, "rb") as f:
        head = f.read(4096).split(b"\n")[0]
    return "llama3" if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", head.strip()) else "sentencepiece"


# Megatron-LM's --tokenizer-type spellings, so its command lines work unchanged. Megatron's preprocess_data.py
# (megatron.core.tokenizers) encodes with all three sentencepiece types alike: no bos, eod = the model's eos.
_MEGATRON_NAMES = {"llama2tokenizer": "llama2", "llama3tokenizer": "llama3", "tiktokenizer": "tiktoken",
                   "sentencepiecetokenizer": "sentencepiece", "gptsentencepiecetokenizer": "sentencepiece",
                   "huggingfacetokenizer": "hf", "gpt2bpetokenizer": "gpt2", "nulltokenizer": "null"}
# Megatron types with no counterpart here -> the fix
_MEGATRON_REFUSED = {
    "bertwordpiecelowercase": "BERT tokenizers are for BERT/T5 models; a Llama takes Llama2Tokenizer, "
                              "Llama3Tokenizer or HuggingFaceTokenizer",
    "bertwordpiececase": "BERT tokenizers are for BERT/T5 models; a Llama takes Llama2Tokenizer, Llama3Tokenizer or "
                         "HuggingFaceTokenizer",
    "multimodaltokenizer": "megallama trains text-only Llamas; pass HuggingFaceTokenizer with the model's folder",
    "nullmultimodaltokenizer": "megallama trains text-only Llamas; pass NullTokenizer",
    "sfttokenizer": "chat data is tokenized by finetune_llama.py (the chat template of the tokenizer); pass "
                    "HuggingFaceTokenizer, Llama3Tokenizer or Llama2Tokenizer",
}


def _looks_like_megatron_tiktoken_json(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(64).lstrip()[:1] in (b"[", b"{")


def _build(tokenizer_type: str, tokenizer_model: str | None, vocab_size: int | None = None):
    spelled = tokenizer_type or "bundled"
    t = _MEGATRON_NAMES.get(spelled.lower(), spelled.lower())
    if t in _MEGATRON_REFUSED:
        raise ConfigError(f"--tokenizer-type {spelled} is not supported; {_MEGATRON_REFUSED[t]}")
    if t == "null":
        if vocab_size is None or vocab_size < 1:
            raise ConfigError(f"--tokenizer-type {spelled} needs its vocabulary size (tools/preprocess_data.py "
                              "--vocab-size N: ids 0..N-1, the eod is N, as in Megatron)")
        if tokenizer_model is not None:
            raise ConfigError(f"--tokenizer-type {spelled} reads ids from the text and takes no --tokenizer-model; "
                              "drop it")
        return NullTokenizer(vocab_size)
    if vocab_size is not None:
        raise ConfigError(f"--vocab-size is read by NullTokenizer only; --tokenizer-type {spelled} takes its "
                          "vocabulary from --tokenizer-model: drop --vocab-size")
    if t == "bundled":
        from megallama.data import get_bundled_tokenizer_path
        path = tokenizer_model or get_bundled_tokenizer_path()
        _require_file(path, spelled, "sentencepiece .model file")
        tok = SentencePieceTokenizer(path, "bundled")
        tok.name = f"bundled-bpe-{tok.vocab_size}" if tokenizer_model is None else tok.name
        return tok
    if t in ("sentencepiece", "llama2"):
        return SentencePieceTokenizer(_require_file(tokenizer_model, spelled, "sentencepiece .model file"), t)
    if t in ("llama3", "tiktoken"):
        path = _require_file(tokenizer_model, spelled, "tiktoken ranks file such as Llama 3's tokenizer.model")
        if _looks_like_megatron_tiktoken_json(path):
            raise ConfigError(f"{path} is a JSON vocabulary (Megatron's own TikTokenizer format), which megallama "
                              "does not read; --tokenizer-type TikTokenizer/Llama3Tokenizer here take Meta's Llama 3 "
                              "tokenizer.model (base64-token rank lines), HuggingFaceTokenizer a tokenizer.json")
        return Llama3Tokenizer(path, t)
    if t == "hf":
        if tokenizer_model is None:
            raise ConfigError(f"--tokenizer-type {spelled} needs --tokenizer-model PATH (a tokenizer.json or its "
                              "folder)")
        if not os.path.exists(tokenizer_model):
            raise ConfigError(f"tokenizer model file not found: {tokenizer_model}; pass --tokenizer-model with a "
                              f"tokenizer.json or a folder holding one (no network: it is never downloaded)")
        return HFTokenizer(tokenizer_model, t)
    if t == "gpt2":
        from megallama.data.gpt2_tokenizer import GPT2BPETokenizer, gpt2_flags_to_model, split_gpt2_model
        model = gpt2_flags_to_model(spelled, tokenizer_model, None, None)  # None: says which flags it needs
        return GPT2BPETokenizer(*split_gpt2_model(model, spelled), t)
    raise ConfigError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)} "
                      f"(or Megatron's Llama2Tokenizer, GPTSentencePieceTokenizer, SentencePieceTokenizer, "
                      f"HuggingFaceTokenizer, TikTokenizer, GPT2BPETokenizer, NullTokenizer)")
