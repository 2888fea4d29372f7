"""Megatron's MoE router, capacity, shared-expert and load-balancing flags, each against a straightforward
reference in one process: routing weights (softmax after/before top-k, sigmoid, scaling, fp64), token dropping
(probs/position, padding to capacity), the shared expert, seq_aux_loss and global_aux_loss gradients (also under
activation recompute), and the one-line errors for bad combinations."""
import math

import pytest
import torch
import torch.nn.functional as F

from dist_utils import rel_err
from megallama.errors import ConfigError
from megallama.model.moe import MoEConfig, MoELayer, set_aux_loss_scale, topk_routing
from megallama.model.moe_stats import get_moe_stats
from strat_helpers import TINY


# ------------------------------------------------------------------ routing weights
def _ref_routing(logits, k, pre_softmax, score, scale):
    """Row by row, as Megatron's topk_routing_with_score_function describes it."""
    ps_, is_ = [], []
    for row in logits:
        order = sorted(range(len(row)), key=lambda e: -float(row[e]))[:k]
        if score == "sigmoid":
            w = torch.sigmoid(row[order])
            w = w / w.sum() if k > 1 else w
        elif pre_softmax or k == 1:
            w = torch.softmax(row, -1)[order]
        else:
            w = torch.softmax(row[order], -1)
        ps_.append(w * (scale or 1.0))
        is_.append(order)
    return torch.stack(ps_), torch.tensor(is_)


@pytest.mark.parametrize("k,pre_softmax,score,scale", [(2, False, "softmax", None), (2, True, "softmax", None),
                                                       (1, False, "softmax", 2.5), (3, False, "sigmoid", None),
                                                       (1, False, "sigmoid", 1.5)])
def test_routing_weights_equal_row_by_row_reference(k, pre_softmax, score, scale):
    torch.manual_seed(0)
    logits = torch.randn(7, 6, dtype=torch.float64)
    scores, top_p, top_i = topk_routing(logits, k, not pre_softmax, score, scale)
    ref_p, ref_i = _ref_routing(logits, k, pre_softmax, score, scale)
    assert torch.equal(top_i, ref_i) and rel_err(top_p, ref_p) < 1e-12
    want = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits) / torch.sigmoid(logits).sum(
        -1, keepdim=True)
    assert rel_err(scores, want) < 1e-12


def test_router_dtype_fp64_computes_logits_and_weights_in_fp64():
    torch.manual_seed(0)
    layer = MoELayer(TINY, MoEConfig(num_experts=4, topk=2, router_dtype="fp64"), 0)
    layer.init_weights("l", 1)
    x = torch.randn(2, 5, TINY.hidden_size)
    logits = layer.router(x.reshape(-1, TINY.hidden_size))
    assert logits.dtype == torch.float64
    assert torch.equal(logits, x.reshape(-1, TINY.hidden_size).double() @ layer.router.weight.double().T)
    assert layer(x).dtype == torch.float32  # the experts keep the activations' dtype


