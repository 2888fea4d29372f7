#!/usr/bin/env python
"""Write the bundled chat sample (megallama/assets/chat_sample.jsonl.gz): synthetic instruction conversations whose
answers follow from the question (arithmetic, reversing, counting, sorting, capitals of words), so a tiny model's
fine-tuning loss visibly falls within a few dozen steps. Deterministic, byte for byte:
``python tools/make_chat_sample.py --overwrite`` (an existing --output is refused without it)."""
import gzip
import io
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallama.arg_parser import OneLineErrorParser  # noqa: E402
from megallama.data.output_files import atomic_write_bytes, check_output  # noqa: E402
from megallama.errors import ConfigError  # noqa: E402

WORDS = ("river apple stone light garden window music paper silver forest candle bridge orange winter planet "
         "dragon mirror castle rocket pencil").split()
SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
           "You answer questions about numbers and words."]


def _task(rng: random.Random):
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        a, b = rng.randint(10, 99), rng.randint(0, 9)
        return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."
    if kind == 2:
        w = rng.choice(WORDS)
        return f"Spell the word '{w}' backwards.", f"'{w}' backwards is '{w[::-1]}'."
    if kind == 3:
        w = rng.choice(WORDS)
        return f"How many letters are in the word '{w}'?", f"The word '{w}' has {len(w)} letters."
    if kind == 4:
        xs = rng.sample(range(1, 50), 4)
        return (f"Sort these numbers from smallest to largest: {', '.join(map(str, xs))}.",
                f"Sorted: {', '.join(map(str, sorted(xs)))}.")
    w = rng.sample(WORDS, 3)
    return f"Write these words in capital letters: {' '.join(w)}.", " ".join(x.upper() for x in w) + "."


def conversation(rng: random.Random) -> dict:
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(1 if rng.random() < 0.7 else 2):
        q, a = _task(rng)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def main(argv=None) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = OneLineErrorParser(description=__doc__)
    p.add_argument("--output", default=os.path.join(here, "megallama", "assets", "chat_sample.jsonl.gz"),
                   help="default: the bundled sample (needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (refused otherwise)")
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if args.num < 1:
        p.error(f"--num must be >= 1, got {args.num} (finetune_llama.py refuses an empty sample)")
    try:
        check_output(args.output, args.overwrite)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    buf = io.BytesIO()  # the gzip header names the output's basename, as GzipFile(output) did
    with gzip.GzipFile(os.path.basename(args.output), "wb", fileobj=buf, mtime=0) as raw:
        for _ in range(args.num):
            raw.write((json.dumps(conversation(rng)) + "\n").encode())
    atomic_write_bytes(args.output, buf.getvalue())
    print(f"wrote {args.num} conversations to {args.output} ({os.path.getsize(args.output) / 1e3:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
