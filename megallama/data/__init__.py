"""Data: tokenizers, Megatron-format indexed datasets, packed pretraining samples and the resumable sampler.

The bundled corpus (English text from Python's standard library docstrings, its language reference, license texts
and man pages; made by tools/make_corpus.py) and its sentencepiece tokenizer (tools/train_tokenizer.py) ship in
``megallama/assets`` so that a first training run needs no download.
"""
import os

_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def get_bundled_corpus_path() -> str:
    """The bundled jsonl corpus (gzipped; one {"text": ...} per line)."""
    return os.path.join(_ASSETS, "corpus.jsonl.gz")


def get_bundled_tokenizer_path() -> str:
    """The bundled sentencepiece BPE model trained on the bundled corpus."""
    return os.path.join(_ASSETS, "tokenizer.model")
