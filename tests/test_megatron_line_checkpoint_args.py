"""A Megatron launch line (Megatron's model flags, no --model) with --use-checkpoint-args: the model is the
checkpoint's, as Megatron reads the shape from it, so the line need not give --num-layers & co. (it was refused as
missing them); the training defaults it leaves out are still Megatron's."""
import json
import re

import pytest

from megallama.arguments import parse_args
from megallama.errors import ConfigError

LINE = ["--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear", "--position-embedding-type", "rope",
        "--attention-dropout", "0", "--hidden-dropout", "0", "--seq-length", "32", "--micro-batch-size", "1",
        "--global-batch-size", "2", "--train-iters", "3", "--lr", "1e-4", "--mock-data", "--device", "cpu"]


def test_a_megatron_line_with_use_checkpoint_args_takes_the_shape_from_the_checkpoint(tmp_path):
    a = parse_args(_hf_folder(tmp_path), world_size=1)
    c = a.model_config
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_query_groups, c.rope_theta,
            c.tie_word_embeddings) == (2, 64, 96, 2, 500000.0, False)
    assert (a.lr_warmup_iters, a.lr_decay_style, a.adam_beta2, a.weight_decay) == (0, "linear", 0.999, 0.01)


def _hf_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 64, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))
    return ["--use-checkpoint-args", "--load", str(tmp_path)] + LINE


def test_shape_flags_given_with_use_checkpoint_args_are_checked_against_the_checkpoint(tmp_path, capsys):
    line = _hf_folder(tmp_path)
    # the checkpoint's head dimension is 64/4 = 16 (it was checked against the default --model's 256/8 = 32)
    assert parse_args(line + ["--kv-channels", "16", "--num-layers", "2", "--rotary-base", "500000"],
                      world_size=1).model_config.head_dim == 16
    # --use-rope-scaling applies to the checkpoint's model (it was applied to the flags' model, then dropped)
    assert parse_args(line + ["--use-rope-scaling", "--rope-scaling-factor", "4"],
                      world_size=1).model_config.rope_scaling.factor == 4.0
    # a shape flag that contradicts the checkpoint is one line (it was silently ignored)
    with pytest.raises(ConfigError, match=re.escape("--num-layers 3 contradicts the checkpoint's model (num-layers "
                                                    "2), which --use-checkpoint-args trains; drop --num-layers")):
        parse_args(line + ["--num-layers", "3"], world_size=1)
    with pytest.raises(ConfigError, match=re.escape("--kv-channels 32 is not supported: megallama's head dimension "
                                                    "is --hidden-size / --num-attention-heads = 64/4 = 16")):
        parse_args(line + ["--kv-channels", "32"], world_size=1)
    # Megatron reads the normalization, MLP, biases and positions from the checkpoint too: only the dropouts
    # keep its defaults, so only they are named
    capsys.readouterr()
    parse_args([a for a in line if a not in ("--normalization", "RMSNorm", "--disable-bias-linear")], world_size=1)
    err = capsys.readouterr().err
    assert "--normalization" not in err and "--disable-bias-linear" not in err
    dropouts = line.index("--attention-dropout")
    parse_args(line[:dropouts] + line[dropouts + 4:], world_size=1)  # no --attention/--hidden-dropout 0
    assert "--attention-dropout 0.0 (Megatron's default: 0.1), --hidden-dropout 0.0" in capsys.readouterr().err
