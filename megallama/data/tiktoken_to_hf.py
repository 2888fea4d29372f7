"""Llama 3's tiktoken ranks file as an HF fast tokenizer (``tokenizer.json``), so an exported run has a tokenizer
``AutoTokenizer.from_pretrained`` reads and that gives megallama's ids.

A ranks file holds only tokens and their ranks; HF's BPE needs merges. They are recovered as tiktoken's BPE would
build each token: the BPE of a token's bytes using only lower ranks ends in two parts, and that pair is the merge
(ordered by the token's rank). ``ignore_merges`` makes a whole pre-tokenized piece that is itself a token come out
as that token, as tiktoken does, so tokens no merge reaches still match. Bytes are spelled with GPT-2's
bytes-to-unicode map (HF's ByteLevel), the pre-tokenizer splits on the same pattern megallama's ``Llama3Tokenizer``
uses, and the 256 special tokens follow the base vocabulary with the ids megallama gives them.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from megallama.data.tokenizer import LLAMA3_PATTERN, load_tiktoken_ranks
from megallama.errors import ConfigError


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of HF's ByteLevel pre-tokenizer and decoder."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(ranks: Dict[bytes, int], token: bytes, max_rank: int) -> List[bytes]:
    """tiktoken's byte-pair merge of ``token`` using only ranks below ``max_rank`` (the lowest-ranked adjacent pair
    first, leftmost on a tie)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def recover_merges(ranks: Dict[bytes, int]) -> List[Tuple[bytes, bytes]]:
    """The merges that build each multi-byte token, in rank order. A token whose lower-ranked BPE does not end in
    two parts (added to the file after its merges were learned) has none: ``ignore_merges`` still finds it whole."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = _bpe(ranks, token, rank)
            if len(parts) == 2:
                merges.append((parts[0], parts[1]))
    return merges


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("writing an HF tokenizer.json for a tiktoken ranks file needs the tokenizers package; "
                          "pip install tokenizers (or megallama's test extras)") from None
    return tokenizers


def tiktoken_to_hf(path: str, special_tokens: Dict[str, int], first_token: Optional[int] = None):
    """A ``tokenizers.Tokenizer`` equal to megallama's ``Llama3Tokenizer`` over the ranks file ``path``, with
    ``special_tokens`` (name -> id, as that tokenizer numbers them) as added tokens, recognised in text as HF's
    Llama 3 release does. ``first_token``: the id the post-processor puts before every encoded text (HF's bos), or
    None for none."""
    tokenizers = _require_tokenizers()
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    ranks = load_tiktoken_ranks(path)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConfigError(f"{path}: the ranks are not 0..{len(ranks) - 1} once each, so the special tokens' ids "
                          "would collide; pass an unedited tiktoken ranks file such as Llama 3's tokenizer.model")
    spell = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(spell[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in recover_merges(ranks)]
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False,
                                         byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    hf.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    for name, i in sorted(special_tokens.items(), key=lambda kv: kv[1]):
        hf.add_special_tokens([AddedToken(name, special=True, normalized=False)])
        if hf.token_to_id(name) != i:  # added tokens take the next free id: the order above must give megallama's
            raise ConfigError(f"{path}: special token {name} would get id {hf.token_to_id(name)}, not megallama's {i}; "
                              "its special-token ids do not follow the base vocabulary")
    if first_token is not None:
        piece = hf.id_to_token(first_token)
        hf.post_processor = processors.TemplateProcessing(
            single=f"{piece} $A", pair=f"{piece} $A {piece}:1 $B:1", special_tokens=[(piece, first_token)])
    return hf
