"""A Megatron-LM Llama launch line runs unchanged: its restating flags are accepted, its aliases mean what they
mean there (same losses, bit for bit, as the megallama spelling), a flag asking for another model is one error
line, and the checkpoint flags (--no-load-optim, --no-load-rng, --no-save-optim, --exit-on-missing-checkpoint)
do what Megatron's do."""
import re

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
            "--distributed-timeout-minutes", "10", "--tokenizer-type", "bundled",
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
    (["--ckpt-format", "torch"], "--ckpt-format torch is not supported: megallama saves one sharded checkpoint "
                                 "format that any layout loads (as Megatron's torch_dist); pass --ckpt-format "
                                 "torch_dist or drop it"),
    (["--ckpt-format", "zarr"], "--ckpt-format zarr is not supported"),
    (["--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 is not supported: megallama reduces gradients in fp32"),
    (["--decoupled-lr", "5e-4"], "--decoupled-lr is not supported: megallama trains every parameter, embedding and "
                                 "output layer too, at one --lr; drop it"),
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
