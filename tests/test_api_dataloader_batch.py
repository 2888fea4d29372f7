"""The train DataLoader's batch size is the run's micro-batch per rank (PyTorch's meaning), the plan and estimate
follow it, a fixed micro-batch that disagrees is one error, and reading past the end of the data is said.
Before, auto-configuration's micro-batch 32 read 96 samples of a 16-sample DataLoader(batch_size=4) in 3 steps."""
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, TensorDataset

import megallama
from megallama.errors import ConfigError

TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
            vocab_size=512)
SEQ = 16


def _data(n=16, seed=0):
    return TensorDataset(torch.randint(0, 512, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed)))


def _layout(orch):
    return orch.estimate_memory()["layout"]


def test_dataloader_batch_is_the_micro_batch_and_the_printed_plan_follows(capsys):
    orch = megallama.quick_start("tiny_llama3_50m", model_overrides=TINY, sequence_length=SEQ)
    assert orch.plan["micro_batch_size"] != 4  # the plan made before the data was known
    capsys.readouterr()
    out = orch.launch_training(DataLoader(_data(), batch_size=4), train_iters=3, device="cpu", no_progress_bar=True)
    assert out["consumed_samples"] == 12  # 3 steps of 4, not 3 of the plan's 32
    text = capsys.readouterr().out
    assert "note: micro-batch 4 per rank from the train DataLoader's batch_size, not the plan's" in text
    assert "global batch 4 = 4 x dp 1 x 1 microbatches" in text
    assert "global batch size:     4" in text
    # what print_configuration shows now is the run that trained: plan, flags and estimate
    assert orch.plan["micro_batch_size"] == 4 and orch.plan["num_microbatches"] == 1
    assert (_layout(orch)["micro_batch_size"], _layout(orch)["num_microbatches"]) == (4, 1)
    shown = orch.print_configuration()
    assert "micro-batch 4 x 1 microbatches (global 4)" in shown and "--micro-batch-size 4" in shown
    assert "chosen: tp 1, pp 1, dp 1, ZeRO-0, recompute none, micro-batch 4 x 1 microbatches" in shown


def test_a_fixed_micro_batch_that_disagrees_is_one_error():
    cfg = megallama.TrainingConfig(micro_batch_size=2, sequence_length=SEQ, train_iters=1)
    orch = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", model_overrides=TINY, training_config=cfg)
    with pytest.raises(ConfigError, match=r"train DataLoader's batch_size 4 disagrees with "
                                          r"TrainingConfig.micro_batch_size 2 .* make them equal"):
        orch.launch_training(DataLoader(_data(), batch_size=4), device="cpu")
    dc = megallama.DistributedConfig(microbatch_size=2)
    manual = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", model_overrides=TINY, distributed_config=dc,
                                                 training_config=megallama.TrainingConfig(sequence_length=SEQ))
    with pytest.raises(ConfigError, match="batch_size 4 disagrees with DistributedConfig.microbatch_size 2"):
        manual.launch_training(DataLoader(_data(), batch_size=4), train_iters=1, device="cpu")
    with pytest.raises(ConfigError, match="batch_size 4 disagrees with launch_training's micro_batch_size 2"):
        manual.launch_training(DataLoader(_data(), batch_size=4), train_iters=1, micro_batch_size=2)


def test_a_fixed_global_batch_accumulates_dataloader_batches_or_says_why_it_cannot():
    cfg = megallama.TrainingConfig(batch_size=8, sequence_length=SEQ, train_iters=1)
    orch = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", model_overrides=TINY, training_config=cfg)
    out = orch.launch_training(DataLoader(_data(), batch_size=4), device="cpu", no_progress_bar=True)
    assert out["consumed_samples"] == 8
    assert (_layout(orch)["micro_batch_size"], _layout(orch)["num_microbatches"]) == (4, 2)
    odd = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", model_overrides=TINY,
                                              training_config=megallama.TrainingConfig(batch_size=6,
                                                                                       sequence_length=SEQ))
    with pytest.raises(ConfigError, match="TrainingConfig.batch_size 6 .* not a multiple of the train DataLoader's "
                                          "batch_size 4"):
        odd.launch_training(DataLoader(_data(), batch_size=4), train_iters=1, device="cpu")


