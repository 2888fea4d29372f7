"""Every face of the seed README's Python API, on CPU with tiny shapes (each face runs the real loop)."""
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import megallama
from megallama.config import get_model_config
from megallama.errors import ConfigError

from dist_utils import run_distributed

TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
            vocab_size=512)
SEQ = 16


def _loader(n=16, batch=2, seed=0):  # batch: the micro-batch per rank, as _cfg and the configs here fix it
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randint(0, 512, (n, SEQ + 1), generator=g)), batch_size=batch)


def _cfg(**kw):
    base = dict(batch_size=4, micro_batch_size=2, sequence_length=SEQ, learning_rate=3e-3, train_iters=2)
    base.update(kw)
    return megallama.TrainingConfig(**base)


def _finite(out, n):
    assert sorted(out["losses"]) == list(range(1, n + 1)) and all(math.isfinite(v) for v in out["losses"].values())


def test_quick_start_trains_on_user_dataloaders(capsys):
    orch = megallama.quick_start("tiny_llama3_50m", strategy="standard", num_gpus=1, model_overrides=TINY,
                                 training_config=_cfg())
    text = capsys.readouterr().out
    assert "layout: 1 GPU = tp 1 x pp 1 x dp 1" in text and "category" in text
    out = orch.launch_training(_loader(), _loader(8, seed=1))
    _finite(out, 2)
    assert "validation loss at iteration 2 |" in capsys.readouterr().out


def test_tiny_orchestrator_mock_data_and_bad_size():
    orch = megallama.create_tiny_llama3_orchestrator(size="150m", num_gpus=1, strategy="standard",
                                                     model_overrides=TINY, training_config=_cfg(),
                                                     extra_args=["--mock-data"])
    assert orch.model_config.hidden_size == 64 and orch.model_variant == "tiny_llama3_150m"
    _finite(orch.launch_training(), 2)
    with pytest.raises(ConfigError, match="size '7b'"):
        megallama.create_tiny_llama3_orchestrator(size="7b")


def test_big_orchestrators_configure_and_explain(capsys):
    o8 = megallama.create_llama3_8b_orchestrator(num_gpus=4, strategy="standard")
    assert o8.distributed_config.world_size == 4 and o8.plan is not None
    text = o8.print_configuration()
    assert "llama3_8b" in text and "fits" in text
    lora = megallama.TrainingStrategy(name="lora", parameters={"lora_rank": 64, "lora_alpha": 128,
                                                               "target_modules": ["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"]})
    o70 = megallama.create_llama3_70b_orchestrator(num_gpus=8, strategy=lora, instruct=True)
    assert o70.model_variant == "llama3_70b_instruct"
    argv = o70.argv()
    assert argv[argv.index("--strategy") + 1] == "lora" and argv[argv.index("--lora-rank") + 1] == "64"
    o405 = megallama.create_llama3_405b_orchestrator(num_gpus=64)
    assert o405.plan is None and "NO layout fits" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="needs 64 processes"):
        o405.launch_training()


def test_custom_configuration_with_factory_override():
    moe = megallama.TrainingStrategy(name="moe", parameters={"num_experts": 16, "experts_per_token": 2,
                                                             "moe_layers": [4, 8, 12, 16, 20, 24, 28]})
    orch = megallama.LlamaTrainingOrchestrator(model_variant="llama2_13b", training_strategy=moe, num_gpus=8,
                                               auto_configure=True)
    orch.distributed_config = megallama.ConfigurationFactory.create_hybrid_parallel_config(
        tensor_parallel_size=4, pipeline_parallel_size=2, data_parallel_size=1, use_zero=True, zero_stage=3)
    text = orch.print_configuration()
    assert "tp 4 x pp 2 x dp 1 (+sp), ZeRO-3" in text
    argv = orch.argv()
    assert argv[argv.index("--num-experts") + 1] == "16" and argv[argv.index("--moe-layers") + 1].startswith("4,8")
    f = megallama.ConfigurationFactory
    assert f.create_data_parallel_config(num_gpus=4).data_parallel_size == 4
    assert f.create_tensor_parallel_config(num_gpus=4).tensor_parallel_size == 4
    assert f.create_tensor_parallel_config(2).world_size == 2
    pp = f.create_pipeline_parallel_config(pipeline_stages=4, microbatch_size=2, schedule="1f1b")
    assert (pp.pipeline_parallel_size, pp.microbatch_size, pp.pipeline_schedule) == (4, 2, "1f1b")


