#!/usr/bin/env python
"""Your own data pipeline with the seed's API: a ``torch.utils.data.Dataset`` of token ids built from a local text
file, wrapped in DataLoaders and handed to ``orchestrator.launch_training(train_dataloader, val_dataloader)``.

Any dataset works that yields ``seq_length + 1`` token ids per sample (inputs and next-token labels), or dicts with
``input_ids`` (+ ``labels``, ``loss_mask``); see megallama/api_data.py. The ids must come from the model's
tokenizer: here Llama 3's (``--tokenizer-model``) for Llama 3 8B, the bundled 8K BPE for the tiny override.

  torchrun --nproc_per_node 8 examples/custom_data_loading.py --text-file book.txt --tokenizer-model tokenizer.model
  python examples/custom_data_loading.py --tiny     # the repository's README as the text, 3 steps on CPU
"""
import os
import sys

import torch
from torch.utils.data import DataLoader, Dataset

import megallama
from example_common import dry_run, example_parser, is_rank_0, model_overrides, report, run_example, run_flags, \
    launch_shape, tiny_training_config
from megallama.data.tokenizer import build_tokenizer
from megallama.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TextFileDataset(Dataset):
    """A text file's token ids cut into consecutive windows of ``seq_length + 1`` tokens (the loader shifts them
    into inputs and labels). ``part`` picks the first 90 % (train) or the last 10 % (validation) of the windows."""

    def __init__(self, path: str, tokenizer, seq_length: int, part: str = "train"):
        with open(path, encoding="utf-8") as f:
            ids = torch.tensor(tokenizer.encode(f.read()) + [tokenizer.eod], dtype=torch.long)
        n = (ids.numel() - 1) // seq_length
        if n < 2:
            raise ConfigError(f"{path} holds {ids.numel()} tokens: too few for two windows of {seq_length + 1}; give "
                              "a longer text or a shorter sequence")
        windows = [ids[i * seq_length:(i + 1) * seq_length + 1] for i in range(n)]
        cut = max(1, n * 9 // 10)
        self.windows = windows[:cut] if part == "train" else windows[cut:]

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.windows[i]


def main() -> int:
    parser = example_parser(__doc__, gpus=8)
    parser.add_argument("--text-file", default=None, help="the text to train on (default with --tiny: README.md)")
    args = parser.parse_args()
    text = args.text_file or (os.path.join(REPO, "README.md") if args.tiny else None)
    if text is None:
        raise ConfigError("give --text-file (plain UTF-8 text to train on), or run --tiny")
    nodes, gpus = launch_shape(args)
    config = tiny_training_config(nodes * gpus, model_name="custom_data") if args.tiny else megallama.TrainingConfig(
        model_name="llama3_8b_custom_data", batch_size=64, micro_batch_size=1, sequence_length=2048,
        learning_rate=3e-4, epochs=1, warmup_iters=10, mixed_precision="bf16", eval_interval=50, log_interval=1)
    orchestrator = megallama.LlamaTrainingOrchestrator(
        model_variant="llama3_8b", num_gpus=gpus, num_nodes=nodes, auto_configure=True, training_config=config,
        model_overrides=model_overrides(args, "llama3_8b", vocab_size=8192))
    if args.dry_run:
        return dry_run(orchestrator, args)
    tokenizer = build_tokenizer("llama3" if args.tokenizer_model else "bundled", args.tokenizer_model)
    seq = orchestrator.sequence_length
    # The loop samples a map-style dataset itself (its data-parallel share, resumable order); the train DataLoader's
    # batch size is the micro-batch per rank, so it agrees with the config's; an iterable loader's batches are
    # read once into memory.
    micro = config.micro_batch_size
    train_dataloader = DataLoader(TextFileDataset(text, tokenizer, seq, "train"), batch_size=micro, shuffle=True)
    val_dataloader = DataLoader(TextFileDataset(text, tokenizer, seq, "valid"), batch_size=micro)
    if is_rank_0():
        print(f"{text}: {len(train_dataloader.dataset)} training and {len(val_dataloader.dataset)} validation "
              f"windows of {seq + 1} tokens ({tokenizer.name} tokenizer)", flush=True)
    flags = run_flags(args, orchestrator.model_config.vocab_size)
    flags.pop("data_path", None)  # the data is the dataloaders
    return report(orchestrator.launch_training(train_dataloader, val_dataloader, **flags))


if __name__ == "__main__":
    sys.exit(run_example(main))
