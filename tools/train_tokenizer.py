#!/usr/bin/env python3
"""Train the bundled sentencepiece BPE tokenizer (megallama/assets/tokenizer.model) on the bundled corpus, offline.

Llama 2's sentencepiece settings (identity normalisation, whitespace kept, digits split, byte fallback so that no
text is ever unknown) with a small vocabulary: a tiny model spends most of its parameters in the embedding, and a
small vocabulary lets it learn fast on a CPU. Ids: 0 <unk>, 1 <s> (bos), 2 </s> (eos), 3 <pad>, then 256 byte
pieces <0x00>..<0xFF>. Training is single-threaded over a fixed input order, so the output is the same every run
(``python tools/train_tokenizer.py`` regenerates it).
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys


def corpus_lines(path: str):
    """Each line of each document is one training sentence (sentencepiece never sees a newline; it encodes as a byte)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for raw in f:
            for line in json.loads(raw)["text"].split("\n"):
                if line.strip():
                    yield line


def train(corpus: str, output: str, vocab_size: int = 8192, seed: int = 1234) -> None:
    import sentencepiece as spm
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=corpus_lines(corpus), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        character_coverage=0.9995, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
        max_sentence_length=1 << 16, input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    tmp = output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, output)


def main(argv=None) -> int:
    assets = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "megallama", "assets")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default=os.path.join(assets, "corpus.jsonl.gz"))
    p.add_argument("--output", default=os.path.join(assets, "tokenizer.model"))
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    train(args.corpus, args.output, args.vocab_size, args.seed)
    print(f"wrote {args.output} ({args.vocab_size} pieces, {os.path.getsize(args.output) / 1e3:.0f} KB)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