def test_lora_strategy_trains():
    lora = megallama.TrainingStrategy(name="lora", parameters={"lora_rank": 4, "lora_alpha": 8,
                                                               "target_modules": ["q_proj", "v_proj"]})
    orch = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", lora, num_gpus=1, auto_configure=False,
                                               training_config=_cfg(), model_overrides=TINY)
    _finite(orch.launch_training(_loader()), 2)


def test_estimate_validate_and_scheduler_faces():
    reqs = megallama.estimate_requirements(model_variant="llama2_7b", batch_size=16, sequence_length=2048, num_gpus=4)
    assert reqs["memory_per_gpu_gb"] > 0 and isinstance(reqs["recommendations"], list)
    env = megallama.validate_environment()
    assert isinstance(env["errors"], list) and isinstance(env["warnings"], list) and "torch" in env["info"]
    from megallama.distributed.microbatch_scheduler import MicrobatchScheduler
    sched = MicrobatchScheduler(num_microbatches=8, microbatch_size=2, num_pipeline_stages=4, current_stage=1,
                                schedule_type="1f1b")
    order = sched.get_execution_schedule()
    assert len(order) == 16
    results = sched.execute_schedule(lambda mb: mb * 2, lambda out: None, lambda: None, list(range(8)))
    assert results is not None
    sched.print_metrics()


def test_performance_benchmark_on_cpu():
    bench = megallama.PerformanceBenchmark("tiny_llama3_50m", batch_sizes=[1, 2], sequence_length=SEQ, steps=2,
                                           model_overrides=TINY)
    rows = bench.run_comprehensive_benchmark()
    assert [r["micro_batch_size"] for r in rows] == [1, 2] and all(r.get("tokens_per_s", 0) > 0 for r in rows), rows
    assert "tok/s/CPU" in bench.print_summary()  # the column says what the rate is per
    assert all(r["peak_mem_gib"] is None for r in rows) and " n/a" in bench.print_summary()  # not measured on CPU


def test_manual_trainer_and_models_face():
    from megallama.models.llama import create_llama_7b_parallel
    full = create_llama_7b_parallel(tensor_parallel_size=2, use_flash_attention=True, use_checkpointing=True)
    assert sum(p.numel() for p in full.build("meta").parameters()) == 6_738_415_616
    model = create_llama_7b_parallel(tensor_parallel_size=1, use_checkpointing=True, **TINY)
    cfg = megallama.TrainingConfig(model_name="custom_llama_7b", batch_size=4, micro_batch_size=2,
                                   sequence_length=SEQ, learning_rate=1e-3, epochs=1)
    dc = megallama.ConfigurationFactory.create_tensor_parallel_config(1)
    trainer = megallama.create_distributed_trainer(model=model, config=cfg, distributed_config=dc,
                                                   trainer_type="adaptive")
    assert trainer.orchestrator.distributed_config.recompute == "full"
    _finite(trainer.fit(_loader(n=8)), 2)  # one epoch of 8 samples at 4 per step
    with pytest.raises(ConfigError, match="trainer_type 'magic'"):
        megallama.create_distributed_trainer(model, cfg, dc, trainer_type="magic")


def _tp2_worker(rank, world):
    model = megallama.create_llama_7b_parallel(tensor_parallel_size=2, **TINY)
    cfg = megallama.TrainingConfig(batch_size=4, micro_batch_size=2, sequence_length=SEQ, train_iters=2)
    trainer = megallama.create_distributed_trainer(model, cfg, megallama.ConfigurationFactory
                                                   .create_tensor_parallel_config(2), "standard")
    return trainer.fit(_loader())["losses"]


