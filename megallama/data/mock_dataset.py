"""Random-token samples for speed tests (``--mock-data``): deterministic per index, no files."""
import torch


class MockGPTDataset(torch.utils.data.Dataset):
    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int = 1234):
        self.vocab_size, self.seq_length, self.num_samples, self.seed = vocab_size, seq_length, num_samples, seed

    def __len__(self):
        return self.num_samples

    def __getitem__(self, idx: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx))
        tokens = torch.randint(0, self.vocab_size, (self.seq_length + 1,), generator=g)
        return {"input_ids": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(self.seq_length)}