def test_a_manual_layout_takes_the_dataloader_batch_and_the_microbatches_asked():
    dc = megallama.DistributedConfig(num_microbatches=2)
    orch = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", model_overrides=TINY, distributed_config=dc,
                                               training_config=megallama.TrainingConfig(sequence_length=SEQ))
    out = orch.launch_training(DataLoader(_data(), batch_size=2), train_iters=2, device="cpu", no_progress_bar=True)
    assert out["consumed_samples"] == 8  # 2 steps of 2 x 2 microbatches (before: of 2 samples, 1 micro-batch)
    assert (_layout(orch)["micro_batch_size"], _layout(orch)["num_microbatches"]) == (2, 2)


class _Batches(IterableDataset):
    """Yields [4, SEQ + 1] batches itself: a DataLoader(batch_size=None) passes them through."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            yield torch.randint(0, 512, (4, SEQ + 1), generator=g)


def test_a_loader_without_automatic_batching(capsys):
    """batch_size=None: batches the dataset yields are the micro-batch; single sequences leave it to megallama,
    said in one line."""
    cfg = megallama.TrainingConfig(sequence_length=SEQ, train_iters=1)
    orch = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", model_overrides=TINY, training_config=cfg)
    out = orch.launch_training(DataLoader(_Batches(), batch_size=None), device="cpu", no_progress_bar=True)
    assert out["consumed_samples"] == 4 and _layout(orch)["micro_batch_size"] == 4
    capsys.readouterr()
    single = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", model_overrides=TINY, training_config=cfg)
    single.launch_training(DataLoader(_data(), batch_size=None), device="cpu", no_progress_bar=True)
    assert "note: the train DataLoader does not batch (batch_size=None, single sequences): global batch" in \
        capsys.readouterr().out


class _Mixed(IterableDataset):
    def __iter__(self):
        for b in (4, 2, 4):
            yield torch.zeros(b, SEQ + 1, dtype=torch.long)


def test_batches_of_a_dataset_of_batches_and_of_mixed_sizes():
    from megallama.api_data import UserDataset
    batches = [torch.zeros(4, SEQ + 1, dtype=torch.long)] * 3  # a map-style dataset whose items are batches
    data = UserDataset(DataLoader(batches, batch_size=None), SEQ, 512)
    assert len(data) == 12 and data.batch_size == 4
    mixed = UserDataset(DataLoader(_Mixed(), batch_size=None), SEQ, 512)
    assert mixed.batch_size is None and "batches hold 2 to 4 sequences" in mixed.batch_note


def test_a_batch_samplers_size_and_order_are_followed():
    from megallama.api_data import UserDataset
    ds = _data()
    loader = DataLoader(ds, batch_sampler=BatchSampler(RandomSampler(ds), 3, drop_last=False))
    data = UserDataset(loader, SEQ, 512)
    assert data.batch_size == 3 and data.shuffle  # its RandomSampler: each pass in a fresh order


def test_reading_past_the_end_of_the_data_is_said(capsys):
    cfg = megallama.TrainingConfig(micro_batch_size=4, sequence_length=SEQ, eval_iters=2)
    orch = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", model_overrides=TINY, training_config=cfg)
    capsys.readouterr()
    orch.launch_training(DataLoader(_data(8), batch_size=4), DataLoader(_data(4, seed=1), batch_size=4),
                         train_iters=3, device="cpu", no_progress_bar=True)
    text = capsys.readouterr().out
    assert "note: 3 iterations x global batch 4 read 12 samples of the 8 training samples (1.50 passes): past the " \
           "end they repeat from the start, in order" in text
    assert "note: each evaluation reads eval_iters 2 x global batch 4 = 8 samples of the 4 validation samples" in text
