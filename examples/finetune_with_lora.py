#!/usr/bin/env python
"""LoRA instruction fine-tuning with the seed's API: ``create_llama3_70b_orchestrator(strategy=lora, instruct=True)``.

Llama 3 70B Instruct on 8 GPUs: adapters of rank 64 on the attention projections, the base frozen in bf16; the
data is a chat jsonl (``{"messages": [{"role", "content"}, ...]}``, Llama 3 chat template, loss on the answers
only; default the bundled sample). The base weights come from ``--pretrained-checkpoint`` (a megallama checkpoint
of any layout, or an HF model folder, converted once); the adapters are written in PEFT's layout at the end.

  torchrun --nproc_per_node 8 examples/finetune_with_lora.py --pretrained-checkpoint Meta-Llama-3-70B-Instruct \\
      --tokenizer-model Meta-Llama-3-70B-Instruct/original/tokenizer.model --data-path chats.jsonl
  python examples/finetune_with_lora.py --tiny      # the same code on a 2-layer model, 3 steps on CPU
"""
import sys

import megallama
from example_common import dry_run, example_parser, is_rank_0, model_overrides, report, run_example, run_flags, \
    launch_shape, tiny_training_config
from megallama.errors import ConfigError


def main() -> int:
    parser = example_parser(__doc__, gpus=8)
    parser.add_argument("--pretrained-checkpoint", default=None, help="base weights: megallama checkpoint or HF "
                        "folder (required for the real model)")
    parser.add_argument("--save-adapter", default="checkpoints/llama3_70b_lora/adapter")
    args = parser.parse_args()
    # --dry-run only plans (no weights read), so it runs without the base checkpoint and tokenizer
    if not args.tiny and not args.dry_run and not (args.pretrained_checkpoint and args.tokenizer_model):
        raise ConfigError("fine-tuning the real model needs --pretrained-checkpoint and --tokenizer-model (its "
                          "Llama 3 tokenizer.model); or run --tiny")
    lora_strategy = megallama.TrainingStrategy(name="lora", parameters={
        "lora_rank": 8 if args.tiny else 64,
        "lora_alpha": 16 if args.tiny else 128,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    })
    nodes, gpus = launch_shape(args)
    if args.tiny:
        config = tiny_training_config(nodes * gpus, model_name="lora", sequence_length=128)
    else:
        config = megallama.TrainingConfig(
            model_name="llama3_70b_instruct_lora", batch_size=64, micro_batch_size=1, sequence_length=4096,
            learning_rate=1e-4, epochs=1, warmup_iters=20, mixed_precision="bf16", eval_interval=100,
            save_dir="checkpoints/llama3_70b_lora", save_interval=200, log_interval=1)
    orchestrator = megallama.create_llama3_70b_orchestrator(num_gpus=gpus, num_nodes=nodes, strategy=lora_strategy,
                                                            instruct=True, training_config=config,
                                                            model_overrides=model_overrides(args, "llama3_70b"))
    if args.dry_run:
        return dry_run(orchestrator, args)
    if is_rank_0():
        orchestrator.print_configuration()
    flags = run_flags(args, orchestrator.model_config.vocab_size)
    if not args.tiny:
        flags.update(pretrained_checkpoint=args.pretrained_checkpoint, save_adapter=args.save_adapter)
    return report(orchestrator.launch_training(**flags))


if __name__ == "__main__":
    sys.exit(run_example(main))
