"""jsonl -> Megatron .bin/.idx (one sequence per document), the work behind tools/preprocess_data.py and the jsonl
cache of ``build_pretraining_datasets``.

Lines are parsed and tokenized in chunks, in order (``imap``), by ``workers`` processes, so the output is the same
for any worker count. Everything is written under temporary names and renamed only after the last line was read
without error: a malformed line leaves no half-written file and never replaces an existing one. No torch here, so
worker processes start fast.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import time
import zlib

import numpy as np

from megallama.data.indexed_dataset import (IndexedDatasetBuilder, get_bin_path, get_idx_path,
                                            get_tokenizer_info_path, optimal_dtype, tokenizer_info)
from megallama.errors import ConfigError
from megallama.progress import ProgressBar

_CHUNK_LINES = 64


def _open_text(path: str):
    """(binary line stream, raw file, uncompressed size for the progress bar)."""
    raw = open(path, "rb")
    size = os.path.getsize(path)
    if not path.endswith(".gz"):
        return raw, raw, size
    raw.seek(max(size - 4, 0))
    isize = int.from_bytes(raw.read(4), "little")  # gzip trailer: uncompressed size mod 2**32
    raw.seek(0)
    return gzip.GzipFile(fileobj=raw, mode="rb"), raw, isize if isize >= size else size * 3


def _read_chunks(stream, chunk_lines: int, path: str = "input"):
    """Yield (first line number, [raw lines]) chunks. A broken .gz is one ConfigError with the last good line (the
    pool re-raises it in order, after the chunks before it)."""
    chunk, start, lineno = [], 1, 0
    try:
        for lineno, line in enumerate(stream, 1):
            if not chunk:
                start = lineno
            chunk.append(line)
            if len(chunk) == chunk_lines:
                yield start, chunk
                chunk = []
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        if lineno == 0 and "Not a gzipped file" in str(e):
            raise ConfigError(f"{path} is named .gz but is not gzip data ({e}); gzip it, or drop the .gz from its "
                              "name if it is plain jsonl") from None
        what = "is cut short" if isinstance(e, EOFError) else "is corrupt"
        raise ConfigError(f"{path} {what} after line {lineno} ({e}); re-download or re-compress it") from None
    if chunk:
        yield start, chunk


def _unencodable(tok, key: str, texts: list, linenos: list):
    """(line number, why) of the first text the tokenizer fails on, or None. Only run after a batch failed, so the
    common path pays nothing."""
    for text, lineno in zip(texts, linenos):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # json.loads lets "\ud800" through; no tokenizer can take it
            return lineno, (f"its {key!r} value holds {text[e.start]!r}, a lone UTF-16 surrogate (an escape like "
                            "\\ud800 without its pair), which is not valid Unicode; fix or remove that line")
        try:
            tok.encode(text)
        except Exception as e:  # noqa: BLE001 (whatever the tokenizer library raises)
            why = (str(e).splitlines() or [""])[0]
            return lineno, (f"tokenizer '{tok.name}' cannot encode its {key!r} value ({type(e).__name__}: {why}); "
                            "fix or remove that line")
    return None


_worker_state: dict = {}


def _init_worker(tokenizer, json_keys, append_eod, caller="preprocess"):
    _worker_state.update(tokenizer=tokenizer, json_keys=json_keys, append_eod=append_eod, caller=caller)


def _missing_key(key: str, doc: dict, caller: str) -> str:
    """The fix depends on who reads the file: tools/preprocess_data.py has --json-keys, pretraining has not, and a
    chat file ({"messages": ...}) belongs to fine-tuning."""
    what = f"no {key!r} key (keys: {', '.join(map(str, doc)) or 'none'})"
    if caller != "pretrain":
        return f"{what}; pass --json-keys"
    if "messages" in doc:
        return (f"{what}: this is chat data; fine-tune on it with finetune_llama.py (or train an *_instruct model), "
                "pretraining reads plain {\"text\": ...} lines")
    return (f"{what}; pretraining reads a {key!r} string on every line: rename the key, or tokenize with "
            "tools/preprocess_data.py --json-keys and pass the .bin/.idx prefix as --data-path")


def _encode_chunk(job):
    """-> ("ok", {key: [np arrays]}, n_bytes) or ("error", line number, message)."""
    start, lines = job
    tok, keys, eod = _worker_state["tokenizer"], _worker_state["json_keys"], _worker_state["append_eod"]
    caller = _worker_state.get("caller", "preprocess")
    texts = {k: [] for k in keys}
    linenos = []
    n_bytes = 0
    for i, raw in enumerate(lines):
        lineno = start + i
        n_bytes += len(raw)
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return "error", lineno, f"not valid JSON ({e.msg if hasattr(e, 'msg') else e})"
        if not isinstance(doc, dict):
            return "error", lineno, f"expected a JSON object like {{\"text\": ...}}, got {type(doc).__name__}"
        for k in keys:
            if k not in doc:
                return "error", lineno, _missing_key(k, doc, caller)
            if not isinstance(doc[k], str):
                return "error", lineno, f"{k!r} is {type(doc[k]).__name__}, expected a string"
            texts[k].append(doc[k])
        linenos.append(lineno)
    out = {}
    for k in keys:
        try:
            ids = tok.encode_batch(texts[k])
        except Exception:
            bad = _unencodable(tok, k, texts[k], linenos)
            if bad is None:
                raise
            return ("error",) + bad
        # an empty text stays an empty document (no eod, as in Megatron) so that the keys' files stay row-aligned;
        # one key has nothing to align with and drops it
        out[k] = [np.asarray(d + [tok.eod] if eod and d else d, dtype=np.int64) for d in ids if d or len(keys) > 1]
    return "ok", out, n_bytes


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron's naming: <output-prefix>_<json key>_document.{bin,idx}."""
    return f"{output_prefix}_{key}_document"


