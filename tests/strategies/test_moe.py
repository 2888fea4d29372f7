"""MoE: routing, aux/z losses on hand-made routings, grouped expert compute, capacity dropping, and expert
parallelism (with dp, tp and sequence parallelism) equal to one process in loss, weights and gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from dist_utils import rel_err, run_distributed
from megallama.errors import ConfigError
from megallama.model import build_model
from megallama.model.moe import (MoEConfig, MoELayer, load_balancing_loss, moe_layer_ids, set_aux_loss_scale,
                                 topk_routing, z_loss)
from megallama.model.moe_dispatch import grouped_matmul, sort_by_expert
from megallama.model.moe_stats import get_moe_stats
from megallama.mpu import parallel_state as ps
from megallama.strategies import TrainingStrategy, apply_strategy
from strat_helpers import TINY, batch, full_params_and_grads

MOE = {"num_experts": 4, "experts_per_token": 2, "moe_aux_loss_coeff": 0.05, "moe_z_loss_coeff": 1e-2}


def _moe_model(sequence_parallel=False, params=MOE, seed=7):
    m = build_model(TINY, seed=seed, sequence_parallel=sequence_parallel)
    apply_strategy([m], TrainingStrategy("moe", dict(params)), seed=seed)
    return m


# ------------------------------------------------------------------ losses on hand-made routings
def test_aux_loss_equals_formula_on_hand_made_routing():
    # 4 tokens, 2 experts, top-1. Tokens 0-2 choose expert 0, token 3 expert 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    counts = torch.tensor([3.0, 1.0])
    # f = (3/4, 1/4); P = (2.6/4, 1.4/4); loss = coeff * E * sum f*P
    expect = 0.1 * 2 * (0.75 * 0.65 + 0.25 * 0.35)
    assert math.isclose(float(load_balancing_loss(probs.sum(0), counts, 4, 1, 0.1)), expect, rel_tol=1e-6)
    uniform = torch.full((8, 4), 0.25)
    assert math.isclose(float(load_balancing_loss(uniform.sum(0), torch.full((4,), 4.0), 8, 2, 0.01)), 0.01,
                        rel_tol=1e-6)
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    expect_z = 0.5 * ((math.log(4.0)) ** 2 + (1.0 + math.log(2.0)) ** 2) / 2
    assert math.isclose(float(z_loss(logits, 0.5)), expect_z, rel_tol=1e-6)


def test_layer_aux_gradient_is_the_formula():
    """The loss the layer attaches is exactly coeff*E*sum f*P + z: its router gradient equals autograd of the formula."""
    torch.manual_seed(0)
    set_aux_loss_scale(1.0)
    get_moe_stats().reset()
    cfg = MoEConfig(num_experts=4, topk=2, aux_loss_coeff=0.3, z_loss_coeff=0.05)
    layer = MoELayer(TINY, cfg, 0)
    layer.init_weights("l", 1)
    x = torch.randn(2, 5, TINY.hidden_size)
    y = layer(x)
    (gw,) = torch.autograd.grad(y, layer.router.weight, torch.zeros_like(y))  # only the attached aux losses
    logits = F.linear(x.reshape(-1, TINY.hidden_size), layer.router.weight)
    probs, _, top_i = topk_routing(logits, 2)
    counts = torch.bincount(top_i.reshape(-1), minlength=4).float()
    ref = load_balancing_loss(probs.sum(0), counts, 10, 2, 0.3) + z_loss(logits, 0.05)
    (gref,) = torch.autograd.grad(ref, layer.router.weight)
    assert rel_err(gw, gref) < 1e-6
    rep = get_moe_stats().report()
    assert rep["tokens_per_expert"][0] == counts.long().tolist()
    assert math.isclose(rep["aux_loss"], float(load_balancing_loss(probs.sum(0), counts, 10, 2, 0.3).detach()), rel_tol=1e-5)


# ------------------------------------------------------------------ grouped compute and dispatch
@pytest.mark.parametrize("grouped", [True, False])
def test_grouped_matmul_matches_per_group_loop(grouped):
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(int(counts.sum()), 8, requires_grad=True)
    w = torch.randn(4, 12, 8, requires_grad=True)
    grouped = grouped and hasattr(torch, "_grouped_mm")
    y = grouped_matmul(x, w, counts, use_grouped_mm=grouped)
    ref = torch.cat([xs @ w[e].T for e, xs in enumerate(x.split(counts.tolist()))])
    assert rel_err(y, ref) < 1e-6
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        assert rel_err(a, b) < 1e-6
    grouped_matmul(x, w, counts, use_grouped_mm=grouped).sum().backward()  # an expanded grad is accepted


def test_sort_by_expert_and_capacity_keep_first_tokens():
    e = torch.tensor([2, 0, 2, 2, 1, 2])
    order, counts = sort_by_expert(e, 3)
    assert order.tolist() == [1, 4, 0, 2, 3, 5] and counts.tolist() == [1, 1, 4]
    order, counts = sort_by_expert(e, 3, capacity=2)
    assert order.tolist() == [1, 4, 0, 2] and counts.tolist() == [1, 1, 2]


def _naive_moe(layer, x, capacity=None):
    """Token-by-token reference: route, run each chosen expert's SwiGLU, weight by the probability; an expert
    over capacity drops the latest tokens in Megatron's [s, b] order (--moe-token-drop-policy position)."""
    B, S, h = x.shape
    xs = x.reshape(-1, h)
    logits = F.linear(xs, layer.router.weight)
    _, top_p, top_i = topk_routing(logits, layer.topk)
    seen = [0] * layer.num_experts
    out = torch.zeros_like(xs)
    ex = layer.experts
    for t in [b * S + s for s in range(S) for b in range(B)]:
        for j in range(layer.topk):
            e = int(top_i[t, j])
            seen[e] += 1
            if capacity is not None and seen[e] > capacity:
                continue
            a = F.silu(ex.gate_proj[e] @ xs[t]) * (ex.up_proj[e] @ xs[t])
            out[t] += top_p[t, j] * (ex.down_proj[e] @ a)
    return out.view_as(x)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_moe_layer_equals_token_by_token_reference(capacity_factor):
    torch.manual_seed(1)
    cfg = MoEConfig(num_experts=4, topk=2, capacity_factor=capacity_factor, drop_policy="position")
    layer = MoELayer(TINY, cfg, 0)
    layer.init_weights("l", 3)
    x = torch.randn(2, 6, TINY.hidden_size)
    with torch.no_grad():
        y = layer(x)
        cap = layer.capacity(12)
        ref = _naive_moe(layer, x, cap)
    assert rel_err(y, ref) < 1e-5
    if capacity_factor is not None:
        assert cap == 3  # ceil(0.5 * 12 * 2 / 4): some assignments are dropped
        assert rel_err(y, _naive_moe(layer, x, None)) > 1e-3


