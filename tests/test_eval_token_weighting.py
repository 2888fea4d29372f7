"""Validation loss as Megatron reports it: the summed loss over the summed loss tokens of every --eval-iters batch,
so with --eod-mask-loss (microbatches of unequal loss-token counts) it does not depend on --micro-batch-size. It
was the mean of the microbatch means: 6.764371 at micro-batch 1, 6.763693 at 8 for one checkpoint."""
import pytest

from megallama.arguments import parse_args
from megallama.evaluation import global_mean_loss
from megallama.training import pretrain

BASE = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "64", "--device", "cpu",
        "--no-progress-bar", "--eod-mask-loss", "--global-batch-size", "8", "--train-iters", "2", "--lr", "1e-3",
        "--eval-interval", "2", "--eval-iters", "2"]


def test_validation_loss_does_not_depend_on_the_micro_batch_size(tmp_path):
    out = {mbs: pretrain(parse_args(BASE + ["--micro-batch-size", str(mbs), "--data-cache-dir", str(tmp_path)],
                                    world_size=1)) for mbs in (1, 8)}
    assert out[1]["losses"] == pytest.approx(out[8]["losses"], rel=1e-5)  # the same training, to fp32 sums
    assert out[1]["valid_losses"][2] == pytest.approx(out[8]["valid_losses"][2], rel=1e-6)


def test_the_mean_weights_each_microbatch_by_its_tokens():
    import torch
    losses = [{"lm loss": torch.tensor(2.0), "num tokens": torch.tensor(30.0)},
              {"lm loss": torch.tensor(4.0), "num tokens": torch.tensor(10.0)}]
    assert global_mean_loss(losses, torch.device("cpu")) == pytest.approx((2 * 30 + 4 * 10) / 40)
    assert global_mean_loss([{"lm loss": torch.tensor(2.0)}, {"lm loss": torch.tensor(4.0)}],
                            torch.device("cpu")) == 3.0  # a user's loss_func without counts: the plain mean