def preprocess_jsonl(input: str, output_prefix: str, tokenizer, workers: int = 1, json_keys=("text",),
                     append_eod: bool = True, progress: bool = True, chunk_lines: int = _CHUNK_LINES,
                     dtype=None, overwrite: bool = False, caller: str = "preprocess") -> dict:
    """Tokenize a .jsonl (or .jsonl.gz) file into ``<output_prefix>_<key>_document.bin/.idx`` for each json key,
    each with a ``.tokenizer-info.json`` naming the tokenizer, so that training with another one is refused.
    Returns {key: dataset prefix}. Raises ConfigError (path and line number) on a missing file, a malformed line or
    no documents at all, leaving existing outputs untouched, and before any work when an output exists and
    ``overwrite`` is off. With one key, empty texts are skipped; with several, an empty text is an empty document
    (zero sequences, no eod: Megatron's layout, which its GPT datasets and ours skip), so that document i of every
    key's file comes from line i. ``caller`` ("preprocess" or "pretrain") picks the fix that an
    error names: pretraining has no --json-keys."""
    if not os.path.isfile(input):
        raise ConfigError(f"data file not found: {input}; pass an existing .jsonl file (one {{\"text\": ...}} per line)")
    if not json_keys:
        raise ConfigError("--json-keys is empty; name at least one key, e.g. --json-keys text")
    twice = sorted({k for k in json_keys if list(json_keys).count(k) > 1})
    if twice:  # one file per key: a repeated key would hold every document twice
        raise ConfigError(f"--json-keys names {twice[0]!r} more than once; name each key once")
    if not os.path.basename(output_prefix):
        raise ConfigError(f"--output-prefix {output_prefix} names a folder, not a file prefix; add one, e.g. "
                          f"{os.path.join(output_prefix, 'corpus')}")
    dtype = dtype or optimal_dtype(tokenizer.vocab_size)
    prefixes = {k: output_prefix_for(output_prefix, k) for k in json_keys}
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"output folder does not exist: {out_dir}; create it or pass another --output-prefix")
    existing = [f for p in prefixes.values() for f in (get_bin_path(p), get_idx_path(p)) if os.path.exists(f)]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} already exists; pass --overwrite to replace it or choose another "
                          "--output-prefix")
    tag = f".tmp-{os.getpid()}-{time.time_ns() % 10**9}"
    builders = {k: IndexedDatasetBuilder(get_bin_path(p) + tag, dtype) for k, p in prefixes.items()}
    stream, raw, size = _open_text(input)
    done = 0
    bar = ProgressBar(size, enabled=progress, label=f"tokenizing {os.path.basename(input)}", unit="MB", scale=1e6,
                      every=25)
    pool = None
    counts = {k: [0, 0] for k in json_keys}  # documents, tokens
    try:
        chunks = _read_chunks(stream, chunk_lines, input)
        if workers > 1:
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers, initializer=_init_worker,
                            initargs=(tokenizer, tuple(json_keys), append_eod, caller))
            results = pool.imap(_encode_chunk, chunks, chunksize=4)
        else:
            _init_worker(tokenizer, tuple(json_keys), append_eod, caller)
            results = map(_encode_chunk, chunks)
        for res in results:
            if res[0] == "error":
                raise ConfigError(f"{input} line {res[1]}: {res[2]}")
            for k, docs in res[1].items():
                for d in docs:  # an empty document is zero sequences, as Megatron writes it
                    builders[k].add_document(d, lengths=[d.size] if d.size else [])
                    counts[k][0] += 1
                    counts[k][1] += d.size
            done += res[2]
            bar.update(done, f"{counts[json_keys[0]][0]} docs")
        for k, (_, n_tokens) in counts.items():
            if n_tokens == 0:
                raise ConfigError(f"{input} holds no non-empty {k!r} texts; give it at least one document")
        info = {k: tokenizer_info(tokenizer, json_key=k, append_eod=append_eod) for k in prefixes}
        for k, p in prefixes.items():
            builders[k].finalize(get_idx_path(p) + tag)
            if info[k] is not None:
                with open(get_tokenizer_info_path(p) + tag, "w", encoding="utf-8") as f:
                    json.dump(info[k], f, indent=1)
        for k, p in prefixes.items():  # .bin before .idx: a reader that sees the new .idx sees its .bin
            os.replace(get_bin_path(p) + tag, get_bin_path(p))
            os.replace(get_idx_path(p) + tag, get_idx_path(p))
            # the tokenizer record last: cut off before it, new data is checked against the old record or by id range
            if info[k] is not None:
                os.replace(get_tokenizer_info_path(p) + tag, get_tokenizer_info_path(p))
            elif os.path.exists(get_tokenizer_info_path(p)):  # the replaced data's record
                os.remove(get_tokenizer_info_path(p))
    except BaseException:
        for k, p in prefixes.items():
            builders[k].data_file.close()
            for f in (get_bin_path(p) + tag, get_idx_path(p) + tag, get_tokenizer_info_path(p) + tag):
                if os.path.exists(f):
                    os.remove(f)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        stream.close()
        raw.close()
    k0 = json_keys[0]
    bar.close(f"{counts[k0][0]} documents, {counts[k0][1]} tokens -> {prefixes[k0]}.bin/.idx "
              f"in {time.time() - bar.t0:.1f}s")
    return prefixes
