#!/usr/bin/env python
"""Multi-node training with the seed's API: the rendezvous comes from torchrun's or SLURM's environment, the layout
from auto-configuration for the whole job (nodes x GPUs per node), then ``launch_training``.

Llama 3 70B, sequence 8192, bf16, global batch 256; on 4 nodes of 8 GPUs auto-configuration picks tp 8 x pp 2 x
dp 2 with ZeRO-2 (about 69 GiB per GPU by megallama's estimator; ZeRO-1 would need 77). Either torchrun on every node:

  torchrun --nnodes 4 --node_rank $NODE_RANK --nproc_per_node 8 --master_addr $HEAD --master_port 29500 \\
      examples/multi_node_training.py --data-path corpus.jsonl --tokenizer-model tokenizer.model
or one SLURM task per GPU, no torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR from SLURM's variables):

  srun --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 python examples/multi_node_training.py ...
  python examples/multi_node_training.py --tiny     # the same code on a 2-layer model, 3 steps on CPU
"""
import os
import re
import subprocess
import sys

import megallama
from example_common import dry_run, example_parser, is_rank_0, launch_shape, model_overrides, report, run_example, \
    run_flags, tiny_training_config
from megallama.errors import ConfigError


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ('gpu[003-010,12],cpu1' -> 'gpu003'); scontrol when it is there."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
    return m.group(1) + (m.group(2) or "")


def rendezvous_from_env(args) -> tuple:
    """(nodes, processes per node). A one-process --dry-run plans the 4 x 8 launch (``--nodes`` / ``--gpus``:
    another; ``example_common.launch_shape``). torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and the
    master address; a SLURM task started by srun without torchrun gets them here from SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID, SLURM_JOB_NODELIST (MASTER_PORT: given, else derived from the job id)."""
    env = os.environ
    if args.dry_run and not any(k in env for k in ("WORLD_SIZE", "RANK", "SLURM_PROCID")):
        return launch_shape(args)
    if "RANK" not in env and "SLURM_PROCID" in env:
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env["SLURM_LOCALID"],
                   LOCAL_WORLD_SIZE=env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0] or
                   str(int(env["SLURM_NTASKS"]) // int(env.get("SLURM_JOB_NUM_NODES", "1"))),
                   MASTER_ADDR=env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
                   MASTER_PORT=env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    world = int(env.get("WORLD_SIZE", "1"))
    per_node = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    if world % per_node:
        raise ConfigError(f"{world} processes do not split into nodes of {per_node}; launch the same number of "
                          "processes on every node")
    return world // per_node, per_node


def main() -> int:
    args = example_parser(__doc__, gpus=8, nodes=4).parse_args()
    nodes, per_node = rendezvous_from_env(args)
    config = tiny_training_config(nodes * per_node, model_name="multi_node") if args.tiny else megallama.TrainingConfig(
        model_name="llama3_70b", batch_size=256, micro_batch_size=1, sequence_length=8192, learning_rate=1.5e-4,
        train_iters=1000, warmup_iters=100, mixed_precision="bf16", save_dir="checkpoints/llama3_70b",
        save_interval=100, log_interval=1)
    orchestrator = megallama.LlamaTrainingOrchestrator(
        model_variant="llama3_70b", training_strategy="standard", num_gpus=per_node, num_nodes=nodes,
        auto_configure=True, training_config=config, model_overrides=model_overrides(args, "llama3_70b"))
    if orchestrator.plan is None:
        raise ConfigError(f"no layout of llama3_70b fits {nodes} x {per_node} GPUs (reasons above); add nodes")
    if args.dry_run:
        return dry_run(orchestrator, args)
    if is_rank_0():
        print(f"rendezvous: {nodes} node(s) x {per_node} processes, master "
              f"{os.environ.get('MASTER_ADDR', 'local')}:{os.environ.get('MASTER_PORT', '-')}", flush=True)
        orchestrator.print_configuration()
    return report(orchestrator.launch_training(**run_flags(args, orchestrator.model_config.vocab_size)))


if __name__ == "__main__":
    sys.exit(run_example(main))
