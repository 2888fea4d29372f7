"""Megatron's aux-loss-free balancing (--moe-router-enable-expert-bias, --moe-router-bias-update-rate) and
device-limited routing (--moe-router-num-groups, --moe-router-group-topk): the routing against plain per-token
references; the per-step bias update against the step's global counts (summed over tp under sequence
parallelism); dp 2 (one and two micro-batches per rank) against one process through the real training loop
(expert_bias exactly, losses and grad norms within 1e-5); the bias across a checkpoint resume; one-line errors for
bad flag combinations."""
import pytest
import torch

from dist_utils import run_distributed
from megallama.arguments import parse_args
from megallama.errors import ConfigError
from megallama.model.moe import MoEConfig, MoELayer
from megallama.model.moe_expert_bias import update_expert_bias
from megallama.model.moe_router import topk_routing
from strategies.strat_helpers import TINY


# ---------------------------------------------------------------- routing math against per-token references
def _ref_sigmoid_bias(logits, k, bias):
    """Per token: the k largest sigmoid + bias choose; the weights are the unbiased sigmoids, renormalised."""
    ids, ws = [], []
    for row in logits.double():
        sig = torch.sigmoid(row)
        order = sorted(range(len(row)), key=lambda e: -(float(sig[e]) + float(bias[e])))[:k]
        w = torch.stack([sig[e] for e in order])
        ids.append(order)
        ws.append(w / w.sum())
    return torch.tensor(ids), torch.stack(ws)


def test_expert_bias_chooses_the_experts_but_not_the_gates():
    torch.manual_seed(0)
    logits = torch.randn(64, 8, dtype=torch.float64)
    bias = torch.tensor([0.3, -0.2, 0.0, 0.05, -0.4, 0.1, 0.25, -0.05], dtype=torch.float32)
    _, top_p, top_i = topk_routing(logits, 2, score_function="sigmoid", expert_bias=bias)
    ref_i, ref_p = _ref_sigmoid_bias(logits, 2, bias)
    assert torch.equal(top_i, ref_i)
    torch.testing.assert_close(top_p, ref_p, rtol=1e-12, atol=1e-12)
    _, _, plain_i = topk_routing(logits, 2, score_function="sigmoid")
    assert not torch.equal(plain_i, top_i)  # the bias moved choices (else the test proves nothing)
    # the gate gradient reaches the logits of the chosen experts only, unscaled by the bias
    x = logits.clone().requires_grad_()
    topk_routing(x, 2, score_function="sigmoid", expert_bias=bias)[1][:, 0].sum().backward()
    assert (x.grad.ne(0).sum(1) <= 2).all()


