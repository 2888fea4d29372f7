"""What the pretraining data builders tell the user, from rank 0: a split left without samples, documents that run
into each other (no eod between them), and a run that reads its training split more than once.

Warnings are the project's one ``warning:`` line (``initialize.warn_rank_0``), not ``warnings.warn``, which echoes a
source line and file path under the message and prints on every rank (every rank builds the datasets).
"""
from __future__ import annotations

import numpy as np

_EOD_SAMPLE = 64  # documents whose last token is looked at: enough to tell, cheap on any corpus
_said: set = set()


def warn_once(msg: str) -> None:
    """``warning: msg`` from rank 0, once per process: --epochs builds the datasets twice (to size an epoch, then for
    the run), and ``warnings.warn``'s default filter printed a repeated message once too."""
    if msg in _said:
        return
    _said.add(msg)
    from megallama.initialize import warn_rank_0  # lazy, as sft_formats: the data package loads without the loop
    warn_rank_0(msg)


def check_documents_end_in_eod(indexed, tokenizer) -> None:
    """Samples are documents laid end to end; only the eod that ``preprocess_data.py --append-eod`` puts after each
    tells the model where one ends. Without it documents run into each other and training is silently worse.
    Megatron does not check, so this warns, and looks only at the last token of up to 64 documents spread over the
    corpus (never a scan of the whole .bin)."""
    eod = getattr(tokenizer, "eod", None)
    di = indexed.document_indices
    full = np.flatnonzero(np.diff(di) > 0)  # the documents holding sequences (an empty text has none)
    if eod is None or len(full) == 0:
        return
    picked = full[np.unique(np.linspace(0, len(full) - 1, min(_EOD_SAMPLE, len(full))).round().astype(np.int64))]
    checked = lacking = 0
    for d in picked:
        seqs = [s for s in range(int(di[d + 1]) - 1, int(di[d]) - 1, -1) if indexed.sequence_lengths[s] > 0]
        if not seqs:
            continue
        n = int(indexed.sequence_lengths[seqs[0]])
        checked += 1
        lacking += int(indexed.get(seqs[0], n - 1, 1)[0]) != int(eod)
    if lacking:
        warn_once(f"{indexed.prefix}: {lacking} of {checked} documents checked do not end in the eod token (id {eod}) "
                  f"of tokenizer '{getattr(tokenizer, 'name', '?')}', so training runs one document into the next; "
                  "re-run tools/preprocess_data.py with --append-eod")


def note_epochs(label: str, samples_per_epoch: int, seq_length: int, num_samples: int | None) -> None:
    """Megatron's dataset builder logs the epochs a run's samples need; one line here when they need the training
    split more than once (a small corpus read over and over is worth knowing; one pass or less says nothing new)."""
    if not num_samples or num_samples <= samples_per_epoch:
        return
    epochs = num_samples / samples_per_epoch
    shown = f"{epochs:.1f}" if round(epochs, 1) > 1 else f"{epochs:.3f}"
    from megallama.initialize import print_rank_0
    print_rank_0(f"{label}: {samples_per_epoch} samples of seq {seq_length} per epoch; the run's {num_samples} samples "
                 f"take {shown} epochs")