# ------------------------------------------------------------------ capacity, drop policy, padding
def _naive_moe(layer, x, capacity, policy):
    """Per expert: its assignments ranked by the policy (position: Megatron's [s, b] token order; probs: weight,
    ties by position), the first ``capacity`` kept."""
    B, S, h = x.shape
    xs = x.reshape(-1, h)
    _, top_p, top_i = topk_routing(layer.router(xs), layer.topk, layer.moe.norm_topk_prob, layer.moe.score_function,
                                   layer.moe.topk_scaling_factor)
    out = torch.zeros_like(xs)
    ex = layer.experts
    for e in range(layer.num_experts):
        mine = [(t, j) for t in range(B * S) for j in range(layer.topk) if int(top_i[t, j]) == e]
        pos = {t: (t % S) * B + t // S for t, _ in mine}
        key = (lambda a: pos[a[0]]) if policy == "position" else (lambda a: (-float(top_p[a]), pos[a[0]]))
        for t, j in sorted(mine, key=key)[:capacity]:
            a = F.silu(ex.gate_proj[e] @ xs[t]) * (ex.up_proj[e] @ xs[t])
            out[t] += top_p[t, j] * (ex.down_proj[e] @ a)
    return out.view_as(x)


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_drops_by_policy_and_padding_changes_nothing(policy):
    torch.manual_seed(2)
    x = torch.randn(3, 6, TINY.hidden_size, requires_grad=True)
    outs = []
    for pad in (False, True):
        cfg = MoEConfig(num_experts=4, topk=2, capacity_factor=0.6, drop_policy=policy, pad_to_capacity=pad,
                        aux_loss_coeff=0.0)
        layer = MoELayer(TINY, cfg, 0)
        layer.init_weights("l", 3)
        rows = []
        layer.experts.register_forward_hook(lambda m, args, out: rows.append(args[1].tolist()))
        y = layer(x)
        g = torch.autograd.grad(y.square().sum(), [x] + list(layer.parameters()))
        outs.append((y.detach(), g, rows[0]))
        cap = layer.capacity(18)
        assert cap == 6  # ceil(0.6 * 18 * 2 / 4): an expert of the 36 assignments keeps at most 6
        with torch.no_grad():
            ref = _naive_moe(layer, x, cap, policy)
        assert rel_err(y, ref) < 1e-5, (policy, pad)
    (y0, g0, rows0), (y1, g1, rows1) = outs
    assert max(rows0) <= 6 and sum(rows0) < 36 and rows1 == [6, 6, 6, 6]  # dropped; padded to capacity
    assert torch.equal(y0, y1) and all(rel_err(a, b) < 1e-6 for a, b in zip(g0, g1))


def test_capacity_is_megatrons_get_capacity_to_the_last_token():
    """Megatron's ceil((T*k / E) * cf): 1.1 * 120 * 6 / 8 is 99.0 but (120 * 6 / 8) * 1.1 is 99.00000000000001, so
    Megatron's experts keep 100 assignments; the other order kept 99 and dropped a token Megatron keeps."""
    cfg = MoEConfig(num_experts=8, topk=6, capacity_factor=1.1, pad_to_capacity=True, aux_loss_coeff=0.0)
    layer = MoELayer(TINY, cfg, 0)
    layer.init_weights("l", 3)
    rows = []
    layer.experts.register_forward_hook(lambda m, args, out: rows.append(args[1].tolist()))
    with torch.no_grad():
        layer(torch.randn(2, 60, TINY.hidden_size))
    assert layer.capacity(120) == math.ceil((120 * 6 / 8) * 1.1) == 100 and rows == [[100] * 8]


# ------------------------------------------------------------------ shared expert
def test_shared_expert_is_added_to_the_routed_output():
    torch.manual_seed(3)
    cfg = MoEConfig(num_experts=4, topk=2, shared_expert_intermediate_size=48)
    layer = MoELayer(TINY, cfg, 0)
    layer.init_weights("model.layers.0.mlp", 5)
    routed = MoELayer(TINY, MoEConfig(num_experts=4, topk=2), 0)
    routed.load_state_dict({k: v for k, v in layer.state_dict().items() if "shared" not in k})
    x = torch.randn(2, 5, TINY.hidden_size)
    sh = layer.shared_experts
    assert sh.gate_proj.weight.shape == (48, TINY.hidden_size) and sh.down_proj.weight.shape == (TINY.hidden_size, 48)
    with torch.no_grad():
        ref = routed(x) + F.silu(x @ sh.gate_proj.weight.T) * (x @ sh.up_proj.weight.T) @ sh.down_proj.weight.T
        assert rel_err(layer(x), ref) < 1e-6
    assert float(sh.gate_proj.weight.detach().std()) > 0  # initialised (layout-independently, by name)
    layer(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sh.parameters())


# ------------------------------------------------------------------ seq_aux_loss and global_aux_loss
def _router_grad(layer, xs, scale):
    """Gradient of the attached aux losses alone (the output's gradient is zero)."""
    set_aux_loss_scale(scale)
    total = torch.zeros_like(layer.router.weight)
    for x in xs:
        y = layer(x)
        (g,) = torch.autograd.grad(y, layer.router.weight, torch.zeros_like(y))
        total += g
    return total


def _lbl(probs, top_i, E, k, coeff, counts=None, n=None):
    counts = torch.bincount(top_i.reshape(-1), minlength=E).double() if counts is None else counts
    n = probs.shape[0] if n is None else n
    return coeff * E / (k * n * n) * (probs.sum(0) * counts).sum()


def test_seq_aux_loss_gradient_is_the_mean_of_per_sequence_losses():
    torch.manual_seed(4)
    cfg = MoEConfig(num_experts=4, topk=2, aux_loss_coeff=0.3, load_balancing_type="seq_aux_loss", router_dtype="fp64")
    layer = MoELayer(TINY, cfg, 0)
    layer.init_weights("l", 1)
    x = torch.randn(3, 5, TINY.hidden_size)
    get_moe_stats().reset()
    g = _router_grad(layer, [x], 1.0)
    logits = layer.router(x.reshape(-1, TINY.hidden_size)).view(3, 5, 4)
    ref = 0
    for b in range(3):
        probs, _, top_i = topk_routing(logits[b], 2)
        ref = ref + _lbl(probs, top_i, 4, 2, 0.3) / 3
    (gref,) = torch.autograd.grad(ref, layer.router.weight)
    assert rel_err(g, gref) < 1e-10
    assert math.isclose(get_moe_stats().report()["aux_loss"], float(ref.detach()), rel_tol=1e-9)


@pytest.mark.parametrize("kw", [dict(num_groups=4, group_topk=1),
                                dict(score_function="sigmoid", enable_expert_bias=True)])
def test_aux_loss_counts_a_plain_top_k_of_the_scores(kw):
    """Megatron's compute_routing_scores_for_aux_loss: the load-balancing counts come from a top-k of the aux
    scores, not from the group-limited or bias-shifted routing (which they used to: 0.997 against 1.043)."""
    from megallama.model.moe_aux_loss import GlobalTokenTracker, aux_losses
    torch.manual_seed(0)
    T, E, k = 64, 8, 2
    logits = torch.randn(T, E)
    moe = MoEConfig(num_experts=E, topk=k, aux_loss_coeff=1.0, **kw).validate()
    bias = torch.linspace(-1, 1, E) if moe.enable_expert_bias else None
    scores, _, top_i = topk_routing(logits, k, True, moe.score_function, None, bias, moe.num_groups, moe.group_topk)
    get_moe_stats().reset()
    with torch.enable_grad():
        ours = aux_losses(moe, 0, logits, scores, top_i, 1, False, GlobalTokenTracker())
    logged = get_moe_stats().report()["tokens_per_expert"][0]
    counts = torch.zeros(T, E).scatter(1, torch.topk(scores, k, dim=1).indices, 1).sum(0)
    want = E / (k * T * T) * (scores.sum(0) * counts).sum()
    routed = torch.zeros(T, E).scatter(1, top_i, 1).sum(0)
    assert not torch.equal(counts, routed)  # the routing itself differs here
    assert ours.item() == pytest.approx(want.item(), rel=1e-6)
    assert logged == routed.int().tolist()  # the log line's loads are the routed tokens

def test_load_balancing_type_none_adds_no_load_balancing_loss():
    """``none`` in a MoEConfig (or a TrainingStrategy) built in Python, whose aux_loss_coeff keeps its default: the
    router gets the z-loss's gradient only (it got the aux loss's too)."""
    torch.manual_seed(6)
    x = torch.randn(2, 5, TINY.hidden_size)
    grads = {}
    for kind, coeff in (("none", 1e-2), ("aux_loss", 0.0)):
        layer = MoELayer(TINY, MoEConfig(num_experts=4, topk=2, aux_loss_coeff=coeff, z_loss_coeff=1e-3,
                                         load_balancing_type=kind), 0)
        layer.init_weights("l", 1)
        get_moe_stats().reset()
        grads[kind] = _router_grad(layer, [x], 1.0)
        assert get_moe_stats().report()["aux_loss"] == 0.0, kind
    assert grads["none"].abs().sum() > 0 and torch.equal(grads["none"], grads["aux_loss"])


@pytest.mark.parametrize("recompute", [False, True])
def test_global_aux_loss_uses_the_running_average_of_the_steps_counts(recompute):
    """Micro-batch j's loss takes the mean counts of micro-batches 1..j of this step (Megatron's ga_steps); the
    next set_aux_loss_scale starts a new step. Under activation recompute the same gradient (no double count)."""
    torch.manual_seed(5)
    cfg = MoEConfig(num_experts=4, topk=2, aux_loss_coeff=0.5, load_balancing_type="global_aux_loss",
                    router_dtype="fp64")
    layer = MoELayer(TINY, cfg, 0)
    layer.init_weights("l", 2)
    xs = [torch.randn(2, 4, TINY.hidden_size) for _ in range(3)]
    run = layer
    if recompute:
        from torch.utils.checkpoint import checkpoint
        run = lambda x: checkpoint(layer, x, use_reentrant=False)  # noqa: E731
    got = []
    for step_xs in (xs, xs[1:]):
        set_aux_loss_scale(1 / len(step_xs))
        outs = [run(x) for x in step_xs]  # forwards first, backwards after (as a pipeline schedule may)
        total = sum((o * 0).sum() for o in outs)
        got.append(torch.autograd.grad(total, layer.router.weight)[0])
    for step_xs, g in zip((xs, xs[1:]), got):
        ref, seen = 0, []
        for x in step_xs:
            probs, _, top_i = topk_routing(layer.router(x.reshape(-1, TINY.hidden_size)), 2)
            seen.append(torch.bincount(top_i.reshape(-1), minlength=4).double())
            ref = ref + _lbl(probs, top_i, 4, 2, 0.5, counts=sum(seen) / len(seen)) / len(step_xs)
        (gref,) = torch.autograd.grad(ref, layer.router.weight)
        assert rel_err(g, gref) < 1e-10


# ------------------------------------------------------------------ flags and one-line errors
BASE = ["--model", "tiny_llama3_50m", "--num-layers", "2", "--strategy", "moe", "--num-experts", "4"]


def _moe(argv):
    from megallama.arguments import parse_args
    from megallama.strategies import strategy_from_args
    args = parse_args(BASE + argv, world_size=1)
    return strategy_from_args(args).moe_config(2)


def test_flags_map_onto_the_moe_config():
    m = _moe(["--moe-shared-expert-intermediate-size", "64", "--moe-shared-expert-overlap", "--moe-router-pre-softmax",
              "--moe-router-topk-scaling-factor", "2.5", "--moe-router-dtype", "fp64", "--moe-expert-capacity-factor",
              "1.25", "--moe-pad-expert-input-to-capacity", "--moe-router-load-balancing-type", "global_aux_loss"])
    assert (m.shared_expert_intermediate_size, m.shared_expert_overlap, m.norm_topk_prob, m.topk_scaling_factor,
            m.router_dtype, m.capacity_factor, m.drop_policy, m.pad_to_capacity, m.load_balancing_type) == \
        (64, True, False, 2.5, "fp64", 1.25, "probs", True, "global_aux_loss")
    assert _moe(["--moe-router-score-function", "sigmoid"]).score_function == "sigmoid"
    assert _moe(["--moe-expert-capacity-factor", "-1"]).capacity_factor is None  # Megatron: negative = no dropping
    legacy = _moe(["--moe-capacity-factor", "1.5"])  # megallama's earlier flag keeps its first-come policy
    assert (legacy.capacity_factor, legacy.drop_policy) == (1.5, "position")
    assert _moe(["--moe-capacity-factor", "1.5", "--moe-token-drop-policy", "probs"]).drop_policy == "probs"


@pytest.mark.parametrize("argv,needle", [
    (["--moe-pad-expert-input-to-capacity"], "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor"),
    (["--moe-token-drop-policy", "position"], "--moe-token-drop-policy position needs --moe-expert-capacity-factor"),
    (["--moe-capacity-factor", "1", "--moe-expert-capacity-factor", "1"], "both set the expert capacity"),
    (["--moe-router-pre-softmax", "--moe-router-score-function", "sigmoid"], "applies to --moe-router-score-function"),
    (["--moe-shared-expert-overlap"], "--moe-shared-expert-overlap needs --moe-shared-expert-intermediate-size"),
    (["--moe-shared-expert-intermediate-size", "0"], "--moe-shared-expert-intermediate-size must be positive"),
    (["--moe-router-topk-scaling-factor", "0"], "--moe-router-topk-scaling-factor must be positive"),
    (["--moe-expert-capacity-factor", "0"], "--moe-expert-capacity-factor must be positive"),
    (["--moe-capacity-factor", "-1"], "--moe-capacity-factor must be positive, got -1.0"),  # named the other flag
    (["--moe-ffn-hidden-size", "-8"], "--moe-ffn-hidden-size must be positive"),  # was a traceback
    (["--moe-ffn-hidden-size", "0"], "--moe-ffn-hidden-size must be positive"),  # was the dense FFN size, silently
])
def test_bad_combinations_are_one_line_errors(argv, needle):
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-")) as e:
        _moe(argv)
    assert "\n" not in str(e.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_layer_with_every_option_matches_cpu_fp32():
    """On the GPU the experts run in bf16 (torch._grouped_mm on Hopper) over padded, dropped groups, the router in
    fp64: the output stays within bf16 rounding of the CPU fp32 layer with the same weights."""
    torch.manual_seed(6)
    cfg = MoEConfig(num_experts=4, topk=2, capacity_factor=1.0, pad_to_capacity=True, router_dtype="fp64",
                    shared_expert_intermediate_size=64, drop_policy="position")
    cpu = MoELayer(TINY, cfg, 0)
    cpu.init_weights("l", 1)
    gpu = MoELayer(TINY, cfg, 0, device="cuda", dtype=torch.bfloat16)
    gpu.load_state_dict({k: v.to(torch.bfloat16) for k, v in cpu.state_dict().items()})
    cpu.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in cpu.state_dict().items()})
    x = torch.randn(4, 32, TINY.hidden_size).to(torch.bfloat16)
    y = gpu(x.cuda())
    y.float().sum().backward()
    with torch.no_grad():  # no second device in the run's MoE statistics (recorded only by a training forward)
        ref = cpu(x.float())
    assert rel_err(y.float().cpu(), ref) < 2e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())
