"""1-bit Adam (Tang et al. 2021) with 0/1 Adam's variance refresh (Lu et al. 2022): ``--gradient-compression onebit``.

Sign-compressing raw gradients under Adam hurts convergence; 1-bit Adam instead runs exact Adam for a warm-up,
then freezes the variance v so that the momentum is the only state that changes, and compresses that:

* each rank forms its momentum beta1 m + (1 - beta1) g and divides it by the frozen Adam denominator
  D = sqrt(v / bc2) + eps, so that what is compressed is the update itself (a coordinate's error is not magnified
  by a tiny D; it beat compressing m itself, +1.4% vs +2.2% final loss in benchmarks/compression_convergence.py);
  signs plus one fp32 scale per chunk (csrc 1-bit kernel) in DeepSpeed's two stages: all-to-all of
  segments with worker error feedback, each rank averages its segment and re-compresses it with server error
  feedback, all-gather. About 2(N-1)/N x n/8 bytes per rank against 2(N-1)/N x 4n for a fp32 all-reduce.
* the hook hands the optimizer the averaged momentum D u_avg in the gradient buffer (the logged grad norm and the
  clip apply to it), and ``OneBitAdamW`` takes it as its ``exp_avg`` and keeps v frozen. A weight whose copies'
  gradients the loop adds up after the dp average (R copies: sequence-parallel norms over tp, a tied embedding split
  over pipeline stages, Chimera's replicas; ``summed_copies``) has each copy's compressor keep its own share of the
  momentum, starting from exp_avg / R, so that the sum of the R shares is the momentum, not R times its old part.
* D is floored per parameter at ``DENOM_FLOOR`` x its RMS over the whole parameter (a tp-sharded one's mean is taken
  over its tp shards, so tp 2 floors what tp 1 floors), written back into the optimizer's v: a coordinate whose
  v is ~0 at the freeze (an embedding row unseen in the warm-up) would otherwise take a step of m / eps. A parameter
  whose v is 0 throughout (no gradient in the warm-up: LoRA's A while B is still 0 at a 1-step warm-up, an expert
  no token reached) is floored at the mean of the bucket's other parameters' means: with D = eps its entries'
  huge m / D set the 1-bit scale of every chunk they share, and one compressed step blew the adapters up.
* a frozen v goes stale as the gradient scale drifts (frozen for good at step 10 of 100, the tiny test model ended
  19% worse, with the identity compressor); as in 0/1 Adam, steps ``warmup + 2^j`` are exact and update v,
  catching up the skipped updates (v <- beta2^k v + (1 - beta2^k) g^2 after k steps; without the catch-up +27%
  instead of +16% at a 5% warm-up). Their number grows as log2 of the run length. Freezing inside the LR warm-up
  is the costly case (5% warm-up +16%, 10% = the LR warm-up +1.4%): keep the warm-up >= the LR warm-up.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from megallama.errors import ConfigError
from megallama.mpu import parallel_state as ps
from megallama.ops import compression as kernels
from megallama.optimizer.compression import GradientCompressor

DENOM_FLOOR = 0.1


def is_exact_step(step: int, warmup: int, refresh: bool = True) -> bool:
    """Whether optimizer step ``step`` (0-based, successful steps) runs exact: the warm-up, then warmup + 2^j.
    The compressor and the optimizer both follow this rule."""
    if step < warmup:
        return True
    k = step - warmup
    return refresh and k > 0 and (k & (k - 1)) == 0


def variance_steps(done: int, warmup: int, refresh: bool = True) -> int:
    """How many steps had gone by at the last variance update, after ``done`` steps (v's bias correction is
    1 - beta2^this)."""
    if done <= warmup:
        return done
    k = done - 1 - warmup  # offset of the last step taken
    if not refresh or k < 1:
        return warmup
    return warmup + (1 << (k.bit_length() - 1)) + 1


class OneBitAdamW(torch.optim.Optimizer):
    """torch's AdamW (the same foreach arithmetic and state keys, so ZeRO checkpoints load either way) on exact
    steps; on compressed steps ``exp_avg`` becomes the given (averaged momentum) "gradient" and v stays frozen."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 freeze_step: int = 100, refresh: bool = True):
        if freeze_step < 1:
            raise ValueError(f"freeze_step {freeze_step} must be >= 1: the variance needs warm-up steps")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.freeze_step, self.refresh = freeze_step, refresh
        # Params whose gradient is reduced exact every step (MoE experts at ep > 1: no comm hook runs on their
        # buckets): their "gradient" is never a momentum, so they take plain AdamW steps throughout.
        self.exact_params = set()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if not self.state[p]:
                    self.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                         exp_avg_sq=torch.zeros_like(p))
            by_step = {}  # DistributedOptimizer steps all pieces together: normally one count per group
            for p in params:
                by_step.setdefault((int(self.state[p]["step"]), p in self.exact_params), []).append(p)
            for (done, always_exact), ps in by_step.items():
                self._update(ps, done, group, always_exact)
        return loss

    def _update(self, params, done: int, group, always_exact: bool = False) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        grads = [p.grad for p in params]
        m = [self.state[p]["exp_avg"] for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        t = done + 1
        if always_exact or is_exact_step(done, self.freeze_step, self.refresh):
            torch._foreach_lerp_(m, grads, 1 - beta1)
            k = 1 if always_exact else t - variance_steps(done, self.freeze_step, self.refresh)  # 1 in the warm-up
            torch._foreach_mul_(v, beta2 ** k)
            torch._foreach_addcmul_(v, grads, grads, 1 - beta2 ** k)
        else:
            torch._foreach_copy_(m, grads)
        for p in params:
            self.state[p]["step"] += 1
        bc1 = 1 - beta1 ** t
        bc2 = 1 - beta2 ** (t if always_exact else variance_steps(t, self.freeze_step, self.refresh))
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(bc2))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, m, denom, -lr / bc1)


