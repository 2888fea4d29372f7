"""--dataloader-type cyclic (and the API's DataLoader(shuffle=True)): each pass over the training samples in a new
order, the same for any dp size and across a resume."""
import pytest
import torch

from dist_utils import run_distributed
from recorded_data import Recorded

from megallama.data.cyclic import EpochShuffledDataset
from megallama.errors import ConfigError




def test_each_pass_is_a_new_permutation():
    ds = EpochShuffledDataset(list(range(10)), seed=3, num_samples=25)
    assert len(ds) == 30
    passes = [[ds[i] for i in range(e * 10, e * 10 + 10)] for e in range(3)]
    assert all(sorted(p) == list(range(10)) for p in passes)
    assert len({tuple(p) for p in passes}) == 3 and passes[0] != list(range(10))
    again = EpochShuffledDataset(list(range(10)), seed=3, num_samples=25)
    assert [again[i] for i in (27, 5, 13)] == [passes[2][7], passes[0][5], passes[1][3]]  # any order of reads
    longer = EpochShuffledDataset(list(range(10)), seed=3, num_samples=45)  # a resume with more iterations
    assert [longer[i] for i in range(30)] == [x for p in passes for x in p]


def test_passes_follow_the_corpus_epochs():
    """Over a GPT dataset the passes are its corpus epochs (ds[i] past one epoch is the next epoch), whatever
    length the run gives it: a longer run reads the same samples first."""
    class Corpus:  # a GPTDataset's shape: samples_per_epoch, and ds[i] defined past one epoch
        samples_per_epoch = 6

        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return i
    short, long = EpochShuffledDataset(Corpus(12), 1, 12), EpochShuffledDataset(Corpus(30), 1, 30)
    assert [short[i] for i in range(12)] == [long[i] for i in range(12)]
    assert sorted(short[i] for i in range(6)) == list(range(6)) and sorted(short[i] for i in range(6, 12)) == \
        list(range(6, 12))


ARGV = ["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--vocab-size", "256", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "6", "--lr", "1e-2", "--no-progress-bar", "--device", "cpu",
        "--no-fused-kernels", "--dataloader-type", "cyclic"]


def _run(extra=(), log=None, world=1):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    return pretrain(parse_args(ARGV + list(extra), world_size=world), datasets=(Recorded(8, log=log), None))


def test_training_reads_every_pass_shuffled_and_resumes_exactly(tmp_path):
    log = []
    whole = _run(log=log)
    passes = [log[i:i + 8] for i in range(0, 24, 8)]
    assert all(sorted(p) == list(range(8)) for p in passes) and len({tuple(p) for p in passes}) == 3
    run = ["--save", str(tmp_path / "ck"), "--load", str(tmp_path / "ck")]
    first = _run(run + ["--exit-interval", "3"])
    second = _run(run)
    assert {**first["losses"], **second["losses"]} == whole["losses"]


def _dp2(rank, world):
    return _run(["--zero-stage", "1"], world=world)["losses"]


def test_dp2_reads_the_same_global_batches():
    ref = _run()["losses"]
    out = run_distributed(_dp2, 2)[0]
    assert [out[i] for i in range(1, 7)] == pytest.approx([ref[i] for i in range(1, 7)], rel=1e-5)


def test_api_dataloader_shuffle_means_cyclic():
    from megallama.api_data import UserDataset
    ds = Recorded(8)
    assert UserDataset(torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True), 16, 256).shuffle
    assert not UserDataset(torch.utils.data.DataLoader(ds, batch_size=2), 16, 256).shuffle
    with pytest.raises(ConfigError, match="WeightedRandomSampler picks samples"):
        UserDataset(torch.utils.data.DataLoader(ds, sampler=torch.utils.data.WeightedRandomSampler([1.0] * 8, 8)),
                    16, 256)
    split = UserDataset(torch.utils.data.DataLoader(ds, sampler=torch.utils.data.SubsetRandomSampler([5, 1, 6])),
                        16, 256)  # a train/validation split by sampler: that subset, shuffled
    assert split.shuffle and len(split) == 3
    assert torch.equal(split[0]["input_ids"], ds[5]["input_ids"]) and torch.equal(split[2]["input_ids"],
                                                                                   ds[6]["input_ids"])
