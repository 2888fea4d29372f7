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
import sys
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


def adds_special_tokens(tokenizer) -> bool:
    """Whether documents start with the tokenizer's own special tokens: an HF tokenizer.json's (Llama 3's bos), as
    Megatron's HuggingFaceTokenizer encodes them; the other tokenizers add none. The one rule of
    tools/preprocess_data.py and the --data-path jsonl cache, so both routes give the same bytes."""
    from megallama.data.tokenizer import HFTokenizer
    return isinstance(tokenizer, HFTokenizer)


def _init_worker(tokenizer, json_keys, append_eod, caller="preprocess", add_special_tokens=False, splitter=None):
    _worker_state.update(tokenizer=tokenizer, json_keys=json_keys, append_eod=append_eod, caller=caller,
                         add_special_tokens=add_special_tokens,
                         splitter=splitter.build() if splitter is not None else None)


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


def _sentences(value, splitter) -> list:
    """A text as Megatron tokenizes it: a list of strings is already split into sentences (one sequence each);
    a string is one, or the splitter's sentences (Megatron splits at most 1M characters at a time)."""
    if isinstance(value, list):
        return value
    if splitter is None:
        return [value]
    step = 1_000_000
    return [t for i in range(0, len(value), step) for t in splitter.tokenize(value[i:i + step])]


def _encode_chunk(job):
    """-> ("ok", {key: [(np array, sequence lengths)]}, n_bytes, [line number of each document]) or
    ("error", line number, message)."""
    start, lines = job
    tok, keys, eod = _worker_state["tokenizer"], _worker_state["json_keys"], _worker_state["append_eod"]
    caller, splitter = _worker_state.get("caller", "preprocess"), _worker_state.get("splitter")
    texts = {k: [] for k in keys}  # per key: per document, its sentences
    linenos = []
    n_bytes = 0
    for i, raw in enumerate(lines):
        lineno = start + i
        n_bytes += len(raw)
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw)
        except UnicodeDecodeError as e:
            return "error", lineno, f"not UTF-8 text ({e}); re-encode the file as UTF-8 (e.g. iconv -t UTF-8)"
        except json.JSONDecodeError as e:
            return "error", lineno, f"not valid JSON ({e.msg})"
        if not isinstance(doc, dict):
            return "error", lineno, f"expected a JSON object like {{\"text\": ...}}, got {type(doc).__name__}"
        for k in keys:
            if k not in doc:
                return "error", lineno, _missing_key(k, doc, caller)
            v = doc[k]
            if not (isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v)):
                return "error", lineno, (f"{k!r} is {type(v).__name__}, expected a string (or a list of strings: "
                                         "its sentences)")
            texts[k].append(_sentences(v, splitter))
        linenos.append(lineno)
    out = {}
    special = _worker_state.get("add_special_tokens", False)
    for k in keys:
        flat = [t for sents in texts[k] for t in sents]
        try:
            ids = tok.encode_batch(flat, add_special_tokens=special) if special else tok.encode_batch(flat)
        except Exception:
            bad = _unencodable(tok, k, flat, [n for n, sents in zip(linenos, texts[k]) for _ in sents])
            if bad is None:
                raise
            return ("error",) + bad
        docs, j = [], 0
        for sents in texts[k]:  # Megatron's encode: empty sentences dropped, the eod ends the last one
            pieces = [p for p in ids[j:j + len(sents)] if p]
            j += len(sents)
            lengths = [len(p) for p in pieces]
            tokens = [t for p in pieces for t in p]
            if eod and tokens:
                tokens.append(tok.eod)
                lengths[-1] += 1
            docs.append((np.asarray(tokens, dtype=np.int64), lengths))
        out[k] = docs
    # an empty text stays an empty document (zero sequences, no eod), as Megatron's builder writes it with one key or
    # several; training's --split counts only documents that hold tokens (gpt_dataset.split_ranges), as Megatron's
    # sequence split does, so empty documents change neither the splits nor the samples
    return "ok", out, n_bytes, linenos


