"""What the Python API's plan prices, by the CLI's rules, so ``quick_start`` describes the run ``launch_training``
starts: the vocabulary its embedding will have (the flags' data follows the tokenizer, padded as ``build_data``
pads it: ``autoconfig_args.tokenizer_vocab`` / ``follow_tokenizer``) and the GPU memory, with where it came from
(as ``--auto-configure`` says it: given, the visible GPU's, or assumed when no GPU is visible)."""
from __future__ import annotations

from typing import Optional, Tuple

from megallama.api_config import cuda_visible
from megallama.errors import ConfigError


def plan_vocab(args) -> Tuple[Optional[int], int]:
    """(tokenizer vocabulary, padding multiple) for ``choose_layout``: the vocabulary is None when the embedding
    keeps the model's (--vocab-size, --mock-data, unparsable flags, or a tokenizer that does not load here, which
    ``follow_tokenizer`` then names in the vocabulary line)."""
    if args is None:
        return None, 1
    from megallama.autoconfig_args import tokenizer_vocab
    try:
        vocab = tokenizer_vocab(args)
    except ConfigError:
        vocab = None
    return vocab, getattr(args, "make_vocab_size_divisible_by", None) or 1


def planned_gpu_memory(given: Optional[float]) -> Tuple[float, str]:
    """(GiB per GPU, where it came from). Without a GPU the plan is for a GPU run (as ``cli train --dry-run`` and
    --auto-configure plan), of an assumed 80 GiB: said so, since this process itself would train on CPU."""
    from megallama.autoconfig import detect_gpu_memory_gb
    cuda = cuda_visible()
    if given:
        return float(given), "gpu_memory_gb" + ("" if cuda else "; no GPU visible here, this process would train "
                                                                  "on CPU")
    if cuda:
        return detect_gpu_memory_gb(), "the visible GPU"
    return detect_gpu_memory_gb(), ("no GPU visible: assumed, this process would train on CPU; pass gpu_memory_gb "
                                    "for your GPUs")


def gpu_memory_line(gpu_memory_gb: float, source: str) -> str:
    """The plan's device line, worded as --auto-configure prints it."""
    return f"GPU memory: {gpu_memory_gb:.0f} GiB ({source})"


def dataloader_vocab_note(planned: Optional[int], built: int) -> None:
    """Your dataloaders bring no tokenizer, so the model keeps its own vocabulary; a plan made for the flags' data
    priced the tokenizer's: said in one line (plan for it with model_overrides={'vocab_size': ...})."""
    if planned and planned != built:
        from megallama.initialize import print_rank_0
        print_rank_0(f"note: the plan priced the tokenizer's vocabulary {planned}; your dataloaders train the "
                     f"model's {built} (pass model_overrides={{'vocab_size': {built}}} to plan for it)")

