"""A map-style dataset of random 16-token samples that records the indices read: the data-order tests' probe."""
import torch


class Recorded(torch.utils.data.Dataset):
    def __init__(self, n, seed=0, log=None):
        g = torch.Generator().manual_seed(seed)
        self.tokens, self.log = torch.randint(0, 256, (n, 17), generator=g), log

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        if self.log is not None:
            self.log.append(i)
        t = self.tokens[i]
        return {"input_ids": t[:-1], "labels": t[1:], "loss_mask": torch.ones(16)}