def install_onebit_adam(dist_optimizer, freeze_step: int, refresh: bool = True) -> OneBitAdamW:
    """Swap a DistributedOptimizer's AdamW for OneBitAdamW with the same groups, hyperparameters and state. The
    pieces of expert buckets (reduced exact over the expert-data-parallel group, never by the comm hook) are marked
    ``exact_params``: their gradient is a gradient on every step, not the averaged momentum."""
    if getattr(dist_optimizer.config, "optimizer", "adam") != "adam":
        raise ConfigError(f"--gradient-compression onebit is 1-bit Adam and cannot drive --optimizer "
                          f"{dist_optimizer.config.optimizer}; pass --gradient-compression powersgd or topk")
    old = dist_optimizer.optimizer
    exact = {pc.master for pc in dist_optimizer.pieces if pc.comm is not None and pc.comm.expert}
    if isinstance(old, OneBitAdamW):
        old.freeze_step, old.refresh, old.exact_params = freeze_step, refresh, exact
        return old
    keep = ("params", "lr", "betas", "eps", "weight_decay", "wd_mult", "is_decoupled_lr")
    groups = [{k: v for k, v in g.items() if k in keep} for g in old.param_groups]
    new = OneBitAdamW(groups, freeze_step=freeze_step, refresh=refresh)
    for p, st in old.state.items():
        if st:
            new.state[p] = {"step": torch.tensor(float(st["step"])), "exp_avg": st["exp_avg"],
                            "exp_avg_sq": st["exp_avg_sq"]}
    new.exact_params = exact
    dist_optimizer.optimizer = new
    return new


def _unwrap(module):
    """The model inside DDP/ZeRO wrappers (the one that knows its pipeline stage and schedule)."""
    while hasattr(module, "module") and not hasattr(module, "set_input_tensor"):
        module = module.module
    return module