def test_tensor_parallel_trainer_on_two_ranks_matches_one_process():
    single = megallama.create_distributed_trainer(
        megallama.create_llama_7b_parallel(**TINY),
        megallama.TrainingConfig(batch_size=4, micro_batch_size=2, sequence_length=SEQ, train_iters=2),
        megallama.ConfigurationFactory.create_data_parallel_config(1)).fit(_loader())["losses"]
    res = run_distributed(_tp2_worker, 2)
    for rank in (0, 1):
        for it in (1, 2):
            assert abs(res[rank][it] - single[it]) / single[it] < 1e-5, (rank, it, res[rank], single)


def test_configuration_estimates_the_run_it_launches():
    """The printed estimate is that of the flags launch_training uses: the TrainingConfig's global batch and
    precision (not 1 x 1 microbatches in bf16), and an auto-configured plan's microbatches."""
    def orch(**kw):
        return megallama.LlamaTrainingOrchestrator(
            "tiny_llama3_50m", num_gpus=4, auto_configure=False, model_overrides=TINY,
            training_config=_cfg(batch_size=64, micro_batch_size=8, **kw),
            distributed_config=megallama.DistributedConfig(data_parallel_size=4))
    text = orch(mixed_precision="fp16").print_configuration()
    assert "micro-batch 8 x 2 microbatches (global 64)" in text and "fp16 (params)" in text
    for precision, weight_bytes in (("fp32", 4), ("bf16", 2)):
        est = orch(mixed_precision=precision).estimate_memory()
        assert est["layout"]["precision"] == precision
        assert est["breakdown_bytes"]["weights"] == weight_bytes * est["params_per_gpu"]
    o8 = megallama.create_llama3_8b_orchestrator(num_gpus=4, training_config=megallama.TrainingConfig(
        batch_size=64, sequence_length=4096, mixed_precision="bf16"))
    lay = o8.estimate_memory()["layout"]
    assert (lay["micro_batch_size"], lay["num_microbatches"], lay["global_batch_size"]) == \
        (o8.plan["micro_batch_size"], o8.plan["num_microbatches"], 64) and lay["num_microbatches"] > 1


def test_moe_plan_and_estimate_count_the_experts_per_expert_parallel_rank():
    moe = megallama.TrainingStrategy(name="moe", parameters={"num_experts": 4, "experts_per_token": 2,
                                                             "moe_layers": [1]})
    dense, mlp, h = get_model_config("tiny_llama3_50m", **TINY).num_params(), 3 * 64 * 176, 64
    for ep in (1, 2):  # layer 1's MLP becomes 4 / ep local experts and a router
        orch = megallama.LlamaTrainingOrchestrator(
            "tiny_llama3_50m", moe, num_gpus=4, auto_configure=False, model_overrides=TINY,
            training_config=_cfg(batch_size=16), distributed_config=megallama.DistributedConfig(
                data_parallel_size=4, expert_parallel_size=ep))
        est = orch.estimate_memory()
        assert est["layout"]["strategy"] == "moe" and est["layout"]["ep"] == ep
        assert est["params_per_gpu"] == dense + (4 // ep - 1) * mlp + h * 4
    auto = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", moe, num_gpus=1, model_overrides=TINY,
                                               training_config=_cfg())
    assert auto.plan["estimate"]["params_per_gpu"] == dense + 3 * mlp + h * 4


