#!/usr/bin/env python
"""Basic Llama 7B training with the seed's manual-trainer API: a tensor-parallel model, a training config, a layout,
a trainer, ``fit()`` (the one training loop of pretrain_llama.py underneath).

Llama 2 7B, sequence 4096, bf16, full recompute; tp 2 within a node and ZeRO-1 over the data-parallel rest (8 GPUs:
about 32 GiB per GPU by megallama's estimator; at least 4 GPUs of 80 GiB). Launch one process per GPU:

  torchrun --nproc_per_node 8 examples/train_llama_7b.py --data-path corpus.jsonl --tokenizer-model llama2.model
  python examples/train_llama_7b.py --tiny          # the same code on a 2-layer model, 3 steps on CPU (tp 1)
  torchrun --nproc-per-node 2 examples/train_llama_7b.py --tiny   # ... with tp 2, as the real run
"""
import sys

import megallama
from example_common import dry_run, example_parser, is_rank_0, model_overrides, report, run_example, run_flags, \
    tiny_training_config, world_size


def main() -> int:
    args = example_parser(__doc__, gpus=8).parse_args()
    world = world_size(args)  # --dry-run from one process: the 8-GPU run (--gpus N for another)
    tp = 2 if world % 2 == 0 else 1  # --tiny too: its shape (4 heads, 2 kv heads, ffn 176) splits in two
    if tp == 1 and is_rank_0():
        print(f"tensor parallel size 1: {world} process(es) cannot hold tp 2 (launch an even number, e.g. torchrun "
              "--nproc-per-node 2)")
    model = megallama.create_llama_7b_parallel(tensor_parallel_size=tp, use_flash_attention=True,
                                               use_checkpointing=True, **model_overrides(args, "llama2_7b"))
    if args.tiny:
        config = tiny_training_config(world, model_name="custom_llama_7b")
    else:
        config = megallama.TrainingConfig(model_name="custom_llama_7b", batch_size=256, micro_batch_size=1,
                                          sequence_length=4096, learning_rate=3e-4, train_iters=1000,
                                          warmup_iters=100, mixed_precision="bf16", save_dir="checkpoints/llama2_7b",
                                          save_interval=250, log_interval=10)
    distributed_config = megallama.ConfigurationFactory.create_tensor_parallel_config(
        num_gpus=world, tensor_parallel_size=tp, zero_stage=1 if world > tp else 0)
    trainer = megallama.create_distributed_trainer(model=model, config=config, distributed_config=distributed_config,
                                                   trainer_type="adaptive")
    if args.dry_run:
        return dry_run(trainer.orchestrator, args)
    if is_rank_0():
        trainer.orchestrator.print_configuration()
    return report(trainer.fit(**run_flags(args, model.config.vocab_size)))


if __name__ == "__main__":
    sys.exit(run_example(main))
