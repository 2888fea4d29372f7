#!/usr/bin/env python3
"""Regenerate the bundled corpus (megallama/assets/corpus.jsonl.gz) from text every machine has, offline.

Sources, in this order of priority: the docstrings of Python's standard library (read with ``ast``, nothing is
imported or executed), the language reference topics ``pydoc`` ships (``pydoc_data.topics``), the license texts in
/usr/share/common-licenses, then English man pages of sections 5 and 7 rendered by groff until ``--max-mb`` is
reached. Documents are shuffled with a fixed seed so that a contiguous train/valid split by documents mixes sources.
The output depends on the machine's Python and man pages; the copy in the repo is the one that counts, this script
is how it was made (``python tools/make_corpus.py --overwrite``: an existing --output is refused without it).
"""
from __future__ import annotations

import ast
import glob
import gzip
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megallama.arg_parser import OneLineErrorParser  # noqa: E402
from megallama.data.output_files import atomic_write_bytes, check_output  # noqa: E402
from megallama.errors import ConfigError  # noqa: E402

_SKIP_DIRS = {"site-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3", "ensurepip", "turtledemo"}
_TYPO = str.maketrans({"\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "--", "\u2212": "-",
                       "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " ", "\u2022": "*",
                       "\u00b4": "'", "\u02c6": "^", "\u02dc": "~"})


_MAN_MAX_CHARS = 40_000
_DOC_MAX_CHARS = 16_000


def _chunks(text: str, limit: int) -> list[str]:
    """Split at blank lines into pieces of at most ~limit characters (a paragraph longer than that stays whole)."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) + 2 > limit:
            out.append(cur)
            cur = para
        else:
            cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return out


def _signature(node) -> str:
    try:
        return f"({ast.unparse(node.args)})"
    except Exception:
        return "(...)"


def _module_document(path: str, modname: str) -> str | None:
    """One document per module: its docstring, then each documented class/function under a pydoc-like heading."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(doc if doc.startswith(modname) else f"{modname}\n\n{doc}")

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                d = ast.get_docstring(node)
                name = f"{prefix}{node.name}"
                if d and len(d) >= 16:
                    head = f"class {name}" if isinstance(node, ast.ClassDef) else f"{name}{_signature(node)}"
                    parts.append(f"{head}\n\n{d}")
                if isinstance(node, ast.ClassDef):
                    visit(node.body, name + ".")

    visit(tree.body, "")
    if not parts or sum(len(p) for p in parts) < 200:
        return None
    return "\n\n".join(parts)


def stdlib_documents() -> list[tuple[str, str]]:
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.endswith(".py") or fn.startswith("test_"):
                continue
            path = os.path.join(dirpath, fn)
            rel = os.path.relpath(path, root)[:-3]
            modname = rel.replace(os.sep, ".").removesuffix(".__init__")
            text = _module_document(path, modname)
            if text:
                docs.append((f"python-stdlib:{modname}", text))
    return docs


def pydoc_topic_documents() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [(f"python-reference:{k}", v.strip()) for k, v in sorted(topics.items()) if len(v.strip()) >= 200]


def license_documents(folder="/usr/share/common-licenses") -> list[tuple[str, str]]:
    docs, seen = [], set()
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        with open(real, encoding="utf-8", errors="replace") as f:
            docs.append((f"license:{os.path.basename(path)}", f.read().strip()))
    return docs


def _render_man(path: str) -> str | None:
    try:
        src = gzip.open(path).read() if path.endswith(".gz") else open(path, "rb").read()
        if src.lstrip().startswith(b".so "):  # a redirect to another page
            return None
        out = subprocess.run(["groff", "-Tutf8", "-mandoc", "-P", "-cbou", "-rLL=5000n"], input=src,
                             capture_output=True, timeout=20).stdout.decode("utf-8", "replace")
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln.strip() for ln in out.translate(_TYPO).splitlines()]
    while lines and not lines[0]:
        lines.pop(0)
    if lines:
        lines.pop(0)  # "NAME(7)   Title   NAME(7)" header
    while lines and not lines[-1]:
        lines.pop()
    if lines:
        lines.pop()  # footer
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    if len(text) < 500 or sum(ord(c) > 127 for c in text) > 0.002 * len(text):  # skip charset tables
        return None
    return _chunks(text, _MAN_MAX_CHARS)[0]  # a few giant reference pages would crowd out the rest


def man_documents(rng: random.Random, budget: int, sections=("5", "7")) -> list[tuple[str, str]]:
    if shutil.which("groff") is None or budget <= 0:
        return []
    paths = []
    for s in sections:
        paths += [p for p in sorted(glob.glob(f"/usr/share/man/man{s}/*")) if not os.path.islink(p)]
    rng.shuffle(paths)
    docs, used = [], 0
    for p in paths:
        if used >= budget:
            break
        text = _render_man(p)
        if text:
            docs.append((f"man:{os.path.basename(p).removesuffix('.gz')}", text))
            used += len(text.encode("utf-8"))
    return docs


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = OneLineErrorParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=os.path.join(here, "..", "megallama", "assets", "corpus.jsonl.gz"),
                   help="default: the bundled corpus (needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (refused otherwise)")
    p.add_argument("--max-mb", type=float, default=4.5, help="stop adding man pages past this much text")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    try:
        check_output(args.output, args.overwrite)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    docs = stdlib_documents() + pydoc_topic_documents() + license_documents()
    used = sum(len(t.encode("utf-8")) for _, t in docs)
    docs += man_documents(rng, int(args.max_mb * 1e6) - used)
    docs = [(f"{src}#{i}" if i else src, piece) for src, text in docs
            for i, piece in enumerate(_chunks(text.strip(), _DOC_MAX_CHARS)) if piece.strip()]
    rng.shuffle(docs)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for src, text in docs:
            gz.write((json.dumps({"text": text, "source": src}, ensure_ascii=False) + "\n").encode("utf-8"))
    atomic_write_bytes(args.output, buf.getvalue())
    total = sum(len(t.encode("utf-8")) for _, t in docs)
    kinds = {}
    for src, text in docs:
        k = src.split(":")[0]
        kinds[k] = kinds.get(k, 0) + len(text.encode("utf-8"))
    print(f"wrote {args.output}: {len(docs)} documents, {total / 1e6:.2f} MB of text "
          f"({', '.join(f'{k} {v / 1e6:.2f} MB' for k, v in kinds.items())}), "
          f"{len(buf.getvalue()) / 1e6:.2f} MB gzipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