def test_lora_plan_explains_the_frozen_base_as_the_estimator_counts_it():
    lora = megallama.TrainingStrategy(name="lora", parameters={"lora_rank": 64, "target_modules": ["q_proj", "v_proj"]})
    o70 = megallama.create_llama3_70b_orchestrator(num_gpus=8, strategy=lora, training_config=megallama.TrainingConfig(
        sequence_length=4096, mixed_precision="bf16"), model_overrides={"vocab_size": 128256})  # not the bundled 8K
    from megallama.config import get_model_config
    from megallama.memory_states import model_split
    trainable, experts, frozen = model_split(get_model_config("llama3_70b"), "lora", 64, ("q_proj", "v_proj"))
    floor = (18 * (trainable + experts) + 2 * frozen) / 8 / 2**30  # bf16 Adam states of the adapters, base weights
    assert floor < 20 and f"at best {floor:.1f} GiB per GPU when fully sharded" in o70.plan["explanation"]
    assert "2 bytes (weights only) for 70.55B frozen" in o70.plan["explanation"]
    # ZeRO-3 shards the frozen base over dp as it does the adapters' states: dp 8 reaches that floor (ZeRO-1/2 keep
    # the base whole on every rank: > 130 GiB at dp 8)
    def states(stage):
        return megallama.estimate_requirements("llama3_70b", num_gpus=8, zero_stage=stage, strategy="lora",
                                               lora_rank=64, lora_targets=("q_proj", "v_proj"),
                                               recommend=False)["model_states_gb"]
    assert abs(states(3) / floor - 1) < 1e-3 and states(2) > 130


