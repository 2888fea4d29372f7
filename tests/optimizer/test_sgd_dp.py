"""``--optimizer sgd`` on 2 gloo ranks against single-process torch SGD: ZeRO stages 0-3, 3 steps of 2
microbatches with clipping on (losses, grad norms 1e-5 relative; parameters 1e-5 relative norm); the sharded state
dicts of a stage-1 run resume as stage 3 on the same ranks and as one process (dp 2 -> 1) with the uninterrupted
run's losses and parameters. Through the training loop (``pretrain``): a dp-2 ZeRO-1 SGD run saved at iteration 2
resumes from the checkpoint files on one rank at ZeRO-0 with the straight run's losses."""
import os

import pytest
import torch
import torch.distributed as dist

from dist_utils import rel_err, run_distributed
from sgd_harness import make_sgd, reference_sgd
from zero_harness import train

STEPS, SPLIT = 3, 2
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _numpy(sd):
    return {k: v.detach().float().numpy() for k, v in sd.items()}


def _job(rank, world, ckpt):
    group = dist.group.WORLD
    out = {"runs": {}}
    for stage in range(4):
        ddp, opt = make_sgd(stage, group=group)
        losses, norms = train(ddp, opt, 0, SPLIT)
        if stage == 1:
            torch.save({"model": ddp.state_dict(), "optimizer": opt.state_dict()},
                       os.path.join(ckpt, f"rank_{rank}.pt"))
        more, more_norms = train(ddp, opt, SPLIT, STEPS - SPLIT)
        out["runs"][stage] = (losses + more, norms + more_norms, _numpy(ddp.state_dict()))
    dist.barrier()
    ddp, opt = make_sgd(3, group=group)  # the stage-1 shards of both ranks, resumed at stage 3
    ddp.load_state_dict(torch.load(os.path.join(ckpt, f"rank_{rank}.pt"), weights_only=True)["model"])
    opt.load_state_dict([torch.load(os.path.join(ckpt, f"rank_{r}.pt"), weights_only=True)["optimizer"]
                         for r in range(world)])
    losses, _ = train(ddp, opt, SPLIT, STEPS - SPLIT)
    out["resumed"] = (losses, _numpy(ddp.state_dict()))
    return out


@pytest.fixture(scope="module")
def reference():
    return reference_sgd(STEPS)


@pytest.fixture(scope="module")
def dp2(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("sgd_dp2"))
    return run_distributed(_job, 2, ckpt), ckpt


def _check_params(params, reference, what):
    assert set(params) == set(reference["params"])
    for k, v in params.items():
        err = rel_err(torch.as_tensor(v), reference["params"][k])
        assert err <= 1e-5, f"{what}: {k} relative error {err:.2e}"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_dp2_matches_single_process_sgd(dp2, reference, stage):
    assert any(n > 0.5 for n in reference["norms"])  # clipping active
    for r in range(2):
        losses, norms, params = dp2[0][r]["runs"][stage]
        for a, b in zip(losses + norms, reference["losses"] + reference["norms"]):
            assert abs(a - b) <= 1e-5 * abs(b), (r, stage, losses, norms, reference)
        _check_params(params, reference, f"rank {r} stage {stage}")


def test_stage1_shards_resume_as_stage3(dp2, reference):
    for r in range(2):
        losses, params = dp2[0][r]["resumed"]
        assert abs(losses[0] - reference["losses"][SPLIT]) <= 1e-5 * reference["losses"][SPLIT]
        _check_params(params, reference, f"resumed rank {r}")


def test_dp2_shards_resume_in_one_process(dp2, reference):
    ckpt = dp2[1]
    ddp, opt = make_sgd(0)
    saved = [torch.load(os.path.join(ckpt, f"rank_{r}.pt"), weights_only=True) for r in range(2)]
    ddp.load_state_dict(saved[0]["model"])
    opt.load_state_dict([s["optimizer"] for s in saved])
    losses, _ = train(ddp, opt, SPLIT, STEPS - SPLIT)
    assert abs(losses[0] - reference["losses"][SPLIT]) <= 1e-5 * reference["losses"][SPLIT]
    _check_params(ddp.state_dict(), reference, "dp 2 -> 1")


# ------------------------------------------------------------------ the training loop and its checkpoint files
LOOP = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4", "--lr", "0.2",
        "--lr-warmup-iters", "0", "--mock-data", "--no-progress-bar", "--device", "cpu", "--no-fused-kernels",
        "--optimizer", "sgd", "--sgd-momentum", "0.9", "--weight-decay", "0.1", "--log-interval", "1"]


def _pretrain(rank, world, argv):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    return pretrain(parse_args(list(argv), world_size=world))["losses"]


def test_loop_checkpoint_resumes_on_another_dp_size(tmp_path):
    ck = str(tmp_path / "ck")
    straight = run_distributed(_pretrain, 2, LOOP + ["--zero-stage", "1", "--save", ck, "--save-interval", "2"])[0]
    resumed = run_distributed(_pretrain, 1, LOOP + ["--zero-stage", "0",
                                                    "--load", os.path.join(ck, "iter_0000002")])[0]
    assert sorted(resumed) == [3, 4] and straight[4] < straight[1]
    for step in (3, 4):
        assert abs(resumed[step] - straight[step]) <= 1e-5 * abs(straight[step]), (straight, resumed)


def _pretrain_error(rank, world, argv):
    from megallama.errors import ConfigError
    try:
        _pretrain(rank, world, argv)
    except ConfigError as e:
        return str(e)
    return None


def test_adam_checkpoint_into_an_sgd_run_names_the_optimizer(tmp_path):
    ck = str(tmp_path / "adam")
    adam = [x for x in LOOP if x not in ("--optimizer", "sgd", "--sgd-momentum", "0.9")]
    run_distributed(_pretrain, 1, adam + ["--save", ck, "--save-interval", "2", "--exit-interval", "2"])
    err = run_distributed(_pretrain_error, 1, LOOP + ["--load", ck])[0]
    assert err is not None and "\n" not in err, err
    assert "holds no 'momentum_buffer' for this run's --optimizer sgd" in err and "only exp_avg, exp_avg_sq" in err \
        and "pass the ones it was trained with, or --no-load-optim" in err, err
