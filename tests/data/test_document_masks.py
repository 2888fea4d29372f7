"""Megatron's --reset-position-ids, --reset-attention-mask, --eod-mask-loss and --calculate-per-token-loss:
the fields match Megatron's get_ltor_masks_and_position_ids by hand; a document inside a packed sample gets exactly
the losses it gets alone; per-token normalisation is the global batch's token mean; and tp 2, pp 2, cp 2 and
dp 2 train like one process with all four flags."""
import pytest
import torch

from data_testlib import write_jsonl
from dist_utils import run_distributed

FLAGS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jumbo plums".split()


def test_fields_are_megatrons():
    from megallama.data.document_masks import document_fields
    x = torch.tensor([5, 6, 0, 7, 8, 9, 0, 0, 4])  # eod = 0: at 2, 6 and 7 (two in a row)
    f = document_fields(x, 0, True, True, True)
    # Megatron: after an eod at i, position_ids[i+1:] -= i + 1 - prev; the eod ends its own document
    assert f["position_ids"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 0]
    assert f["document_ids"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 3]
    assert f["loss_mask"].tolist() == [1, 1, 0, 1, 1, 1, 0, 0, 1]
    assert set(document_fields(x, 0, True, False, False)) == {"position_ids"}
    f = document_fields(torch.tensor([3, 4, 5]), 0, True, True, True)  # no eod: one document
    assert f["position_ids"].tolist() == [0, 1, 2] and f["document_ids"].tolist() == [0, 0, 0]
    assert document_fields(torch.tensor([0, 3]), 0, True, False, False)["position_ids"].tolist() == [0, 0]


def test_a_packed_document_trains_as_if_alone():
    """Per-token losses of document B inside [A eod B eod C] equal B's losses run on its own."""
    from megallama.config import ModelConfig
    from megallama.data.document_masks import document_fields
    from megallama.model.llama import build_model
    cfg = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      vocab_size=50, max_position_embeddings=64)
    model = build_model(cfg, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(1, 50, (n,), generator=g) for n in (7, 9, 6))
    eod = torch.tensor([0])
    tokens = torch.cat([a, eod, b, eod, c])
    inputs, labels = tokens[:-1], tokens[1:]
    f = document_fields(inputs, 0, True, True, False)
    with torch.no_grad():
        packed = model(inputs[None], labels=labels[None], position_ids=f["position_ids"][None],
                       document_ids=f["document_ids"][None])[0]
        alone = model(b[None], labels=torch.cat([b[1:], eod])[None])[0]
        unmasked = model(inputs[None], labels=labels[None])[0]
    start = len(a) + 1
    got = packed[start:start + len(b)]
    assert torch.linalg.norm(got - alone) / torch.linalg.norm(alone) < 1e-5
    assert torch.linalg.norm(unmasked[start:start + len(b)] - alone) / torch.linalg.norm(alone) > 1e-3


def _corpus(tmp_path):
    g = torch.Generator().manual_seed(1)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(1, 8, (200,), generator=g)]  # short uneven documents: many eods per sample
    return write_jsonl(tmp_path / "docs.jsonl", texts)


def _argv(tmp_path, *extra):
    return ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32", "--train-iters", "3",
            "--lr", "1e-2", "--lr-warmup-iters", "1", "--no-progress-bar", "--device", "cpu", "--no-fused-kernels",
            "--data-path", _corpus(tmp_path), "--data-cache-dir", str(tmp_path / "cache"), "--split", "100,0,0",
            *extra]


def _losses(argv, world=1):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    return pretrain(parse_args(argv, world_size=world))["losses"]


def test_per_token_loss_is_the_global_batch_token_mean(tmp_path):
    """With eod-masked losses the microbatches count different tokens: --calculate-per-token-loss over 4
    microbatches of 1 trains exactly as one microbatch of 4 (a global token mean either way); without it, the
    mean of the microbatch means differs."""
    one = _losses(_argv(tmp_path, "--micro-batch-size", "4", "--global-batch-size", "4", *FLAGS))
    per_token = _losses(_argv(tmp_path, "--micro-batch-size", "1", "--global-batch-size", "4",
                              "--calculate-per-token-loss", *FLAGS))
    per_micro = _losses(_argv(tmp_path, "--micro-batch-size", "1", "--global-batch-size", "4", *FLAGS))
    assert [per_token[i] for i in (1, 2, 3)] == pytest.approx([one[i] for i in (1, 2, 3)], rel=1e-5)
    assert abs(per_micro[3] - one[3]) / one[3] > 5e-4, (per_micro, one)  # 50x the tolerance above


LAYOUTS = {"dp2_zero1": ["--zero-stage", "1"], "tp2_sp": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
           "pp2": ["--pipeline-model-parallel-size", "2"], "cp2": ["--context-parallel-size", "2"]}


def _parallel(rank, world, argv):
    from megallama.mpu import parallel_state as ps
    out = {}
    for name, flags in LAYOUTS.items():
        out[name] = _losses(argv + flags, world)
        ps.destroy_model_parallel()
    return out


def test_every_layout_trains_like_one_process(tmp_path):
    argv = _argv(tmp_path, "--micro-batch-size", "2", "--global-batch-size", "4", "--calculate-per-token-loss", *FLAGS)
    ref = _losses(argv)
    plain = _losses(_argv(tmp_path, "--micro-batch-size", "2", "--global-batch-size", "4"))
    assert abs(plain[3] - ref[3]) / ref[3] > 1e-4  # the flags change what is trained (10x the tolerance)
    out = run_distributed(_parallel, 2, argv)[0]
    for name, losses in out.items():
        assert [losses[i] for i in (1, 2, 3)] == pytest.approx([ref[i] for i in (1, 2, 3)], rel=1e-5), name


def test_per_token_loss_on_python_api_data():
    """Masked user data (the Python API's datasets): two samples with 2 and 30 loss tokens. Per-token loss over
    two microbatches of one equals one microbatch of two (the global token mean), not the mean of the two means.
    The logged loss is token-weighted either way (Megatron's report), so the objectives part at the second step."""
    from megallama.api_data import UserDataset
    g = torch.Generator().manual_seed(0)
    items = []
    for kept in (2, 30):
        ids = torch.randint(0, 256, (33,), generator=g)
        mask = torch.zeros(32)
        mask[-kept:] = 1
        items.append({"input_ids": ids[:-1], "labels": ids[1:], "loss_mask": mask})
    base = ["--model", "tiny_llama3_50m", "--num-layers", "1", "--hidden-size", "64", "--ffn-hidden-size", "128",
            "--num-attention-heads", "4", "--vocab-size", "256", "--seq-length", "32", "--train-iters", "2",
            "--lr", "1e-2", "--lr-warmup-iters", "0", "--no-progress-bar", "--device", "cpu", "--no-fused-kernels"]

    def losses(*extra):
        from megallama.arguments import parse_args
        from megallama.training import pretrain
        return pretrain(parse_args(base + list(extra), world_size=1),
                        datasets=(UserDataset(items, 32, 256), None))["losses"]
    one = losses("--micro-batch-size", "2", "--global-batch-size", "2")
    per_token = losses("--micro-batch-size", "1", "--global-batch-size", "2", "--calculate-per-token-loss")
    per_micro = losses("--micro-batch-size", "1", "--global-batch-size", "2")
    assert [per_token[1], per_token[2]] == pytest.approx([one[1], one[2]], rel=1e-5)
    assert per_micro[1] == pytest.approx(one[1], rel=1e-5)  # the same weights, the loss logged token-weighted
    assert abs(per_micro[2] - one[2]) / one[2] > 1e-3  # trained on the mean of the two means instead
