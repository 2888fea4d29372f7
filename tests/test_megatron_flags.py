"""A Megatron-LM Llama launch line runs unchanged: its restating flags are accepted, its aliases mean what they
mean there (same losses, bit for bit, as the megallama spelling), a flag asking for another model is one error
line, and the checkpoint flags (--no-load-optim, --no-load-rng, --no-save-optim, --exit-on-missing-checkpoint)
do what Megatron's do."""
import re
from datetime import datetime

import pytest

from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.training import pretrain

SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--lr", "3e-3", "--min-lr", "3e-4", "--no-progress-bar", "--device", "cpu"]
NATIVE = ["--model", "tiny_llama3_50m", "--rope-theta", "10000", "--train-iters", "3", "--lr-warmup-iters", "1",
          "--lr-decay-iters", "3", "--untie-embeddings-and-output-weights"] + SHAPE
MEGATRON = ["--model", "tiny_llama3_50m", "--group-query-attention", "--swiglu", "--disable-bias-linear",
            "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--use-rotary-position-embeddings",
            "--no-position-embedding", "--rotary-base", "10000", "--rotary-percent", "1.0", "--attention-dropout",
            "0.0", "--hidden-dropout", "0.0", "--untie-embeddings-and-output-weights", "--no-masked-softmax-fusion",
            "--attention-softmax-in-fp32", "--use-mcore-models", "--transformer-impl", "transformer_engine",
            "--use-flash-attn", "--no-bias-swiglu-fusion", "--no-rope-fusion", "--log-throughput",
            "--train-samples", "12", "--lr-warmup-samples", "4", "--lr-decay-samples", "12",
            "--lr-decay-style", "cosine", "--make-vocab-size-divisible-by", "128",
            "--distributed-timeout-minutes", "10", "--disable-gloo-process-groups", "--tokenizer-type", "bundled",
            # Megatron's own Llama-3 example: restating or implementation flags
            "--kv-channels", "16", "--attention-backend", "fused", "--no-create-attention-mask-in-dataloader",
            "--cross-entropy-loss-fusion", "--manual-gc", "--manual-gc-interval", "100",
            "--empty-unused-memory-level", "1", "--accumulate-allreduce-grads-in-fp32", "--no-query-key-layer-scaling",
            "--ckpt-format", "torch_dist"] + SHAPE
TINY = ["--model", "tiny_llama3_50m"] + SHAPE


def _args(argv):
    return parse_args(argv, world_size=1)


def test_a_megatron_llama_command_line_trains_like_the_megallama_one(tmp_path):
    cache = ["--data-cache-dir", str(tmp_path / "a")]
    mega = _args(MEGATRON + ["--data-cache-path", str(tmp_path / "b")])
    assert (mega.train_iters, mega.lr_warmup_iters, mega.lr_decay_iters, mega.model_config.rope_theta) == \
        (3, 1.0, 3.0, 10000.0)
    assert mega.data_cache_dir == str(tmp_path / "b")
    ours = pretrain(_args(NATIVE + cache))["losses"]
    theirs = pretrain(mega)["losses"]
    assert sorted(theirs) == [1, 2, 3] and theirs == ours  # bit for bit


def test_sample_counts_may_be_fractional_iterations_for_the_schedule():
    a = _args(TINY + ["--train-samples", "41", "--lr-warmup-samples", "6", "--lr-decay-samples", "30"])
    assert (a.train_iters, a.lr_warmup_iters, a.lr_decay_iters) == (10, 1.5, 7.5)  # Megatron: train_samples // gbs
    from megallama.lr_scheduler import OptimizerParamScheduler

    class Opt:
        param_groups = [{}]
    s = OptimizerParamScheduler.from_args(Opt(), a)
    assert s.get_lr(0) == pytest.approx(3e-3 / 1.5) and s.get_lr(1) == pytest.approx(3e-3)