def output_prefix_for(output_prefix: str, key: str, level: str = "document") -> str:
    """Megatron's naming: <output-prefix>_<json key>_document.{bin,idx} (_sentence with sentence splitting)."""
    return f"{output_prefix}_{key}_{level}"


class _Log:
    """Megatron's --log-interval lines ("Processed N documents (x docs/s, y MB/s).") instead of the progress bar."""

    def __init__(self, interval: int):
        self.interval, self.t0, self.next = interval, time.time(), interval

    def update(self, docs: int, n_bytes: int) -> None:
        while docs >= self.next:
            elapsed = max(time.time() - self.t0, 1e-9)
            print(f"Processed {self.next} documents ({self.next / elapsed:.1f} docs/s, "
                  f"{n_bytes / elapsed / 1024 / 1024:.2f} MB/s).", file=sys.stderr, flush=True)
            self.next += self.interval


def preprocess_jsonl(input: str, output_prefix: str, tokenizer, workers: int = 1, json_keys=("text",),
                     append_eod: bool = True, progress: bool = True, chunk_lines: int = _CHUNK_LINES,
                     dtype=None, overwrite: bool = False, caller: str = "preprocess", partitions: int = 1,
                     keep_sequential_samples: bool = False, add_special_tokens: bool = False, splitter=None,
                     log_interval: int | None = None) -> dict:
    """Tokenize a .jsonl (or .jsonl.gz) file into ``<output_prefix>_<key>_document.bin/.idx`` for each json key,
    each with a ``.tokenizer-info.json`` naming the tokenizer, so that training with another one is refused.
    Returns {key: dataset prefix}. Raises ConfigError (path and line number) on a missing file, a malformed line or
    no documents at all, leaving existing outputs untouched, and before any work when an output exists and
    ``overwrite`` is off. An empty text is an empty document (zero sequences, no eod), byte for byte as Megatron's
    preprocess_data.py writes it, with one key or several (document i of every key's file comes from line i; blank
    lines are skipped). ``caller`` ("preprocess" or "pretrain") picks the fix that an
    error names: pretraining has no --json-keys. Megatron's options: ``partitions`` > 1 orders the documents as its
    merged partitions do (line i in partition i % partitions; in input order with ``keep_sequential_samples``),
    ``add_special_tokens`` lets an HF tokenizer.json add its own bos (Megatron's HuggingFaceTokenizer),
    ``splitter`` (a megallama.data.sentence_split.SentenceSplitter) writes one sequence per sentence to
    ``_<key>_sentence`` files, ``log_interval`` prints Megatron's progress lines instead of the bar."""
    if not os.path.isfile(input):
        raise ConfigError(f"data file not found: {input}; pass an existing .jsonl file (one {{\"text\": ...}} "
                          "per line)")
    if not json_keys:
        raise ConfigError("--json-keys is empty; name at least one key, e.g. --json-keys text")
    twice = sorted({k for k in json_keys if list(json_keys).count(k) > 1})
    if twice:  # one file per key: a repeated key would hold every document twice
        raise ConfigError(f"--json-keys names {twice[0]!r} more than once; name each key once")
    if not os.path.basename(output_prefix):
        raise ConfigError(f"--output-prefix {output_prefix} names a folder, not a file prefix; add one, e.g. "
                          f"{os.path.join(output_prefix, 'corpus')}")
    dtype = dtype or optimal_dtype(tokenizer.vocab_size)
    level = "document" if splitter is None else "sentence"
    prefixes = {k: output_prefix_for(output_prefix, k, level) for k in json_keys}
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise ConfigError(f"output folder does not exist: {out_dir}; create it or pass another --output-prefix")
    existing = [f for p in prefixes.values() for f in (get_bin_path(p), get_idx_path(p)) if os.path.exists(f)]
    if existing and not overwrite:
        raise ConfigError(f"{existing[0]} already exists; pass --overwrite to replace it or choose another "
                          "--output-prefix")
    tag = f".tmp-{os.getpid()}-{time.time_ns() % 10**9}"
    # Megatron's --partitions deal the lines out round-robin and merge the partitions in order: one builder each
    shards = 1 if keep_sequential_samples else max(int(partitions), 1)

    def part(p: str, i: int, path) -> str:  # one shard: the temporary output itself
        return path(f"{p}{tag}-partition{i}") if shards > 1 else path(p) + tag
    builders = {k: [IndexedDatasetBuilder(part(p, i, get_bin_path), dtype) for i in range(shards)]
                for k, p in prefixes.items()}
    stream, raw, size = _open_text(input)
    done = 0
    bar = ProgressBar(size, enabled=progress and not log_interval, label=f"tokenizing {os.path.basename(input)}",
                      unit="MB", scale=1e6, every=25)
    log = _Log(log_interval) if log_interval else None
    pool = None
    counts = {k: [0, 0] for k in json_keys}  # documents, tokens
    temps = [f for p in prefixes.values() for f in (get_bin_path(p) + tag, get_idx_path(p) + tag,
                                                     get_tokenizer_info_path(p) + tag)]
    temps += [part(p, i, get) for p in prefixes.values() for i in range(shards) if shards > 1
              for get in (get_bin_path, get_idx_path)]
    try:
        chunks = _read_chunks(stream, chunk_lines, input)
        initargs = (tokenizer, tuple(json_keys), append_eod, caller, add_special_tokens, splitter)
        if workers > 1:
            ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=initargs)
            results = pool.imap(_encode_chunk, chunks, chunksize=4)
        else:
            _init_worker(*initargs)
            results = map(_encode_chunk, chunks)
        for res in results:
            if res[0] == "error":
                raise ConfigError(f"{input} line {res[1]}: {res[2]}")
            for k, docs in res[1].items():
                for (d, lengths), lineno in zip(docs, res[3]):  # an empty document is zero sequences, as Megatron
                    try:
                        builders[k][(lineno - 1) % shards].add_document(d, lengths=lengths)
                    except ValueError as e:  # an id past the vocabulary that picked the dtype
                        raise ConfigError(f"{input} line {lineno}: {e} (the dtype of a {tokenizer.vocab_size}-token "
                                          f"vocabulary): tokenizer '{tokenizer.name}' gives ids past its vocab_size; "
                                          "fix the tokenizer file") from None
                    counts[k][0] += 1
                    counts[k][1] += d.size
            done += res[2]
            bar.update(done, f"{counts[json_keys[0]][0]} docs")
            if log is not None:
                log.update(counts[json_keys[0]][0], done)
        for k, (_, n_tokens) in counts.items():
            if n_tokens == 0:
                raise ConfigError(f"{input} holds no non-empty {k!r} texts; give it at least one document")
        info = {k: tokenizer_info(tokenizer, json_key=k, append_eod=append_eod,
                                  **({"add_special_tokens": True} if add_special_tokens else {}),
                                  **({"split_sentences": True} if splitter is not None else {}))
                for k in prefixes}
        for k, p in prefixes.items():
            for i, b in enumerate(builders[k]):
                b.finalize(part(p, i, get_idx_path))
            if shards > 1:  # merge the partitions, as Megatron does
                merged = IndexedDatasetBuilder(get_bin_path(p) + tag, dtype)
                for i in range(shards):
                    merged.add_index(part(p, i, str))
                merged.finalize(get_idx_path(p) + tag)
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
        for k in prefixes:
            for b in builders[k]:
                b.data_file.close()
        for f in temps:
            if os.path.exists(f):
                os.remove(f)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        stream.close()
        raw.close()
    for f in temps:  # the merged partitions
        if os.path.exists(f):
            os.remove(f)
    k0 = json_keys[0]
    summary = (f"{counts[k0][0]} documents, {counts[k0][1]} tokens -> {prefixes[k0]}.bin/.idx "
               f"in {time.time() - bar.t0:.1f}s")
    if log is not None:
        print(summary, file=sys.stderr)
    bar.close(summary)
    return prefixes
