"""ZeRO-3 with expert parallelism: under ep each rank keeps E/ep experts sharded over the expert-data-parallel group
(N/ep ranks), i.e. E/N of them, which is what ZeRO-3 over all N ranks keeps without ep: ep saves no model states
at stage 3 (it does at stages 0-2, where the experts' weights stay whole). And DDP refuses the layout
(optimizer/distributed.py), so the estimator, the tool and --dry-run refuse it the same way instead of planning a
run that fails at launch."""
import os
import subprocess
import sys

import pytest

from megallama.errors import ConfigError
from megallama.memory import estimate_requirements

from dist_utils import run_distributed
from test_memory import ROOT, TINY

MOE = ["--num-layers", "2", "--num-experts", "4", "--global-batch-size", "8"]
REFUSED = "ZeRO stage 3 does not support expert-parallel MoE layers"


def test_expert_states_per_rank_are_one_nth_at_stage_3_and_whole_weights_below():
    """Hand count: 8 GPUs, 8 experts. Stage 2 with ep 2: weights of 4 local experts, grads and optimizer states of
    4 / (8 / 2) = 1; stage 3 over 8 ranks without ep: 8 / 8 = 1 expert's states of each kind."""
    from megallama.memory_states import split_states_bytes
    e = 1000.0  # one expert's parameters
    pkg = (2, 4, 12)
    z2 = split_states_bytes((0, 4 * e, 0), 2, 8, 2, pkg)  # 4 local experts at ep 2
    assert z2 == {"weights": 2 * 4 * e, "grads": 4 * e, "optimizer": 12 * e}
    assert split_states_bytes((0, 8 * e, 0), 3, 8, 1, pkg) == {"weights": 2 * e, "grads": 4 * e, "optimizer": 12 * e}


def _build(rank, world, argv):
    """Build the model and optimizer as the training loop does; return the error it raises, if any."""
    from megallama.arguments import parse_args
    from megallama.initialize import initialize_megatron
    from megallama.training_setup import setup_model_and_optimizer
    args = parse_args(argv + ["--mock-data", "--device", "cpu", "--bf16"], world_size=world)
    dev = initialize_megatron(args)
    try:
        setup_model_and_optimizer(args, dev)
    except ConfigError as e:
        return str(e)
    return None


def test_zero3_with_expert_parallel_refused_like_training():
    """Two CPU ranks, ep 2, ZeRO-3: building the training run raises ConfigError; the estimate raises the same
    line (it priced the layout before), the tool and --dry-run print it as one error line."""
    argv = TINY + MOE + ["--expert-model-parallel-size", "2", "--zero-stage", "3"]
    errs = run_distributed(_build, 2, argv)
    assert all(e is not None and e.startswith(REFUSED) for e in errs.values()), errs
    with pytest.raises(ConfigError, match=REFUSED):
        estimate_requirements("tiny_llama3_50m", num_gpus=2, ep=2, zero_stage=3, num_experts=4, strategy="moe",
                              recommend=False)
    for ok in (dict(ep=1, zero_stage=3), dict(ep=2, zero_stage=2)):  # what does run is still priced
        estimate_requirements("tiny_llama3_50m", num_gpus=2, num_experts=4, strategy="moe", recommend=False, **ok)
    tool = os.path.join(ROOT, "tools", "estimate_memory.py")
    for cmd in ([sys.executable, tool], [sys.executable, os.path.join(ROOT, "pretrain_llama.py"), "--dry-run"]):
        out = subprocess.run(cmd + argv + ["--gpus", "2"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        last = out.stderr.strip().splitlines()[-1]
        assert out.returncode != 0 and last.startswith("error: " + REFUSED), out.stderr[-2000:]