def test_config_errors_and_layer_selection():
    assert moe_layer_ids(6, None, 2) == [0, 2, 4]
    assert moe_layer_ids(6, [4, 1], 1) == [1, 4]
    m = _moe_model(params=dict(MOE, moe_layers=[1]))
    assert type(m.model.layers["0"].mlp).__name__ == "LlamaMLP" and isinstance(m.model.layers["1"].mlp, MoELayer)
    with pytest.raises(ConfigError, match="moe-layers 7"):
        TrainingStrategy("moe", {"num_experts": 4, "moe_layers": [7]}).moe_config(2)
    with pytest.raises(ConfigError, match="moe-router-topk 5"):
        TrainingStrategy("moe", {"num_experts": 4, "experts_per_token": 5}).moe_config(2)
    with pytest.raises(ConfigError, match="unknown strategy parameter"):
        TrainingStrategy("moe", {"num_expert": 4})


def test_upcycled_moe_equals_dense_model():
    """Every expert a copy of the dense MLP and normalised top-k weights: the MoE model computes the dense one."""
    dense = build_model(TINY, seed=5)
    moe = build_model(TINY, seed=5)
    apply_strategy([moe], TrainingStrategy("moe", {"num_experts": 4, "experts_per_token": 2, "upcycle": True}), seed=5)
    ids, labels = batch(2)
    with torch.no_grad():
        assert rel_err(moe(ids, labels=labels), dense(ids, labels=labels)) < 1e-5