@pytest.mark.parametrize("extra,says", [
    (["--normalization", "LayerNorm"], "--normalization LayerNorm is not supported: Llama normalises with RMSNorm"),
    (["--position-embedding-type", "learned_absolute"], "--position-embedding-type learned_absolute is not"),
    (["--hidden-dropout", "0.1"], "--hidden-dropout 0.1 is not supported: Llama trains without dropout here; pass "
                                  "--hidden-dropout 0 or drop it"),
    (["--rotary-percent", "0.5"], "--rotary-percent 0.5 is not supported"),
    (["--rope-scaling-factor", "8"], "--rope-scaling-factor needs --use-rope-scaling"),
    (["--train-samples", "40", "--train-iters", "3"], "--train-samples and --train-iters both set it; pass one"),
    (["--lr-warmup-samples", "8", "--lr-warmup-iters", "3"], "--lr-warmup-samples and --lr-warmup-iters both"),
    (["--train-samples", "3"], "--train-samples 3 is less than one global batch (4)"),
    (["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by must be >= 1, got 0"),
    (["--lr-warmup-samples", "12", "--lr-warmup-fraction", "0.1"],
     "--lr-warmup-samples and --lr-warmup-fraction both set the warmup; pass one"),
    (["--lr-warmup-samples", "-4"], "--lr-warmup-samples must be >= 0, got -4"),
    (["--lr-decay-samples", "0"], "--lr-decay-samples must be positive, got 0"),
    (["--kv-channels", "128"], "--kv-channels 128 is not supported: megallama's head dimension is --hidden-size / "
                               "--num-attention-heads = 64/4 = 16; pass --kv-channels 16 or drop it"),
    (["--ckpt-format", "zarr"], "--ckpt-format zarr is not supported: megallama saves one sharded checkpoint "
                                "format that any layout loads (as Megatron's torch_dist); pass --ckpt-format "
                                "torch_dist or drop it"),
    (["--recompute-activations", "--recompute-granularity", "full"],
     "--recompute-activations (= --recompute-granularity selective) contradicts --recompute-granularity full"),
    (["--recompute-granularity", "full", "--recompute-activations"], "contradicts --recompute-granularity full"),
    (["--recompute-activations", "--activation-checkpointing"], "contradicts --activation-checkpointing; pass one"),
    (["--recompute-activations", "--recompute-method", "block"], "--recompute-method applies to "
                                                                 "--recompute-granularity full"),
])
def test_a_flag_asking_for_another_model_is_one_line(extra, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        _args(TINY + extra)


def test_warmup_samples_zero_is_megatrons_default_and_recompute_activations_is_selective():
    assert _args(TINY + ["--train-iters", "10", "--lr-warmup-samples", "0"]).lr_warmup_iters == 0  # not 10% default
    a = _args(TINY + ["--train-iters", "10", "--lr-warmup-samples", "0", "--lr-warmup-fraction", "0.2"])
    assert (a.lr_warmup_iters, a.lr_warmup_fraction) == (None, 0.2)  # 0 defers to the other warmup flag
    assert _args(TINY + ["--train-iters", "10", "--lr-warmup-samples", "0", "--lr-warmup-iters", "3"]).lr_warmup_iters \
        == 3
    a = _args(TINY + ["--recompute-activations"])
    assert a.recompute_granularity == "selective"
    assert _args(TINY + ["--recompute-activations", "--recompute-granularity", "selective"]).recompute_granularity \
        == "selective"
    assert _args(TINY + ["--kv-channels", "16"]).model_config.head_dim == 16


def test_rope_scaling_vocab_padding_and_load_balancing_none(tmp_path):
    a = _args(TINY + ["--use-rope-scaling", "--rope-scaling-factor", "16"])
    assert a.model_config.rope_scaling.factor == 16.0 and a.model_config.rope_scaling.high_freq_factor == 4.0
    assert _args(TINY).model_config.rope_scaling is None
    assert _args(["--model", "llama3_405b", "--use-rope-scaling"]).model_config.rope_scaling.factor == 8.0
    from megallama.training_setup import build_data
    a = _args(TINY + ["--make-vocab-size-divisible-by", "3000", "--data-cache-dir", str(tmp_path), "--train-iters",
                      "1"])
    build_data(a)
    assert a.model_config.vocab_size == 9000  # the bundled 8192 padded to a multiple of 3000
    a = _args(TINY + ["--make-vocab-size-divisible-by", "3000", "--data-cache-dir", str(tmp_path), "--train-iters",
                      "1"])
    a.model_config = a.model_config.replace(vocab_size=8192)  # a model whose own vocabulary is the tokenizer's
    build_data(a)
    assert a.model_config.vocab_size == 9000  # padded as Megatron pads every tokenizer's (was left at 8192)
    from megallama.autoconfig import vocab_config
    from megallama.config import get_model_config
    assert vocab_config(get_model_config("llama3_8b"), 8, 128256, 128).vocab_size == 129024  # Megatron's at tp 8
    assert vocab_config(get_model_config("llama3_8b"), 8, 128256).vocab_size == 128256
    a = _args(TINY + ["--strategy", "moe", "--moe-router-load-balancing-type", "none"])
    assert a.moe_aux_loss_coeff == 0.0


def test_checkpoint_flags(tmp_path, capsys):
    from megallama.checkpointing.optimizer_state import saved_keys
    from megallama.checkpointing.save_load import load_common
    base = TINY + ["--mock-data", "--vocab-size", "256", "--train-iters", "4", "--lr-warmup-iters", "1"]
    full = pretrain(_args(base))["losses"]
    ck = str(tmp_path / "ck")
    pretrain(_args(base + ["--save", ck, "--save-interval", "2", "--exit-interval", "2"]))
    capsys.readouterr()
    fresh = pretrain(_args(base + ["--load", ck, "--no-load-optim", "--no-load-rng"]))["losses"]
    out = capsys.readouterr().out
    assert "--no-load-optim: the optimizer starts afresh" in out and "--no-load-rng: RNG states start from" in out
    assert sorted(fresh) == [3, 4] and fresh[3] == full[3]  # same weights and data: the same loss
    assert fresh[4] != full[4]  # then a fresh Adam takes another step
    slim = str(tmp_path / "slim")
    pretrain(_args(base + ["--save", slim, "--save-interval", "2", "--exit-interval", "2", "--no-save-optim"]))
    assert saved_keys(load_common(slim + "/iter_0000002")["index"]) == []
    assert saved_keys(load_common(ck + "/iter_0000002")["index"])  # the default keeps them
    (tmp_path / "none").mkdir()  # there, but empty (a missing directory is refused anyway)
    with pytest.raises(ConfigError, match=re.escape(f"no checkpoint in {tmp_path / 'none'} "
                                                    "(--exit-on-missing-checkpoint)")):
        pretrain(_args(base + ["--load", str(tmp_path / "none"), "--exit-on-missing-checkpoint"]))


@pytest.mark.parametrize("extra,says", [
    (["--use-torch-fsdp2"], "pass --zero-stage 3 instead"),
    (["--tp-comm-overlap"], "--tp-comm-overlap is not supported: it needs Transformer Engine's userbuffers"),
    (["--deterministic-mode"], "--deterministic-mode is not supported"),
])
def test_other_implementations_are_one_line(extra, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        _args(TINY + extra)


def test_implementation_flags_are_accepted_and_fp16_scaling_flags_reach_the_scaler(monkeypatch):
    _args(TINY + ["--data-impl", "mmap", "--timing-log-level", "0", "--num-dataset-builder-threads", "4",
                  "--no-async-tensor-model-parallel-allreduce", "--no-mmap-bin-files", "--log-batch-size-to-tensorboard",
                  "--no-check-for-nan-in-loss-and-grad", "--use-cpu-initialization", "--no-persist-layer-norm",
                  "--no-initialization"])
    # Megatron's fusion opt-outs (its checkpoint converters pass --no-bias-gelu-fusion: a Llama has no GeLU)
    a = _args(TINY + ["--no-bias-gelu-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
                      "--no-rope-fusion", "--no-masked-softmax-fusion", "--no-persist-layer-norm",
                      "--no-gradient-accumulation-fusion"])
    assert a.no_gradient_accumulation_fusion  # the one with its own behaviour (mpu.grad_accum_fusion)
    import megallama.training as tr
    setup, seen = tr.setup_model_and_optimizer, []

    def spy(args, device):
        chunks, opt = setup(args, device)
        seen.append(opt.grad_scaler)
        return chunks, opt
    monkeypatch.setattr(tr, "setup_model_and_optimizer", spy)
    pretrain(_args(TINY + ["--fp16", "--mock-data", "--train-iters", "1", "--hysteresis", "3", "--min-loss-scale", "4",
                           "--loss-scale-window", "7", "--initial-loss-scale", "256"]))
    s = seen[0]
    assert (s.hysteresis, s.min_scale, s.growth_interval, float(s.scale)) == (3, 4.0, 7, 256.0)
    with pytest.raises(ConfigError, match="--hysteresis >= 1"):
        _args(TINY + ["--hysteresis", "0"])


def test_a_megatron_line_takes_megatrons_defaults_for_what_it_leaves_out(capsys):
    """No --model and Megatron's model flags: the left-out flags mean Megatron's defaults (they were the named
    tiny model's and megallama's Llama recipe: RoPE base 5e5, 4 query groups, FFN 1792, beta2 0.95 ...)."""
    line = ["--num-layers", "2", "--hidden-size", "192", "--num-attention-heads", "8", "--max-position-embeddings",
            "64", "--seq-length", "32", "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
            "--position-embedding-type", "rope", "--attention-dropout", "0", "--hidden-dropout", "0",
            "--data-path", "corpus", "--micro-batch-size", "1", "--train-iters", "4", "--lr", "1e-3"]
    a = _args(line)
    cfg = a.model_config
    assert (cfg.rope_theta, cfg.num_query_groups, cfg.ffn_hidden_size, cfg.tie_word_embeddings, cfg.norm_eps,
            cfg.init_method_std) == (10000.0, 8, 512, True, 1e-5, 0.02)
    assert (a.adam_beta2, a.weight_decay, a.lr_decay_style, a.min_lr, a.lr_warmup_iters, a.eval_interval,
            a.eval_iters, a.log_interval, a.split, a.initial_loss_scale, a.make_vocab_size_divisible_by) == \
        (0.999, 0.01, "linear", 0.0, 0, 1000, 100, 100, "969,30,1", 2.0 ** 32, 128)
    assert capsys.readouterr().err == ""  # a Llama said in full: nothing to warn about
    assert _args(line + ["--num-experts", "4"]).moe_aux_loss_coeff == 0.0  # Megatron's (megallama's: 0.01)
    a = _args(line + ["--group-query-attention", "--adam-beta2", "0.95", "--split", "98,2,0", "--lr-warmup-iters",
                      "2"])
    assert (a.model_config.num_query_groups, a.adam_beta2, a.split, a.lr_warmup_iters) == (1, 0.95, "98,2,0", 2)
    a = _args(["--model", "tiny_llama3_50m"] + line)  # a named model keeps megallama's defaults
    assert (a.model_config.rope_theta, a.model_config.num_query_groups, a.adam_beta2) == (500000.0, 4, 0.95)
    assert _args(line[:-6] + ["--swiglu"]).eval_interval == 1000  # no --data-path: the bundled corpus validates
    _args(line[:6] + ["--max-position-embeddings", "64", "--swiglu"])
    assert "leaves out --normalization RMSNorm (Megatron's default: LayerNorm), --disable-bias-linear" in \
        capsys.readouterr().err
    with pytest.raises(ConfigError, match=re.escape("does not give --num-attention-heads, --max-position-embeddings, "
                                                    "which Megatron requires; add them, or pick a shape with --model")):
        _args(line[:4] + ["--swiglu"])


def test_a_megatron_line_model_is_not_labelled_with_the_default_model(capsys):
    """No --model: the shape is the Megatron flags', so the model line names no megallama model (it said
    tiny_llama3_50m, the default --model, with the flags' shape); a named model keeps its name."""
    from megallama.training_setup import build_data
    line = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--ffn-hidden-size", "256",
            "--seq-length", "64", "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size",
            "4", "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear", "--position-embedding-type", "rope",
            "--attention-dropout", "0", "--hidden-dropout", "0", "--mock-data", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "1024", "--train-iters", "2", "--lr", "1e-3", "--device", "cpu"]
    capsys.readouterr()
    build_data(_args(line))
    out = capsys.readouterr().out
    assert re.search(r"^model: Llama architecture from the Megatron flags with vocabulary 1024 \(mock data\): "
                     r"[0-9.]+K parameters .*, 2 layers, hidden 128$", out, re.M), out
    assert "tiny_llama3_50m" not in out
    build_data(_args(["--model", "tiny_llama3_50m"] + line))
    assert "model: tiny_llama3_50m architecture with vocabulary 1024 (mock data)" in capsys.readouterr().out


def test_zero_eval_iters_and_exit_interval_are_off_and_warmup_zero_defers_to_the_fraction(tmp_path):
    """Megatron: --eval-iters 0 (or -1) evaluates nothing, the test split neither; --exit-interval 0 never exits,
    --eval-interval 0 never evaluates;
    --lr-warmup-iters 0 is its default, so a --lr-warmup-fraction sets the warmup."""
    from megallama.training_setup import build_test_data
    a = _args(TINY + ["--eval-interval", "2", "--eval-iters", "0", "--split", "90,5,5", "--exit-interval", "0"])
    assert (a.eval_interval, a.eval_iters, a.exit_interval) == (None, 0, None)
    assert _args(TINY + ["--eval-interval", "0", "--split", "90,5,5"]).eval_interval is None  # 0 is off
    assert build_test_data(a, None) is None  # no dataset built: 0 samples are not a test set
    s = _args(TINY + ["--train-iters", "20", "--lr-warmup-iters", "0", "--lr-warmup-fraction", "0.25"])
    assert (s.lr_warmup_iters, s.lr_warmup_fraction) == (None, 0.25)
    for flags in (["--apply-layernorm-1p", "--no-save-rng", "--use-legacy-models", "--optimizer", "adam",
                   "--rerun-mode", "disabled", "--tiktoken-pattern", "v2", "--timing-log-level", "2"],):
        _args(TINY + flags)  # restate megallama (see megatron_compat._RESTATED)


def test_the_log_lines_read_with_a_megatron_log_parser():
    from megallama.logging import format_log_line, format_validation_lines
    line = format_log_line(3, 10, {"consumed samples": 24, "elapsed time per iteration (ms)": 123.4,
                                   "throughput per GPU (TFLOP/s/GPU)": 12.34, "learning rate": 3e-4,
                                   "global batch size": 8, "lm loss": 5.5, "grad norm": 0.6001809, "num zeros": 7,
                                   "params norm": 12.3456, "skipped iterations": 1, "nan iterations": 0},
                           now=datetime(2024, 5, 1, 12, 0, 7))
    # Megatron's training_log: f" [{datetime.now().strftime('%Y-%m-%d %H:%M:%S')}]" + " iteration {:8d}/{:8d} |"
    assert line.startswith(" [2024-05-01 12:00:07] iteration        3/      10 | consumed samples:           24 | "
                           "elapsed time per "
                           "iteration (ms): 123.4 | throughput per GPU (TFLOP/s/GPU): 12.3 | learning rate: "
                           "3.000000E-04 |")
    # Megatron's fixed-point norms: an E-notation 6.001809E-01 read as 6.001809 by "[0-9.]+"
    assert re.search(r"grad norm: ([0-9.]+) \|", line).group(1) == "0.600"
    assert "params norm: 12.346 |" in line and "num zeros: 7.0 |" in line
    assert line.endswith("| number of skipped iterations:   1 | number of nan iterations:   0 |")
    report = format_validation_lines("iteration 4 on validation set", 5.25, 190.566)
    rule, text, rule2 = report.split("\n")
    assert text == " validation loss at iteration 4 on validation set | lm loss value: 5.250000E+00 | lm loss PPL: " \
                   "1.905660E+02 | " and rule == rule2 == "-" * (len(text) + 1)
    assert "lm loss: " not in report  # a training-loss parser does not pick up validation losses


def test_torch_distributed_launch_and_log_throughput_flags():
    # python -m torch.distributed.launch appends --local-rank=N (refused as unrecognized before)
    assert _args(TINY + ["--local-rank=1"]).local_rank == 1
    assert _args(TINY + ["--local_rank", "0", "--log-throughput"]).log_throughput


def test_newer_megatron_spellings_of_interleaving_and_bucket_size():
    """--num-virtual-stages-per-pipeline-rank V is --num-layers-per-virtual-pipeline-stage layers/(pp x V);
    --ddp-bucket-size is --bucket-size."""
    line = TINY + ["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--micro-batch-size", "1",
                   "--global-batch-size", "4"]
    args = parse_args(line + ["--num-virtual-stages-per-pipeline-rank", "2", "--ddp-bucket-size", "1000"],
                      world_size=2)
    assert (args.num_layers_per_virtual_pipeline_stage, args.pipeline_schedule, args.bucket_size) == \
        (2, "interleaved", 1000)
    assert parse_args(line, world_size=2).bucket_size == 40_000_000
    for extra, says in ((["--num-virtual-stages-per-pipeline-rank", "3"], "does not split 8 layers into 2 stages"),
                        (["--num-virtual-stages-per-pipeline-rank", "2", "--num-layers-per-virtual-pipeline-stage",
                          "2"], "pass one")):
        with pytest.raises(ConfigError, match=says):
            parse_args(line + extra, world_size=2)

