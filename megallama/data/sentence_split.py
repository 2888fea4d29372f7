"""Megatron's ``--split-sentences``: NLTK's punkt splitter, one sequence per sentence in the .bin/.idx.

Built in each preprocessing worker from a picklable spec (language, keep newlines). NLTK and its punkt data are
never downloaded (no network): when either is missing, preprocessing stops before any work with one line saying how
to install them. ``--keep-newlines`` keeps the newlines after a sentence in that sentence, as Megatron's
CustomLanguageVars does (punkt otherwise drops them).
"""
from __future__ import annotations

from megallama.errors import ConfigError

# punkt's period context with ``\s*`` after the sentence end (instead of ``\s+``), so that the whitespace, newlines
# included, stays with the sentence: the well-known recipe Megatron uses for --keep-newlines
_KEEP_NEWLINES_PERIOD_CONTEXT = r"""
        \S*                          # some word material
        %(SentEndChars)s             # a potential sentence ending
        \s*                          # the whitespace after it, newlines included
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)        # or the next word
        ))"""


def _punkt(lang: str):
    import nltk
    try:
        if hasattr(nltk.tokenize.punkt, "PunktTokenizer"):  # nltk >= 3.8.2 reads the punkt_tab data
            return nltk.tokenize.punkt.PunktTokenizer(lang)
        return nltk.data.load(f"tokenizers/punkt/{lang}.pickle")
    except (LookupError, OSError, ValueError) as e:
        raise ConfigError(f"--split-sentences: NLTK's punkt data for --lang {lang} is not installed "
                          f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}); on a machine "
                          "with network run python -m nltk.downloader punkt_tab punkt and point NLTK_DATA at it, or "
                          "drop --split-sentences") from None


class SentenceSplitter:
    """Picklable spec; ``build()`` gives an object with ``tokenize(text) -> list[str]``."""

    def __init__(self, lang: str = "english", keep_newlines: bool = False):
        try:
            import nltk  # noqa: F401
        except ImportError:
            raise ConfigError("--split-sentences needs NLTK (and its punkt data), which is not installed; pip install "
                              "nltk and python -m nltk.downloader punkt_tab, or drop --split-sentences (GPT/Llama "
                              "pretraining reads whole documents)") from None
        self.lang, self.keep_newlines = lang, keep_newlines
        self.build()  # a missing language fails here, in the main process, before any work

    def build(self):
        splitter = _punkt(self.lang)
        if not self.keep_newlines:
            return splitter
        from nltk.tokenize.punkt import PunktLanguageVars, PunktSentenceTokenizer

        class KeepNewlines(PunktLanguageVars):
            _period_context_fmt = _KEEP_NEWLINES_PERIOD_CONTEXT

        return PunktSentenceTokenizer(train_text=splitter._params, lang_vars=KeepNewlines())