def summed_copies(ddp) -> Dict[torch.nn.Parameter, int]:
    """For each of ``ddp``'s parameters whose gradient the training loop adds up over R > 1 copies after the dp
    average (``finalize_model_grads``): R. Sequence-parallel weights over the tp ranks, every weight of a Chimera
    chunk with its mirror replica, the tied embedding / output pair over the embedding group at pp > 1."""
    module = _unwrap(ddp.module)
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    pp = ps.get_pipeline_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    chimera = 2 if pp > 1 and getattr(module, "pipeline_schedule", None) == "chimera" else 1
    tied = set()
    if pp > 1 and getattr(module, "share_embeddings", False):
        if getattr(module, "pre_process", False):
            tied.add(module.model.embed_tokens.weight)
        if hasattr(module, "output_weight"):
            tied.add(module.output_weight)
    embd = len(ps.get_embedding_ranks()) if tied else 1
    out = {}
    for p in ddp.layout.index:
        r = chimera * (tp if getattr(p, "sequence_parallel", False) else 1) * (embd if p in tied else 1)
        if r > 1:
            out[p] = r
    return out


def _floor_means(params: List[torch.nn.Parameter], v: torch.Tensor, views: List[Tuple[int, int]]) -> List[float]:
    """Each parameter's mean of ``v`` (its bucket segment ``views[i]`` = (offset, numel)) over the whole parameter:
    at tp > 1 a tp-sharded one's sum and count are added up over its shards (one all-reduce per bucket)."""
    means = [float(v[off:off + n].mean()) if n else 0.0 for off, n in views]
    tp = ps.get_tensor_model_parallel_world_size() if ps.model_parallel_is_initialized() else 1
    sharded = [i for i, p in enumerate(params) if getattr(p, "tensor_model_parallel", False)]
    if tp > 1 and sharded:
        stats = torch.tensor([[float(v[views[i][0]:views[i][0] + views[i][1]].double().sum()), views[i][1]]
                              for i in sharded], dtype=torch.float64, device=v.device)
        dist.all_reduce(stats, group=ps.get_tensor_model_parallel_group())
        for i, (total, count) in zip(sharded, stats.tolist()):
            means[i] = total / max(count, 1.0)
    return means