def test_pretrain_trains_on_given_datasets_for_the_epochs_asked():
    """``pretrain(args, datasets=(train, valid))``, the API's data hand-off: no --train-iters, so two epochs of 8
    samples at 4 a step are 4 iterations, with the given validation set evaluated."""
    from megallama.api_data import UserDataset
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    shape = [a for k, v in TINY.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    args = parse_args(["--model", "tiny_llama3_50m", *shape, "--seq-length", str(SEQ), "--micro-batch-size", "2",
                       "--global-batch-size", "4", "--epochs", "2", "--eval-interval", "4", "--eval-iters", "1",
                       "--device", "cpu", "--no-progress-bar"], world_size=1)
    data = UserDataset(torch.randint(0, 512, (8, SEQ + 1), generator=torch.Generator().manual_seed(0)), SEQ, 512)
    _finite(pretrain(args, datasets=(data, data)), 4)


def test_hf_ignore_index_masks_labels_and_unshifted_labels_are_refused():
    """A label of -100 (HF's ignore index) is out of the loss and out of its mean: the same sample as the
    explicit loss_mask (it counted those positions before, shrinking the loss by their share)."""
    from megallama.api_data import UserDataset
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (SEQ + 1,), generator=g)
    hf_labels = ids[1:].clone()
    hf_labels[:SEQ // 2] = -100
    a = UserDataset([{"input_ids": ids[:-1], "labels": hf_labels}], SEQ, 512)[0]
    mask = torch.ones(SEQ)
    mask[:SEQ // 2] = 0
    b = UserDataset([{"input_ids": ids[:-1], "labels": ids[1:], "loss_mask": mask}], SEQ, 512)[0]
    assert torch.equal(a["loss_mask"], b["loss_mask"]) and torch.equal(a["labels"][SEQ // 2:], b["labels"][SEQ // 2:])
    assert int(a["labels"].min()) >= 0
    with pytest.raises(ConfigError, match="labels equal to its input_ids"):  # HF's unshifted labels
        UserDataset([{"input_ids": ids[:-1], "labels": ids[:-1]}], SEQ, 512)[0]


def test_user_data_errors():
    orch = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", num_gpus=1, auto_configure=False,
                                               training_config=_cfg(), model_overrides=TINY)
    with pytest.raises(ConfigError, match="token id 9999"):
        orch.launch_training(DataLoader(TensorDataset(torch.full((4, SEQ + 1), 9999)), batch_size=2))
    with pytest.raises(ConfigError, match="has 5 tokens"):
        orch.launch_training([torch.arange(5)])
    with pytest.raises(ConfigError, match="model_overrides key 'depth'"):
        megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", model_overrides={"depth": 2})


def test_bad_extra_args_raise_one_config_error_not_argparse_exit(capsys):
    """A library call must not print argparse's usage and exit: a bad flag in extra_args is one ConfigError line,
    and print_configuration still prints the rest."""
    orch = megallama.create_tiny_llama3_orchestrator("50m")
    orch.extra_args = ["--no-such-flag"]
    with pytest.raises(ConfigError, match=r"unrecognized arguments: --no-such-flag"):
        orch.estimate_memory()
    text = orch.print_configuration()
    assert "memory estimate unavailable: bad flags in extra_args" in text and "usage:" not in capsys.readouterr().err


def test_user_data_in_hf_tokenizer_shapes():
    """What an HF tokenizer returns (return_tensors="pt": [1, s] input_ids and attention_mask) trains: the mask
    was 2-D, its last row zeroed, and every loss position masked (a loss of 0.0, nothing learned). A right-padded
    sample masks the label of its last real token (the pad), as HF's shifted labels do; a whole batched dict is
    a source of samples."""
    from megallama.api_data import UserDataset
    one = UserDataset([{"input_ids": torch.arange(1, 17).view(1, 16), "attention_mask": torch.ones(1, 16)}] * 2,
                      16, 100)
    assert len(one) == 2 and one[0]["loss_mask"].tolist() == [1.0] * 15 + [0.0]
    padded = UserDataset([{"input_ids": [[5, 6, 7, 8, 0, 0, 0, 0]], "attention_mask": [[1, 1, 1, 1, 0, 0, 0, 0]]}],
                         8, 100)[0]
    assert padded["labels"].tolist()[:3] == [6, 7, 8] and padded["loss_mask"].tolist() == [1, 1, 1] + [0] * 5
    longer = UserDataset([{"input_ids": torch.arange(9).view(1, 9), "attention_mask": torch.ones(1, 9)}], 8, 100)[0]
    assert longer["loss_mask"].tolist() == [1.0] * 8
    batch = UserDataset({"input_ids": torch.randint(0, 100, (4, 33))}, 32, 100)
    assert len(batch) == 4 and batch[3]["input_ids"].shape == (32,)


def test_a_model_config_trains_that_model():
    """create_distributed_trainer(ModelConfig): the trainer built the variant's shape instead (10 layers, 128K
    vocabulary for an unnamed 1-layer config); what flags cannot express is one error line."""
    import megallama
    from megallama.config import ModelConfig
    from megallama.errors import ConfigError
    cfg = ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, num_query_groups=1,
                      vocab_size=256, rope_theta=10000.0)
    t = megallama.create_distributed_trainer(cfg, megallama.TrainingConfig(train_iters=1))
    got = t.orchestrator.model_config
    assert (got.num_layers, got.hidden_size, got.vocab_size, got.rope_theta) == (1, 32, 256, 10000.0)
    args = t.orchestrator.build_args(world_size=1)
    assert (args.model_config.num_layers, args.model_config.vocab_size) == (1, 256)
    with pytest.raises(ConfigError, match="num_experts differ"):
        megallama.create_distributed_trainer(ModelConfig(num_experts=4), megallama.TrainingConfig(train_iters=1))


def test_factories_refuse_gpu_counts_they_would_partly_drop():
    """create_tensor_parallel_config(num_gpus=8, tensor_parallel_size=3) made a 6-GPU layout and
    create_llama3_405b_orchestrator(num_gpus=12) planned for 8 GPUs, both without a word."""
    with pytest.raises(ConfigError, match="num_gpus 8 is not a multiple of tensor_parallel_size 3"):
        megallama.ConfigurationFactory.create_tensor_parallel_config(num_gpus=8, tensor_parallel_size=3)
    assert megallama.ConfigurationFactory.create_tensor_parallel_config(8, tensor_parallel_size=2).world_size == 8
    with pytest.raises(ConfigError, match="num_gpus 12 is not whole nodes of 8 GPUs"):
        megallama.create_llama3_405b_orchestrator(num_gpus=12)


def test_call_length_replaces_the_configs_epochs_and_both_in_a_config_are_refused():
    """launch_training(train_iters=N) is the call's run length: it replaces TrainingConfig.epochs (the parser refuses
    --train-iters with --epochs); a config that sets both is one error."""
    orch = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", "standard", num_gpus=1, model_overrides=TINY,
                                               training_config=_cfg(train_iters=None, epochs=1))
    _finite(orch.launch_training(_loader(n=8), train_iters=3), 3)
    both = megallama.LlamaTrainingOrchestrator("tiny_llama3_50m", "standard", num_gpus=1, model_overrides=TINY,
                                               training_config=_cfg(epochs=1))
    with pytest.raises(ConfigError, match="--train-iters 2 and --epochs 1 both set the run's length"):
        both.launch_training(_loader(n=8))


def test_auto_configured_moe_plan_keeps_its_expert_parallel_size(capsys):
    """The orchestrator runs the plan --auto-configure chose, ep included (it built ep 1 whatever the plan said)."""
    moe = megallama.TrainingStrategy(name="moe", parameters={"num_experts": 80, "experts_per_token": 2})
    orch = megallama.LlamaTrainingOrchestrator("llama3_8b", moe, num_gpus=8, gpu_memory_gb=80, sequence_length=4096,
                                               model_overrides={"num_layers": 2})
    assert orch.plan["ep"] > 1 and orch.distributed_config.expert_parallel_size == orch.plan["ep"]
    argv = orch.argv()
    assert argv[argv.index("--expert-model-parallel-size") + 1] == str(orch.plan["ep"])


def test_quick_start_plans_the_model_and_device_its_run_trains(capsys):
    """The plan priced Llama 3's 128,256-token vocabulary (36.0M params) while the run, on the bundled corpus,
    trains the bundled 8,192-token tokenizer's 5.24M; and it planned '1 GPUs of 80 GiB' on a CPU box without
    saying that GPU was assumed. Now plan, table and micro-batch are those of the built model, the device said."""
    from megallama.model import build_model
    from megallama.training_setup import build_data
    orch = megallama.quick_start("tiny_llama3_50m", num_gpus=1, model_overrides={"num_layers": 2},
                                 sequence_length=64)
    text = capsys.readouterr().out
    args = orch.build_args(1)
    build_data(args)  # what launch_training's run does to the model: its embedding follows the tokenizer
    built = sum(p.numel() for p in build_model(args.model_config, device="meta").parameters())
    vocab = args.model_config.vocab_size
    assert vocab == 8192 and orch.plan["estimate"]["num_params"] == built
    est = orch.estimate_memory()
    assert est["num_params"] == built and est["layout"]["micro_batch_size"] == orch.plan["micro_batch_size"]
    assert f"vocab {vocab})" in text and f"vocabulary: {vocab} (the tokenizer's {vocab}" in text
    assert f"{built / 1e6:.1f}M on the busiest GPU" in text
    where = "the visible GPU" if torch.cuda.is_available() else "no GPU visible: assumed, this process would train on CPU"
    assert f"GPU memory: {orch.gpu_memory_gb:.0f} GiB ({where}" in text
    # a GPU named by the caller is priced and said so; the micro-batch follows its estimate
    small = megallama.quick_start("tiny_llama3_50m", num_gpus=1, model_overrides={"num_layers": 2},
                                  sequence_length=64, gpu_memory_gb=1)
    assert "GPU memory: 1 GiB (gpu_memory_gb" in capsys.readouterr().out
    assert small.plan["micro_batch_size"] < orch.plan["micro_batch_size"]
    assert small.plan["estimate"]["memory_per_gpu_gb"] <= 0.95 and small.estimate_memory()["gpu_memory_gb"] == 1


def test_user_dataloaders_keep_the_models_vocabulary_and_say_the_plan_priced_the_tokenizers(capsys):
    """Dataloaders bring no tokenizer: the run keeps the variant's 128,256 tokens while the plan, made for the flags'
    data, priced the bundled tokenizer's 8,192; launch_training says so rather than leaving the plan's figure."""
    shape = {k: v for k, v in TINY.items() if k != "vocab_size"}
    orch = megallama.quick_start("tiny_llama3_50m", num_gpus=1, model_overrides=shape, training_config=_cfg())
    assert orch.plan["estimate"]["num_params"] == get_model_config("tiny_llama3_50m", **shape, vocab_size=8192).num_params()
    capsys.readouterr()
    _finite(orch.launch_training(_loader(n=8), train_iters=1), 1)
    assert "the plan priced the tokenizer's vocabulary 8192; your dataloaders train the model's 128256" in \
        capsys.readouterr().out