def _ref_group_limited(sel, k, G, K):
    """Megatron's group_limited_topk per token: a group scores the sum of its top k // K selection scores; the k
    best experts among the K best groups."""
    out = []
    E = sel.shape[1]
    n = E // G
    for row in sel.tolist():
        groups = [sum(sorted(row[g * n:(g + 1) * n], reverse=True)[:k // K]) for g in range(G)]
        keep = sorted(range(G), key=lambda g: -groups[g])[:K]
        allowed = [e for g in keep for e in range(g * n, (g + 1) * n)]
        out.append(sorted(allowed, key=lambda e: -row[e])[:k])
    return torch.tensor(out)


@pytest.mark.parametrize("score,pre_softmax", [("sigmoid", False), ("softmax", False), ("softmax", True)])
def test_group_limited_routing_picks_among_the_best_groups(score, pre_softmax):
    torch.manual_seed(1)
    E, k, G, K = 16, 4, 4, 2
    logits = torch.randn(128, E, dtype=torch.float64)
    scores, top_p, top_i = topk_routing(logits, k, not pre_softmax, score, num_groups=G, group_topk=K)
    # the selection scores: the logits (softmax over the chosen k), the softmax (pre-softmax), the sigmoids
    sel = torch.sigmoid(logits) if score == "sigmoid" else torch.softmax(logits, -1) if pre_softmax else logits
    want = _ref_group_limited(sel, k, G, K)
    assert torch.equal(top_i, want)
    assert all(len(set((row // (E // G)).tolist())) <= K for row in top_i)  # experts of at most K groups
    _, _, free_i = topk_routing(logits, k, not pre_softmax, score)
    assert not torch.equal(free_i, top_i)  # the group limit changed some tokens' experts
    if score == "sigmoid":  # with a bias too: the groups are scored on the biased scores
        bias = torch.linspace(-0.3, 0.3, E)
        _, _, bi = topk_routing(logits, k, score_function="sigmoid", expert_bias=bias, num_groups=G, group_topk=K)
        assert torch.equal(bi, _ref_group_limited(torch.sigmoid(logits) + bias.double(), k, G, K))


# ---------------------------------------------------------------- the update against the step's global counts
def test_bias_update_is_rate_times_sign_of_mean_minus_load():
    torch.manual_seed(2)
    cfg = MoEConfig(num_experts=8, topk=2, score_function="sigmoid", enable_expert_bias=True, bias_update_rate=0.05,
                    aux_loss_coeff=0.0)
    layer = MoELayer(TINY, cfg, 0)
    layer.init_weights("model.layers.0.mlp", 3)
    router = layer.router
    assert "router.expert_bias" in layer.state_dict() and "router.local_tokens_per_expert" not in layer.state_dict()
    assert all("expert_bias" not in n for n, _ in layer.named_parameters())
    router.expert_bias.copy_(torch.linspace(-0.1, 0.1, 8))  # a step that already has a bias
    micro = [torch.randn(2, 16, TINY.hidden_size) for _ in range(3)]
    for x in micro:
        layer(x).sum().backward()
    with torch.no_grad():  # evaluation forwards are not counted
        layer(torch.randn(2, 16, TINY.hidden_size))
    loads = torch.zeros(8)
    for x in micro:  # the reference counts: the biased top-2 of every token of the step
        sig = torch.sigmoid(x.reshape(-1, TINY.hidden_size) @ router.weight.detach().T)
        loads += torch.bincount((sig + router.expert_bias).topk(2, dim=-1)[1].reshape(-1), minlength=8)
    before = router.expert_bias.clone()
    update_expert_bias([layer])
    want = before + 0.05 * torch.sign(loads.mean() - loads)
    assert torch.equal(router.expert_bias, want)
    assert router.expert_bias.dtype == torch.float32 and router.local_tokens_per_expert.sum() == 0


def _sp_bias_worker(rank, world, tp):
    """Two steps of a MoELayer (2 micro-batches each) on the full sequence, or its tp-th piece under sequence
    parallelism; the expert bias after each step."""
    from megallama.mpu import parallel_state as ps
    ps.initialize_model_parallel(tp, 1)
    cfg = MoEConfig(num_experts=8, topk=2, score_function="sigmoid", enable_expert_bias=True, bias_update_rate=0.05,
                    aux_loss_coeff=0.0)
    layer = MoELayer(TINY, cfg, 0, sequence_parallel=tp > 1)
    layer.init_weights("model.layers.0.mlp", 3)
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(2):
        for _ in range(2):
            x = torch.randn(2, 16, TINY.hidden_size, generator=g).chunk(tp, dim=1)[ps.get_tensor_model_parallel_rank()]
            layer(x).sum().backward()
        update_expert_bias([layer])
        out.append(layer.router.expert_bias.tolist())  # plain lists: a tensor would go through shared memory
    return out


def test_sequence_parallel_counts_every_tp_rank_tokens():
    """Under sequence parallelism each tp rank routes its piece of the sequence: the counts are summed over tp."""
    ref = run_distributed(_sp_bias_worker, 1, 1)[0]
    got = run_distributed(_sp_bias_worker, 2, 2)
    assert max(abs(v) for v in ref[1]) > 0
    for rank in (0, 1):
        for b, rb in zip(got[rank], ref):
            assert b == rb, (rank, b, rb)


# ---------------------------------------------------------------- the loop: dp 2 against one process; resume
BASE = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
        "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32", "--global-batch-size", "4",
        "--lr", "3e-3", "--no-progress-bar", "--device", "cpu", "--mock-data", "--vocab-size", "256",
        "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
        "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
        "--moe-router-bias-update-rate", "0.01", "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
        "--moe-aux-loss-coeff", "0", "--log-interval", "100"]
BIAS = [f"model.layers.{i}.mlp.router.expert_bias" for i in (0, 1)]


def _saved_bias(save):
    from megallama.checkpointing.full import open_checkpoint
    _, _, reader = open_checkpoint(save)
    try:
        return [reader.read(n) for n in BIAS]
    finally:
        reader.close()


def _train_worker(rank, world, jobs):
    """Each job (micro-batch size, save dir): pretrain 3 steps; losses, grad norms and the saved expert biases."""
    from megallama.training import pretrain
    out = []
    for mbs, save in jobs:
        summary = pretrain(parse_args(BASE + ["--micro-batch-size", str(mbs), "--train-iters", "3", "--save", save],
                                      world_size=world))
        bias = [b.tolist() for b in _saved_bias(save)] if rank == 0 else None  # lists: no shared-memory tensors
        out.append((summary["losses"], summary["grad_norms"], bias))
    return out


def test_dp2_equals_one_process(tmp_path):
    """dp 2 with 1 and 2 micro-batches per rank against one process with the same micro-batch size: the counts of
    every micro-batch and both ranks move the bias, so it is the same exactly."""
    ref = run_distributed(_train_worker, 1, [(2, str(tmp_path / "r2")), (1, str(tmp_path / "r1"))])[0]
    got = run_distributed(_train_worker, 2, [(2, str(tmp_path / "d2")), (1, str(tmp_path / "d1"))])[0]
    for (losses, norms, bias), (ref_losses, ref_norms, ref_bias) in zip(got, ref):
        for step in (1, 2, 3):
            assert abs(losses[step] - ref_losses[step]) <= 1e-5 * abs(ref_losses[step]), (step, losses, ref_losses)
            assert abs(norms[step] - ref_norms[step]) <= 1e-5 * abs(ref_norms[step]), (step, norms, ref_norms)
        for b, rb in zip(bias, ref_bias):
            assert b == rb, (b, rb)
            b = torch.tensor(b)
            assert b.abs().max() > 0 and torch.allclose(b / 0.01, (b / 0.01).round(), atol=1e-4)  # 3 steps of +-0.01


def test_bias_survives_a_checkpoint_resume(tmp_path):
    """Steps 3-4 of a run resumed at 2 equal the uninterrupted run's bit for bit (a zero bias routes otherwise)."""
    from megallama.training import pretrain
    common = BASE + ["--micro-batch-size", "2", "--train-iters", "4", "--moe-router-bias-update-rate", "0.05"]
    full = pretrain(parse_args(common, world_size=1))["losses"]
    ck = str(tmp_path / "ck")
    pretrain(parse_args(common + ["--save", ck, "--save-interval", "2", "--exit-interval", "2"], world_size=1))
    assert max(b.abs().max() for b in _saved_bias(ck)) > 0
    resumed = pretrain(parse_args(common + ["--load", ck], world_size=1))["losses"]
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == full[step], (step, resumed[step], full[step])


# ---------------------------------------------------------------- bad flags: one line each
MOE = ["--model", "tiny_llama3_50m", "--device", "cpu", "--mock-data", "--train-iters", "1", "--num-experts", "8"]


@pytest.mark.parametrize("extra,words", [
    (["--moe-router-enable-expert-bias"], "needs --moe-router-score-function sigmoid"),
    (["--moe-router-bias-update-rate", "0.01"], "applies to --moe-router-enable-expert-bias"),
    (["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate",
      "-1"], "must be >= 0"),
    (["--moe-router-num-groups", "3", "--moe-router-group-topk", "1"], "must divide --num-experts 8"),
    (["--moe-router-num-groups", "4"], "go together"),
    (["--moe-router-num-groups", "4", "--moe-router-group-topk", "5"], "between 1 and --moe-router-num-groups 4"),
    (["--moe-router-num-groups", "4", "--moe-router-group-topk", "1", "--moe-router-topk", "3"], "the 2 experts"),
    (["--moe-router-num-groups", "4", "--moe-router-group-topk", "3"], "--moe-router-topk 2 must be between"),
])
def test_bad_flag_combinations_are_one_line(extra, words):
    with pytest.raises(ConfigError) as e:
        parse_args(MOE + extra, world_size=1)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_dense_model_refuses_the_router_flags():
    with pytest.raises(ConfigError, match="--moe-router-enable-expert-bias configures MoE experts"):
        parse_args(MOE[:-2] + ["--moe-router-enable-expert-bias"], world_size=1)


def test_auto_configure_accepts_the_flags():
    args = parse_args(MOE + ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
                             "--moe-router-num-groups", "4", "--moe-router-group-topk", "2", "--auto-configure",
                             "--gpus", "2", "--dry-run", "--gpu-memory-gb", "80"], world_size=1)
    assert args.auto_layout["ep"] >= 1 and args.moe_router_enable_expert_bias


def test_stats_of_another_models_layer_start_afresh():
    """The per-process MoE statistics keep a row per layer number until the step's report; a layer of another model
    with another expert count (a second model in one process: notebooks, tests) starts its row afresh instead of
    failing to add 11 numbers to 7 (which the CI caught when an earlier test left a 4-expert row behind)."""
    from megallama.model.moe_stats import MoEStats
    stats = MoEStats()
    one = torch.tensor(0.0)
    stats.record(1, torch.ones(4), one, one)
    stats.record(1, torch.ones(8), one, one)
    stats.record(1, torch.ones(8), one, one)
    assert stats.sums[1].shape == (11,) and stats.sums[1][:8].tolist() == [2.0] * 8
