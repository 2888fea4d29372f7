#!/usr/bin/env python3
"""Tokenize a jsonl corpus into Megatron-LM's .bin/.idx format (readable by Megatron-LM and by megallama).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --tokenizer-type llama3 --tokenizer-model /path/to/tokenizer.model --append-eod --workers 4

writes data/corpus_text_document.bin/.idx (one ``_<key>_document`` pair per --json-keys key), to be passed as
``--data-path data/corpus_text_document``. An empty text is an empty document (no sequence, no eod), as in
Megatron, so document i of every pair comes from line i; training's --split counts only documents with tokens. Next
to each pair,
``<prefix>.tokenizer-info.json`` records the tokenizer (name and content fingerprint): training on the pair with
another tokenizer is refused (Megatron's format has no such field; a pair without the record is checked by token-id
range only). A malformed line is reported with its line number (exit 2) and nothing is written or overwritten;
existing outputs are replaced only with ``--overwrite``. Importable: ``from tools.preprocess_data import
preprocess_jsonl`` (or from ``megallama.data.preprocess``).

Megatron-LM's command lines run unchanged: its tokenizer names (Llama2Tokenizer, GPTSentencePieceTokenizer and
SentencePieceTokenizer encode alike, with no bos, as its preprocess_data.py does; HuggingFaceTokenizer adds what the
tokenizer.json's post-processor adds, e.g. Llama 3's <|begin_of_text|>, unless
--tokenizer-hf-no-include-special-tokens; NullTokenizer with --vocab-size; GPT2BPETokenizer with --vocab-file and
--merge-file), --split-sentences/--keep-newlines/--lang (with NLTK and its punkt data installed),
--partitions/--keep-sequential-samples (Megatron's merged document order) and --log-interval. Flags with no
counterpart here (--tiktoken-pattern, BERT tokenizers) are refused in one line that names the alternative.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallama.arg_parser import OneLineErrorParser  # noqa: E402
from megallama.data.gpt2_tokenizer import gpt2_flags_to_model  # noqa: E402
from megallama.data.preprocess import adds_special_tokens, preprocess_jsonl  # noqa: E402
from megallama.data.sentence_split import SentenceSplitter  # noqa: E402
from megallama.data.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402
from megallama.errors import ConfigError  # noqa: E402

__all__ = ["preprocess_jsonl", "main"]


def get_args(argv=None):
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    g = p.add_argument_group("input data")
    g.add_argument("--input", required=True, help="a .jsonl or .jsonl.gz file, one JSON object per line")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract from each line (several: "
                   "their files stay row-aligned); a value may be a string or a list of sentences")
    g.add_argument("--split-sentences", action="store_true", help="one sequence per sentence (NLTK punkt), written "
                   "to <prefix>_<key>_sentence.bin/.idx")
    g.add_argument("--keep-newlines", action="store_true", help="with --split-sentences: keep the newlines after "
                   "each sentence")
    g.add_argument("--lang", default=None, help="with --split-sentences: punkt's language (default english)")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", default="bundled", help=f"one of {', '.join(TOKENIZER_TYPES)}, or Megatron's "
                   "Llama2Tokenizer, GPTSentencePieceTokenizer, SentencePieceTokenizer, Llama3Tokenizer, "
                   "TikTokenizer (Meta's Llama 3 tokenizer.model), HuggingFaceTokenizer, GPT2BPETokenizer, "
                   "NullTokenizer")
    g.add_argument("--tokenizer-model", default=None, help="tokenizer file (not needed for 'bundled')")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: ids 0..N-1, the eod is N")
    g.add_argument("--tokenizer-hf-no-include-special-tokens", action="store_true", help="HuggingFaceTokenizer: "
                   "do not add the tokenizer.json's own special tokens (its bos) to each document")
    g.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    g.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    g.add_argument("--tiktoken-pattern", default=None, help=argparse.SUPPRESS)  # refused in main, with the fix
    g.add_argument("--append-eod", action="store_true", help="end every document with the end-of-text token "
                                                             "(needed to pack documents for pretraining)")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, help="writes <prefix>_<key>_document.bin/.idx")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs (refused otherwise)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    g.add_argument("--partitions", type=int, default=1, help="Megatron's file partitions: the documents come out "
                   "in its merged order (line i in partition i %% N) unless --keep-sequential-samples")
    g.add_argument("--keep-sequential-samples", action="store_true", help="with --partitions: keep the input order")
    g.add_argument("--log-interval", type=int, default=None, help="print Megatron's 'Processed N documents' line "
                   "every N documents instead of the progress bar")
    g.add_argument("--no-progress-bar", action="store_true")
    return p.parse_args(argv)


def _check_megatron_flags(args) -> None:
    """Megatron's flags checked before any work: GPT-2's --vocab-file/--merge-file become --tokenizer-model; those
    with no counterpart here are one line naming the alternative."""
    args.tokenizer_model = gpt2_flags_to_model(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                                               args.merge_file)  # GPT2BPETokenizer's two files as one value
    if args.tiktoken_pattern is not None:
        raise ConfigError("--tiktoken-pattern selects Megatron's own JSON-vocabulary TikTokenizer, which megallama "
                          "does not read; for Llama 3's tokenizer.model pass --tokenizer-type Llama3Tokenizer and drop "
                          "--tiktoken-pattern")
    for flag, value, least in (("--workers", args.workers, 1), ("--partitions", args.partitions, 1),
                               ("--log-interval", args.log_interval, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} {value} must be at least {least}")
    if any(c in args.input for c in "*?[") and not os.path.isfile(args.input):
        raise ConfigError(f"--input {args.input} is a pattern (Megatron globs it with --partitions); megallama reads "
                          "one file: concatenate them first (cat a.jsonl b.jsonl > all.jsonl)")
    if args.workers % args.partitions:
        raise ConfigError(f"--workers {args.workers} is not divisible by --partitions {args.partitions} (Megatron "
                          f"runs workers/partitions per partition); pass --workers {args.partitions} or a multiple")
    if not args.split_sentences and (args.keep_newlines or args.lang is not None):
        flag = "--keep-newlines" if args.keep_newlines else "--lang"
        print(f"note: {flag} only applies with --split-sentences (as in Megatron); documents are not split",
              file=sys.stderr)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        _check_megatron_flags(args)
        tok = build_tokenizer(args.tokenizer_type, args.tokenizer_model, vocab_size=args.vocab_size)
        splitter = SentenceSplitter(args.lang or "english", args.keep_newlines) if args.split_sentences else None
        # Megatron's HuggingFaceTokenizer encodes with the tokenizer.json's post-processor: Llama 3's adds its bos
        special = adds_special_tokens(tok) and not args.tokenizer_hf_no_include_special_tokens
        prefixes = preprocess_jsonl(args.input, args.output_prefix, tok, workers=args.workers,
                                    json_keys=tuple(args.json_keys), append_eod=args.append_eod,
                                    progress=not args.no_progress_bar, overwrite=args.overwrite,
                                    partitions=args.partitions, keep_sequential_samples=args.keep_sequential_samples,
                                    add_special_tokens=special, splitter=splitter, log_interval=args.log_interval)
        # after the work, so that an error stays the only line; training with another tokenizer is refused
        first = tok.encode_batch([""], add_special_tokens=True)[0] if special else []
        starts = f"; each document starts with {tok.decode(first)!r}" if first else ""
        print(f"tokenized with {tok.name} ({tok.vocab_size} tokens: --tokenizer-type {args.tokenizer_type}"
              + (f" --vocab-file {args.vocab_file} --merge-file {args.merge_file}" if args.vocab_file else
                 f" --tokenizer-model {args.tokenizer_model}" if args.tokenizer_model else "")
              + f"{starts}), recorded in {', '.join(p + '.tokenizer-info.json' for p in prefixes.values())}",
              file=sys.stderr)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