def test_upcycling_into_experts_of_another_ffn_size_is_one_error_line():
    """--moe-ffn-hidden-size other than the dense FFN size with --moe-upcycle was a broadcast RuntimeError."""
    moe = build_model(TINY, seed=5)
    params = {"num_experts": 4, "moe_ffn_hidden_size": TINY.ffn_hidden_size // 2, "upcycle": True}
    with pytest.raises(ConfigError, match="--moe-ffn-hidden-size is"):
        apply_strategy([moe], TrainingStrategy("moe", params), seed=5)


def test_moe_flags_without_experts_and_zero_experts_are_refused():
    """--num-experts 0 with --strategy moe became 8 experts, and MoE flags on a dense model were ignored, silently
    (--expert-model-parallel-size alone was refused)."""
    from megallama.arguments import parse_args
    line = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--micro-batch-size", "1"]
    for extra, says in ((["--strategy", "moe", "--num-experts", "0"], "--num-experts must be >= 1, got 0"),
                        (["--moe-router-topk", "1"], "--moe-router-topk configures MoE experts, but the model has"),
                        (["--moe-expert-capacity-factor", "1.0", "--moe-upcycle"], "configure MoE experts")):
        with pytest.raises(ConfigError, match=says):
            parse_args(line + extra, world_size=1)
    assert parse_args(line + ["--num-experts", "4", "--moe-router-topk", "1"], world_size=1).moe_router_topk == 1
    assert parse_args(line + ["--strategy", "moe"], world_size=1).num_experts == 8


# ------------------------------------------------------------------ expert parallelism == one process
LAYOUTS = [  # (tp, ep, sequence_parallel) on 4 ranks: dp = 4 / tp, one micro-batch of 4 / dp samples per rank
    (1, 2, False),  # dp 4, ep 2, expert-data-parallel 2
    (1, 4, False),  # every rank one expert
    (2, 2, False),  # tp 2 x ep 2
    (2, 2, True),   # ... with sequence parallelism
]
GLOBAL_BATCH = 4


def _ep_worker(rank, world, layouts):
    from megallama.mpu.sequence_parallel import allreduce_sequence_parallel_gradients
    ids, labels = batch(GLOBAL_BATCH)
    set_aux_loss_scale(1.0)  # one micro-batch per rank
    out = []
    for tp, ep, sp in layouts:
        ps.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep)
        m = _moe_model(sequence_parallel=sp)
        dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        n = GLOBAL_BATCH // dp
        loss = m(ids[r * n:(r + 1) * n], labels=labels[r * n:(r + 1) * n]).mean()
        loss.backward()
        if sp:
            allreduce_sequence_parallel_gradients(m)
        losses = [torch.zeros(()) for _ in range(world)]
        torch.distributed.all_gather(losses, loss.detach())
        state = full_params_and_grads(m)
        out.append((float(sum(losses) / world), state if rank == 0 else None))
    return out


def _reference(micro_batch):
    """One process, the same micro-batches as the dp ranks (aux loss per micro-batch): mean loss, params, grads."""
    ids, labels = batch(GLOBAL_BATCH)
    ref = _moe_model()
    num = GLOBAL_BATCH // micro_batch
    set_aux_loss_scale(1.0 / num)
    loss = sum(ref(ids[i * micro_batch:(i + 1) * micro_batch], labels=labels[i * micro_batch:(i + 1) * micro_batch])
               .mean() for i in range(num)) / num
    loss.backward()
    set_aux_loss_scale(1.0)
    return float(loss), full_params_and_grads(ref)


