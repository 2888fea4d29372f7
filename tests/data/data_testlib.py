"""Shared bits of the data tests: a tiny jsonl corpus writer and texts that exercise whitespace and byte fallback."""
import json


def write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return str(path)


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the number of items in a container.",
    "Raise ValueError if the argument is negative; otherwise return its square root.",
    "A socket is an endpoint for communication between two machines.",
    "Unicode: naïve café — 日本語 and emoji 🙂 survive byte fallback.",
    "",
    "Indented code:\n    def f(x):\n        return x + 1\n\nand a blank line above.",
] * 6
