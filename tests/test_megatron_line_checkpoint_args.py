"""A Megatron launch line (Megatron's model flags, no --model) with --use-checkpoint-args: the model is the
checkpoint's, as Megatron reads the shape from it, so the line need not give --num-layers & co. (it was refused as
missing them); the training defaults it leaves out are still Megatron's."""
import json

from megallama.arguments import parse_args

LINE = ["--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear", "--position-embedding-type", "rope",
        "--attention-dropout", "0", "--hidden-dropout", "0", "--seq-length", "32", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--train-iters", "3", "--lr", "1e-4", "--mock-data", "--device", "cpu"]


def test_a_megatron_line_with_use_checkpoint_args_takes_the_shape_from_the_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 64, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))
    a = parse_args(["--use-checkpoint-args", "--load", str(tmp_path)] + LINE, world_size=1)
    c = a.model_config
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_query_groups, c.rope_theta,
            c.tie_word_embeddings) == (2, 64, 96, 2, 500000.0, False)
    assert (a.lr_warmup_iters, a.lr_decay_style, a.adam_beta2, a.weight_decay) == (0, "linear", 0.999, 0.01)
