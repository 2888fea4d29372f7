"""Megatron-core's getters that code written against megatron.core calls: every group holds exactly the ranks the
grid's coordinates say, and each size / rank getter agrees with its group. 8 gloo ranks."""
import pytest

from dist_utils import run_distributed
from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps

LAYOUTS = [(2, 1, 2, 2), (2, 2, 1, 2), (1, 2, 2, 4), (2, 1, 1, 1)]  # tp, pp, cp, ep on 8 ranks


def _expected(world, tp, pp, cp, ep):
    """Each rank's members of every kind, from the coordinates alone (Megatron-core's decomposition with expert
    tp = tp: expert groups are carved from dp x cp, tp innermost)."""
    dp = world // (tp * pp * cp)

    def coords(r):
        return r // (tp * cp * dp), (r // (tp * cp)) % dp, (r // tp) % cp, r % tp

    def same(r, key):
        return sorted(q for q in range(world) if key(*coords(q)) == key(*coords(r)))

    keys = {"tp_cp": lambda p, d, c, t: (p, d),
            "etp_ep": lambda p, d, c, t: (p, (d * cp + c) // ep),
            "etp_ep_pp": lambda p, d, c, t: ((d * cp + c) // ep,),
            "amax": lambda p, d, c, t: (p, c), "amax_cp": lambda p, d, c, t: (p,),
            "dp": lambda p, d, c, t: (p, c, t), "dp_cp": lambda p, d, c, t: (p, t),
            "edp": lambda p, d, c, t: (p, (d * cp + c) % ep, t), "mp": lambda p, d, c, t: (d, c),
            "ep": lambda p, d, c, t: (p, (d * cp + c) // ep, t)}
    return {r: {k: same(r, key) for k, key in keys.items()} for r in range(world)}


def _getters(rank, world, tp, pp, cp, ep, create_gloo=True, force_twins=False):
    import torch
    import torch.distributed as dist
    from megallama.mpu import process_grid
    if force_twins:  # build the gloo twins as on an NCCL world: distinct groups, same members
        process_grid.backend_of = lambda group: "nccl"
    ps.initialize_model_parallel(tp, pp, context_parallel_size=cp, expert_model_parallel_size=ep,
                                 create_gloo_process_groups=create_gloo)

    def members(group):
        return sorted(dist.get_process_group_ranks(group))

    def rank_size(group):
        return dist.get_rank(group), dist.get_world_size(group)

    out = {"tp_cp": members(ps.get_tensor_and_context_parallel_group(check_initialized=False)),
           "etp_ep": members(ps.get_expert_tensor_and_model_parallel_group()),
           "etp_ep_pp": members(ps.get_expert_tensor_model_pipeline_parallel_group()),
           "amax": members(ps.get_amax_reduction_group()),
           "amax_cp": members(ps.get_amax_reduction_group(with_context_parallel=True)),
           "mp_src": ps.get_model_parallel_src_rank(), "ep_src": ps.get_expert_model_parallel_src_rank(),
           "etp": members(ps.get_expert_tensor_parallel_group()) == members(ps.get_tensor_model_parallel_group()),
           "amax_tp": ps.get_amax_reduction_group(tp_only_amax_red=True) is ps.get_tensor_model_parallel_group(),
           "ranks": [(ps.get_tensor_and_context_parallel_rank(), ps.get_tensor_and_context_parallel_world_size()),
                     (ps.get_expert_tensor_and_model_parallel_rank(),
                      ps.get_expert_tensor_and_model_parallel_world_size()),
                     (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())],
           "group_ranks": [rank_size(ps.get_tensor_and_context_parallel_group()),
                           rank_size(ps.get_expert_tensor_and_model_parallel_group()),
                           rank_size(ps.get_expert_tensor_parallel_group())]}
    def plain_dp_cp():
        return ps.get_data_parallel_group(with_context_parallel=True)

    if not create_gloo:
        try:
            ps.get_data_parallel_group_gloo()
        except ConfigError as e:
            out["error"] = str(e)
        return out
    twins = {"dp": ps.get_data_parallel_group_gloo(), "dp_cp": ps.get_data_parallel_group_gloo(True),
             "edp": ps.get_expert_data_parallel_group_gloo()}
    # one distributed-optimizer instance: Megatron's partial groups are the whole ones
    out["partial"] = (ps.get_data_parallel_group(True, partial_data_parallel=True) is plain_dp_cp(),
                      ps.get_data_parallel_world_size(True, True), ps.get_data_parallel_rank(True, True),
                      ps.get_expert_data_parallel_group(partial_expert_data_parallel=True) is
                      ps.get_expert_data_parallel_group())
    plain = {"dp": ps.get_data_parallel_group(), "dp_cp": ps.get_data_parallel_group(True),
             "edp": ps.get_expert_data_parallel_group()}
    for name, group in twins.items():
        out[name] = members(group)
        out[name + "_own"] = group is plain[name]  # the group itself on a gloo world
        x = torch.tensor([float(rank)])
        dist.all_reduce(x, group=group)  # the twin works
        out[name + "_sum"] = x.item()
    return out


@pytest.mark.parametrize("tp,pp,cp,ep", LAYOUTS)
def test_megatron_getters_match_the_grid(tp, pp, cp, ep):
    out = run_distributed(_getters, 8, tp, pp, cp, ep)
    want = _expected(8, tp, pp, cp, ep)
    for r in range(8):
        o, w = out[r], want[r]
        for k in ("tp_cp", "etp_ep", "etp_ep_pp", "amax", "amax_cp", "dp", "dp_cp", "edp"):
            assert o[k] == w[k], (r, k, o[k], w[k])
        assert o["mp_src"] == w["mp"][0] and o["ep_src"] == w["ep"][0]
        assert o["etp"] and o["amax_tp"]
        assert o["ranks"] == o["group_ranks"], (r, o["ranks"], o["group_ranks"])
        assert all(o[k + "_own"] for k in ("dp", "dp_cp", "edp"))
        assert o["edp_sum"] == sum(w["edp"])
        assert o["partial"] == (True, len(w["dp_cp"]), w["dp_cp"].index(r), True)


def test_gloo_twins_built_as_on_nccl():
    """On an NCCL world the twins are new gloo groups; forced here by reporting the world's backend as nccl."""
    out = run_distributed(_getters, 8, 2, 1, 2, 2, True, True)
    want = _expected(8, 2, 1, 2, 2)
    for r in range(8):
        for k in ("dp", "dp_cp", "edp"):
            assert out[r][k] == want[r][k] and not out[r][k + "_own"], (r, k)
            assert out[r][k + "_sum"] == sum(want[r][k])


def test_gloo_twins_switched_off():
    out = run_distributed(_getters, 8, 2, 2, 1, 2, False)
    assert "--disable-gloo-process-groups" in out[0]["error"]


def _vp_stages(rank, world):
    ps.initialize_model_parallel(1, 2, virtual_pipeline_model_parallel_size=2)
    ps.set_virtual_pipeline_model_parallel_rank(0)
    return [(ps.is_pipeline_first_stage(vp_stage=v), ps.is_pipeline_last_stage(vp_stage=v),
             ps.is_rank_in_embedding_group(vp_stage=v)) for v in (0, 1)]


def test_partial_data_parallel_needs_context_parallel_and_one_optimizer_instance():
    with pytest.raises(ConfigError, match="with_context_parallel=True"):
        ps.get_data_parallel_group(partial_data_parallel=True)
    from megallama.arguments import parse_args
    with pytest.raises(ConfigError, match="num-distributed-optimizer-instances 2 is not supported.*pass 1"):
        parse_args(["--model", "tiny_llama3_50m", "--num-distributed-optimizer-instances", "2"], world_size=1)
    assert parse_args(["--model", "tiny_llama3_50m", "--num-distributed-optimizer-instances", "1"],
                      world_size=1).num_distributed_optimizer_instances == 1


def test_vp_stage_names_the_virtual_stage():
    """Megatron-core's newer calls pass vp_stage instead of setting the virtual rank globally."""
    out = run_distributed(_vp_stages, 2)
    assert out[0] == [(True, False, True), (False, False, False)]
    assert out[1] == [(False, False, False), (False, True, True)]
    ps.destroy_model_parallel()
    assert ps.get_data_parallel_group_gloo() is None  # a world of one, as every getter before initialization


def _megatron_init(rank, world):
    import time
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from megallama.model.context_parallel import set_context_parallel_comm_type
    ps.initialize_model_parallel(1, 1, context_parallel_size=4, hierarchical_context_parallel_sizes=[2, 2],
                                 distributed_timeout_minutes=0.03, expert_tensor_parallel_size=1, order="tp-cp-ep-dp-pp",
                                 num_distributed_optimizer_instances=1, use_sharp=False)
    a2a, p2p = ps.get_hierarchical_context_parallel_groups()
    set_context_parallel_comm_type("a2a+p2p", [2, 2])  # --cp-comm-type after Megatron's init: the same groups
    same = ps.get_hierarchical_context_parallel_groups() == [a2a, p2p]
    out = dict(a2a=dist.get_process_group_ranks(a2a), p2p=dist.get_process_group_ranks(p2p), same=same,
               timeout=ps._grid().timeout == timedelta(minutes=0.03))
    if rank == 1:
        time.sleep(6)
    t0 = time.time()
    try:  # the a2a sub-group waits distributed_timeout_minutes (1.8 s), not torch's default
        dist.all_reduce(torch.ones(1), group=a2a)
        out["late"] = ("done", time.time() - t0)
    except RuntimeError:
        out["late"] = ("timed out", time.time() - t0)
    set_context_parallel_comm_type("p2p")
    return out


def test_megatron_init_keywords_build_hierarchical_cp_groups_with_the_timeout():
    out = run_distributed(_megatron_init, 4, timeout=120)
    assert out[0]["a2a"] == [0, 1] and out[3]["a2a"] == [2, 3] and out[0]["p2p"] == [0, 2] and out[3]["p2p"] == [1, 3]
    assert all(out[r]["same"] and out[r]["timeout"] for r in range(4))
    status, waited = out[0]["late"]
    assert status == "timed out" and waited < 5.0, out[0]


@pytest.mark.parametrize("kw,says", [
    (dict(order="tp-dp-pp"), "order='tp-dp-pp'.*tp-cp-ep-dp-pp"),
    (dict(expert_tensor_parallel_size=1), "expert_tensor_parallel_size 1 .*pass None or 2"),
    (dict(num_distributed_optimizer_instances=2), "one instance over dp x cp"),
    (dict(hierarchical_context_parallel_sizes=[2, 3]), r"\[2, 3\] must be .*context_parallel_size 4"),
    (dict(use_sharp=True), "SHARP")])
def test_megatron_init_keywords_without_a_meaning_here_are_one_error(kw, says):
    with pytest.raises(ConfigError, match=says):
        ps.check_megatron_init_kwargs(2, 4, kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'pipeline_model_parallel_split_rank'"):
        ps.check_megatron_init_kwargs(2, 4, dict(pipeline_model_parallel_split_rank=1))
    assert ps.check_megatron_init_kwargs(2, 4, dict(distributed_timeout_minutes=5, high_priority_stream_groups=[],
                                                    hierarchical_context_parallel_sizes=[2, 2])) == (5, [2, 2])
