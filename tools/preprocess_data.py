#!/usr/bin/env python3
"""Tokenize a jsonl corpus into Megatron-LM's .bin/.idx format (readable by Megatron-LM and by megallama).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type llama3 --tokenizer-model /path/to/tokenizer.model --append-eod --workers 4

writes data/corpus_text_document.bin/.idx (one ``_<key>_document`` pair per --json-keys key), to be passed as
``--data-path data/corpus_text_document``. With several keys, document i of every pair comes from line i (an empty
text is an empty document, as in Megatron); with one, empty texts are skipped. Next to each pair,
``<prefix>.tokenizer-info.json`` records the tokenizer (name and content fingerprint): training on the pair with
another tokenizer is refused (Megatron's format has no such field; a pair without the record is checked by token-id
range only). A malformed line is reported with its line number (exit 2) and nothing is written or overwritten;
existing outputs are replaced only with ``--overwrite``. Importable: ``from tools.preprocess_data import
preprocess_jsonl`` (or from ``megallama.data.preprocess``).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallama.data.preprocess import preprocess_jsonl  # noqa: E402
from megallama.data.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402
from megallama.errors import ConfigError  # noqa: E402

__all__ = ["preprocess_jsonl", "main"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, help="a .jsonl or .jsonl.gz file, one JSON object per line")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from each line (several: "
                   "their files stay row-aligned)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="bundled", help=f"one of {', '.join(TOKENIZER_TYPES)}")
    g.add_argument("--tokenizer-model", default=None, help="tokenizer file (not needed for 'bundled')")
    g.add_argument("--append-eod", action="store_true", help="end every document with the end-of-text token "
                                                             "(needed to pack documents for pretraining)")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs (refused otherwise)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--no-progress-bar", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        if args.workers < 1:
            raise ConfigError(f"--workers {args.workers} must be at least 1")
        tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        prefixes = preprocess_jsonl(args.input, args.output_prefix, tok, workers=args.workers,
                                    json_keys=tuple(args.json_keys), append_eod=args.append_eod,
                                    progress=not args.no_progress_bar, overwrite=args.overwrite)
        # after the work, so that an error stays the only line; training with another tokenizer is refused
        print(f"tokenized with {tok.name} ({tok.vocab_size} tokens: --tokenizer-type {args.tokenizer_type}"
              + (f" --tokenizer-model {args.tokenizer_model}" if args.tokenizer_model else "")
              + f"), recorded in {', '.join(p + '.tokenizer-info.json' for p in prefixes.values())}", file=sys.stderr)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