class OneBitCompressor(GradientCompressor):
    reset_after_exact = True  # after a warm-up/refresh step the optimizer's m and v are new: read them again

    def __init__(self, ddp, config, optimizer=None):
        if optimizer is None or not hasattr(optimizer, "pieces"):
            raise ConfigError("1-bit Adam compresses the optimizer's momentum: attach it with the "
                              "DistributedOptimizer (attach_gradient_compression(chunks, optimizer, config))")
        self.copies = summed_copies(ddp)
        super().__init__(ddp, config, optimizer)

    def signature(self) -> dict:
        """A momentum saved as shares of R copies is only valid where the same weights have R copies."""
        sig = super().signature()
        if self.copies:
            idx = self.ddp.layout.index
            sig["summed_copies"] = sorted([idx[p][0], r] for p, r in self.copies.items())
        return sig

    def exact_step(self, step: int) -> bool:
        return is_exact_step(step, self.config.warmup_steps, self.config.variance_refresh)

    def init_state(self, bucket, data):
        n, w, c = bucket.numel, self.world, self.config.chunk_size
        padded = -(-n // (w * c)) * (w * c)
        m, d = self._optimizer_moments(bucket, data.device)
        return {"momentum": m, "denom": d, "padded": padded, "worker_error": torch.zeros(padded, device=data.device),
                "server_error": torch.zeros(padded // w, device=data.device)}

    def _optimizer_moments(self, bucket, device):
        """The optimizer's momentum and (floored) frozen denominator over this bucket. At ZeRO-1 each rank holds
        its own range of the bucket: the ranges are all-gathered (once per refresh)."""
        n, opt = bucket.numel, self.optimizer
        sharded = self.ddp.zero_stage >= 1
        lo, hi = (self.ddp.dp_rank * bucket.shard_size, (self.ddp.dp_rank + 1) * bucket.shard_size) if sharded \
            else (0, n)
        mine = torch.zeros(2, hi - lo, device=device)
        pieces = []
        for pc in opt.pieces:
            a = pc.buf_start - bucket.offset
            if opt.chunks[pc.chunk] is self.ddp and lo <= a < hi:
                pieces.append((pc, a))
                st = opt.optimizer.state.get(pc.master, {})
                if "exp_avg" in st:
                    mine[0, a - lo:a - lo + pc.numel].copy_(st["exp_avg"])
                    mine[1, a - lo:a - lo + pc.numel].copy_(st["exp_avg_sq"])
        mv = self.all_gather(mine).transpose(0, 1).reshape(2, n) if sharded else mine
        m, v = mv[0].clone(), mv[1].clone()
        params = sorted(bucket.params, key=lambda p: self.ddp.layout.index[p][0])
        views = [(self.ddp.layout.index[p][0] - bucket.offset, self.ddp.shapes[p].numel()) for p in params]
        means = _floor_means(params, v, views)
        seen = [x for x in means if x > 0]
        unseen = sum(seen) / len(seen) if seen else 0.0  # a parameter with no gradient in the warm-up: see above
        for (off, k), mean in zip(views, means):
            v[off:off + k].clamp_(min=DENOM_FLOOR ** 2 * (mean if mean > 0 else unseen))
        for p, (off, k) in zip(params, views):  # this copy's share of a momentum its copies' sum makes
            if p in self.copies:
                m[off:off + k].div_(self.copies[p])
        for pc, a in pieces:  # the optimizer freezes the floored variance too
            st = opt.optimizer.state.get(pc.master, {})
            if "exp_avg_sq" in st:
                st["exp_avg_sq"].copy_(v[a:a + pc.numel])
        group = opt.param_groups[0]
        bc2 = 1 - group["betas"][1] ** max(1, variance_steps(opt.num_steps, self.config.warmup_steps,
                                                              self.config.variance_refresh))
        return m, v.div_(bc2).sqrt_().add_(group["eps"])

    def compress(self, bucket, data, st):
        beta1 = self.optimizer.param_groups[0]["betas"][0]
        m, d = st["momentum"], st["denom"]
        n = m.numel()
        x = torch.empty(st["padded"], device=m.device)  # this rank's update direction, zero-padded to the segments
        x[n:].zero_()
        torch.mul(m, beta1, out=x[:n]).add_(data, alpha=1.0 - beta1).div_(d)
        torch.mul(self._mean(x, n, st), d, out=m)  # the averaged momentum
        data.copy_(m)  # OneBitAdamW takes it as exp_avg

    def _mean(self, x, n, st):
        """The mean over ranks of ``x[:n]`` (``x``: padded, zeros after n), 1 bit per entry each way (plus a scale
        per chunk)."""
        w, c, padded = self.world, self.config.chunk_size, st["padded"]
        seg = padded // w
        nb = seg // 8
        packed, scales = kernels.onebit_pack(x, st["worker_error"], c)  # segment j (nb bytes, seg/c scales) -> j
        got = self.all_to_all(torch.cat([packed.view(w, nb), scales.view(torch.uint8).view(w, -1)], dim=1))
        avg = kernels.onebit_unpack(got[:, :nb].contiguous(), got[:, nb:].contiguous().view(torch.float32),
                                    seg, c, 1.0 / w)
        packed, scales = kernels.onebit_pack(avg, st["server_error"], c)
        got = self.all_gather(torch.cat([packed, scales.view(torch.uint8)]))
        return kernels.onebit_unpack(got[:, :nb].reshape(-1), got[:, nb:].contiguous().view(torch.float32)
                                     .reshape(-1), padded, c)[:n]
