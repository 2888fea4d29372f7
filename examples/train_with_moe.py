#!/usr/bin/env python
"""Mixture-of-experts training with the seed's API: a ``TrainingStrategy(name="moe")`` on an auto-configured
``LlamaTrainingOrchestrator``.

Tiny Llama 3 150M with every other layer sparse (8 experts, top-2 routing, load-balancing aux loss), sequence
1024, bf16, on the GPUs torchrun gives (the layout is chosen by megallama/autoconfig.py and printed); each log
line carries the aux loss and the tokens-per-expert histogram. Launch one process per GPU:

  torchrun --nproc_per_node 4 examples/train_with_moe.py --data-path corpus.jsonl
  python examples/train_with_moe.py --tiny          # the same code on a 2-layer model, 3 steps on CPU
"""
import sys

import megallama
from example_common import dry_run, example_parser, is_rank_0, model_overrides, report, run_example, run_flags, \
    launch_shape, tiny_training_config


def main() -> int:
    args = example_parser(__doc__, gpus=4).parse_args()
    nodes, gpus = launch_shape(args)
    strategy = megallama.TrainingStrategy(name="moe", parameters={
        "num_experts": 4 if args.tiny else 8,
        "experts_per_token": 2,
        "moe_layers": [1] if args.tiny else [1, 3, 5, 7],  # 0-based decoder layer indices
        "moe_aux_loss_coeff": 1e-2,
        "moe_z_loss_coeff": 1e-3,
    })
    config = tiny_training_config(nodes * gpus, model_name="moe") if args.tiny else megallama.TrainingConfig(
        model_name="tiny_llama3_150m_moe", batch_size=64, micro_batch_size=8, sequence_length=1024,
        learning_rate=1e-3, train_iters=500, warmup_iters=50, mixed_precision="bf16", log_interval=10)
    orchestrator = megallama.LlamaTrainingOrchestrator(
        model_variant="tiny_llama3_150m", training_strategy=strategy, num_gpus=gpus, num_nodes=nodes,
        auto_configure=True, training_config=config, model_overrides=model_overrides(args, "tiny_llama3_150m"))
    if args.dry_run:
        return dry_run(orchestrator, args)
    if is_rank_0():
        orchestrator.print_configuration()
    return report(orchestrator.launch_training(**run_flags(args, orchestrator.model_config.vocab_size)))


if __name__ == "__main__":
    sys.exit(run_example(main))
