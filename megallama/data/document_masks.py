"""Megatron's per-document options for packed pretraining samples: ``--reset-position-ids`` (positions restart after
each eod), ``--reset-attention-mask`` (a token attends only within its document: Llama 3's document masking) and
``--eod-mask-loss`` (no loss where the input token is the eod, i.e. on guessing the next document's first token);
``--calculate-per-token-loss`` normalises the loss by the global batch's loss-token count instead of per microbatch.

As in Megatron's ``get_ltor_masks_and_position_ids``, an eod belongs to the document it ends; the next token starts
a new one. Documents become ``document_ids`` (the model's packed-sequence mask, which context parallelism and the
pipeline carry as SFT packing does) and ``position_ids``.
"""
from __future__ import annotations

import torch

from megallama.errors import ConfigError

DOCUMENT_FLAGS = ("reset_position_ids", "reset_attention_mask", "eod_mask_loss")  # these need the eod
FLAGS = DOCUMENT_FLAGS + ("calculate_per_token_loss",)


def document_fields(input_ids: torch.Tensor, eod: int, reset_position_ids: bool, reset_attention_mask: bool,
                    eod_mask_loss: bool) -> dict:
    """For one sample's input tokens [s]: the fields to add (``position_ids``, ``document_ids``) and, with
    ``eod_mask_loss``, the ``loss_mask`` factor (0 where the input is the eod)."""
    out = {}
    is_eod = input_ids == eod
    # document of token k = eods strictly before k
    doc = torch.cumsum(is_eod.long(), 0) - is_eod.long()
    if reset_attention_mask:
        out["document_ids"] = doc
    if reset_position_ids:
        starts = torch.zeros_like(doc)
        first = torch.nonzero(is_eod).flatten() + 1  # each document after the first starts after an eod
        first = first[first < len(doc)]
        starts[first] = first
        start_of_doc = torch.cummax(starts, 0).values
        out["position_ids"] = torch.arange(len(doc)) - start_of_doc
    if eod_mask_loss:
        out["loss_mask"] = (~is_eod).float()
    return out


class DocumentMaskedDataset(torch.utils.data.Dataset):
    """A pretraining dataset's samples with ``document_fields`` added; with --calculate-per-token-loss, its
    ``wrap_iterator`` attaches the global loss-token count (as chat data does)."""

    def __init__(self, dataset, eod: int, args):
        self.dataset, self.eod = dataset, eod
        self.flags = {k: bool(getattr(args, k, False)) for k in DOCUMENT_FLAGS}
        self.per_token = bool(getattr(args, "calculate_per_token_loss", False))

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        sample = dict(self.dataset[idx])
        if not any(self.flags.values()):
            return sample
        fields = document_fields(sample["input_ids"], self.eod, **self.flags)
        if "loss_mask" in fields:
            fields["loss_mask"] = sample["loss_mask"] * fields["loss_mask"]
        sample.update(fields)
        return sample

    def __getattr__(self, name):  # the wrapped dataset's attributes (samples_per_epoch, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def wrap_iterator(self, iterator, num_microbatches: int):
        if not self.per_token:
            return iterator
        from megallama.data.sft_dataset import GlobalTokenCountIterator
        return GlobalTokenCountIterator(iterator, num_microbatches)


def apply_document_flags(args, tokenizer, *datasets):
    """The pretraining datasets wrapped for the flags (unchanged when none is set, and chat data, which masks and
    counts per token already)."""
    if not any(getattr(args, k, False) for k in FLAGS) or getattr(args, "chat_template", False):
        return datasets
    given = [f"--{k.replace('_', '-')}" for k in DOCUMENT_FLAGS if getattr(args, k, False)]
    if tokenizer is None and given:
        raise ConfigError(f"{' '.join(given)} {'needs' if len(given) == 1 else 'need'} the tokenizer's eod, "
                          "which --mock-data and your own datasets (the Python API's dataloaders) do not give; "
                          "train on a corpus (--data-path) or drop it")
    eod = tokenizer.eod if tokenizer is not None else None
    return tuple(None if d is None else DocumentMaskedDataset(d, eod, args) for d in datasets)
