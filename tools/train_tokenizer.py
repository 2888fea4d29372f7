#!/usr/bin/env python3
"""Train the bundled sentencepiece BPE tokenizer (megallama/assets/tokenizer.model) on the bundled corpus, offline.

Llama 2's sentencepiece settings (identity normalisation, whitespace kept, digits split, byte fallback so that no
text is ever unknown) with a small vocabulary: a tiny model spends most of its parameters in the embedding, and a
small vocabulary lets it learn fast on a CPU. Ids: 0 <unk>, 1 <s> (bos), 2 </s> (eos), 3 <pad>, then 256 byte
pieces <0x00>..<0xFF>. Training is single-threaded over a fixed input order, so the output is the same every run
(``python tools/train_tokenizer.py --overwrite`` regenerates it). An existing --output is refused without
--overwrite: the default output is the bundled tokenizer every run without --tokenizer-* uses.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallama.arg_parser import OneLineErrorParser  # noqa: E402
from megallama.data.output_files import atomic_write_bytes, check_output  # noqa: E402
from megallama.errors import ConfigError  # noqa: E402


def corpus_lines(path: str) -> list[str]:
    """Each line of each document is one training sentence (sentencepiece never sees a newline; it encodes as a
    byte). Read whole before training, so that a bad file is one error line rather than a crash inside the trainer."""
    if not os.path.isfile(path):
        raise ConfigError(f"--corpus {path} not found; pass an existing .jsonl(.gz) file of {{\"text\": ...}} lines")
    opener = gzip.open if path.endswith(".gz") else open
    out = []
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                doc = json.loads(raw)
                if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                    keys = ", ".join(map(str, doc)) if isinstance(doc, dict) else type(doc).__name__
                    raise ConfigError(f"--corpus {path} line {lineno}: no string 'text' key ({keys}); give one "
                                      "{\"text\": ...} object a line")
                try:
                    doc["text"].encode("utf-8")
                except UnicodeEncodeError:  # a JSON escape like \ud800 without its pair: sentencepiece can't take it
                    raise ConfigError(f"--corpus {path} line {lineno}: its 'text' holds a lone UTF-16 surrogate, "
                                      "which is not valid Unicode; fix or remove that line") from None
                out += [line for line in doc["text"].split("\n") if line.strip()]
    except EOFError as e:
        raise ConfigError(f"--corpus {path} is cut short after line {lineno} ({e}); re-download or re-compress it") \
            from None
    except (UnicodeDecodeError, gzip.BadGzipFile, zlib.error) as e:
        raise ConfigError(f"--corpus {path} is not UTF-8 text ({e}); pass a .jsonl or .jsonl.gz file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--corpus {path} line {lineno}: not valid JSON ({e.msg}); give one JSON object a line") \
            from None
    if not out:
        raise ConfigError(f"--corpus {path} holds no text; give it {{\"text\": ...}} lines")
    return out


def _vocab_hint(error: str, vocab_size: int) -> str:
    """sentencepiece's vocabulary-size errors point opposite ways (too many pieces for a small corpus, or fewer
    pieces than the corpus has characters): name the bound that fixes the one at hand, not both."""
    msg = error.split("] ")[-1].strip()
    m = re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg)
    if m:  # every character the corpus holds (after byte fallback and coverage) needs a piece of its own
        return (f"--vocab-size {vocab_size} is smaller than the {m.group(1)} pieces its characters and the special "
                f"tokens need; raise --vocab-size to at least {m.group(1)}")
    m = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", msg)
    if m:
        return (f"--vocab-size {vocab_size} is more pieces than the corpus can fill; lower --vocab-size to at most "
                f"{m.group(1)} or give a larger --corpus")
    return f"{msg} (check --vocab-size and --corpus)"


def train(corpus: str, output: str, vocab_size: int = 8192, seed: int = 1234, overwrite: bool = False) -> None:
    import sentencepiece as spm
    check_output(output, overwrite)
    if vocab_size < 260:
        raise ConfigError(f"--vocab-size {vocab_size} is too small: 4 special and 256 byte pieces need at least 260")
    sentences = corpus_lines(corpus)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            character_coverage=0.9995, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
            max_sentence_length=1 << 16, input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    except RuntimeError as e:
        raise ConfigError(f"sentencepiece cannot train on {corpus}: {_vocab_hint(str(e), vocab_size)}") from None
    atomic_write_bytes(output, model.getvalue())


def main(argv=None) -> int:
    assets = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "megallama", "assets")
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=os.path.join(assets, "corpus.jsonl.gz"))
    p.add_argument("--output", default=os.path.join(assets, "tokenizer.model"),
                   help="default: the bundled tokenizer (needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (refused otherwise)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    try:
        train(args.corpus, args.output, args.vocab_size, args.seed, args.overwrite)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({args.vocab_size} pieces, {os.path.getsize(args.output) / 1e3:.0f} KB)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