def test_expert_parallel_equals_single_process():
    refs = {dp: _reference(GLOBAL_BATCH // dp) for dp in (2, 4)}
    results = run_distributed(_ep_worker, 4, LAYOUTS)
    for (tp, ep, sp), (dist_loss, state) in zip(LAYOUTS, results[0]):
        loss, ref_state = refs[4 // tp]
        assert abs(dist_loss - loss) / loss < 1e-5, (tp, ep, sp, dist_loss, loss)
        assert set(state) == set(ref_state)
        for k, v in ref_state.items():
            err = rel_err(torch.from_numpy(state[k]), torch.from_numpy(v))
            assert err < 1e-5, (tp, ep, sp, k, err)
    assert any("experts.gate_proj.grad" in k for k in ref_state) and any("router.weight.grad" in k for k in ref_state)


# ------------------------------------------------------------------ the training loop with --strategy moe
def test_tiny_moe_trains_on_bundled_corpus_and_logs_histogram(tmp_path, capsys, one_thread):
    from megallama.arguments import parse_args
    from megallama.training import pretrain
    argv = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32", "--micro-batch-size", "4",
            "--global-batch-size", "4", "--train-iters", "20", "--lr", "1e-2", "--lr-warmup-iters", "2",
            "--no-progress-bar", "--device", "cpu", "--no-fused-kernels", "--log-interval", "10",
            "--data-cache-dir", str(tmp_path / "cache"), "--strategy", "moe", "--num-experts", "4",
            "--moe-router-topk", "2", "--moe-z-loss-coeff", "1e-3", "--moe-layers", "1"]
    out = pretrain(parse_args(argv, world_size=1))
    losses = [out["losses"][i] for i in sorted(out["losses"])]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    log = capsys.readouterr().out
    lines = [l for l in log.splitlines() if "] iteration " in l and "tokens/expert" in l]
    assert len(lines) == 2 and "L1:[" in lines[-1] and "L0:[" not in lines[-1] and "moe aux loss" in lines[-1]
    hist = [int(x) for x in lines[-1].split("L1:[")[1].split("]")[0].split(",")]
    assert sum(hist) == 10 * 4 * 32 * 2  # 10 iterations x 4 samples x 32 tokens x top-2


def test_strategy_flags_one_line_errors():
    from megallama.arguments import parse_args
    base = ["--model", "tiny_llama3_50m", "--num-layers", "2"]
    with pytest.raises(ConfigError, match="--lora-rank 8 needs --strategy lora"):
        parse_args(base + ["--lora-rank", "8"], world_size=1)
    with pytest.raises(ConfigError, match="needs a MoE model"):
        parse_args(base + ["--expert-model-parallel-size", "2"], world_size=2)
    with pytest.raises(ConfigError, match="--moe-layers 5 is out of range"):
        parse_args(base + ["--strategy", "moe", "--moe-layers", "0,5"], world_size=1)
    with pytest.raises(ConfigError, match="--lora-target-modules lm_head"):
        parse_args(base + ["--strategy", "lora", "--lora-target-modules", "q_proj,lm_head"], world_size=1)
    a = parse_args(base + ["--strategy", "hybrid", "--num-experts", "4", "--lora-rank", "4"], world_size=1)
    assert a.model_config.num_experts == 4 and a.model_config.moe_layers == [0, 1] and not a.chat_template
    inst = parse_args(["--model", "llama3_8b_instruct", "--seq-length", "64"], world_size=1)  # chat template on
    assert inst.chat_template and inst.model_config.num_params() == parse_args(
        ["--model", "llama3_8b", "--seq-length", "64"], world_size=1).model_config.num_params()


# ------------------------------------------------------------------ statistics over pipeline stages
def _loop_moe_reports(rank, world, argv):
    """``pretrain``'s MoE reports (one per log line) on this rank."""
    from megallama.arguments import parse_args
    from megallama.model.moe_stats import MoEStats
    from megallama.training import pretrain
    reports, report = [], MoEStats.report
    MoEStats.report = lambda self, reset=True: reports.append(report(self, reset)) or reports[-1]
    pretrain(parse_args(list(argv), world_size=world))
    return reports


@pytest.mark.parametrize("moe_layers", ["0,3", "3"])
def test_pipeline_stages_report_every_moe_layer(moe_layers, one_thread):
    """pp = 2: the report (log line, TensorBoard) holds the sparse layers of both stages, also when the first stage
    has none, with the single-process aux/z losses and tokens per expert."""
    argv = ["--model", "tiny_llama3_50m", "--num-layers", "4", "--hidden-size", "32", "--ffn-hidden-size", "64",
            "--num-attention-heads", "4", "--num-query-groups", "2", "--vocab-size", "256", "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--log-interval", "2",
            "--mock-data", "--no-progress-bar", "--device", "cpu", "--strategy", "moe", "--num-experts", "4",
            "--moe-z-loss-coeff", "1e-3", "--moe-layers", moe_layers]
    ref = run_distributed(_loop_moe_reports, 1, argv)[0]
    out = run_distributed(_loop_moe_reports, 2, argv + ["--pipeline-model-parallel-size", "2"])
    layers = [int(l) for l in moe_layers.split(",")]
    assert len(ref) == 2 and all(sorted(r["tokens_per_expert"]) == layers for r in ref)
    for rank, reports in out.items():
        assert len(reports) == len(ref)
        for got, want in zip(reports, ref):
            assert got["tokens_per_expert"] == want["tokens_per_expert"], (rank, got, want)
            for key in ("aux_loss", "z_loss", "max_load"):
                assert math.isclose(got[key], want[key], rel_tol=1e-5), (rank, key, got[key], want[key])


def test_megatron_moe_layer_freq_pattern():
    """Megatron's DeepSeek/Qwen scripts give --moe-layer-freq as a 0/1 pattern, "([0]*1+[1]*3)": layer 0 dense, the
    rest MoE (it was 'invalid int value'); an int keeps its every-N-th meaning, a pattern of the wrong length is one
    error line."""
    from megallama.arguments import parse_args
    line = ["--model", "tiny_llama3_50m", "--num-layers", "4", "--micro-batch-size", "1", "--num-experts", "4"]
    for freq, ids in (("([0]*1+[1]*3)", [1, 2, 3]), ("[1,0,1,0]", [0, 2]), ("2", [0, 2]), ("[0, 1]*2", [1, 3])):
        args = parse_args(line + ["--moe-layer-freq", freq], world_size=1)
        assert args.model_config.moe_layers == ids, (freq, args.model_config.moe_layers)
    with pytest.raises(ConfigError, match="pattern has 3 entries for 4 layers"):
        parse_args(line + ["--moe-layer-freq", "([0]*1+[1]*2)"], world_size=1)
    with pytest.raises(SystemExit):
        parse_args(line + ["--moe-layer-freq", "__import__('os')"], world_size=1)
