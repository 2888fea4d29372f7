"""Sampling from a trained model: prefill the prompt once, then decode a token a step with a KV cache.

Greedy (``temperature=0``), or temperature / top-k / top-p sampling with HF's semantics (top-p keeps the smallest
set of most likely tokens whose probability reaches ``top_p``). On GPUs a decode step is captured once as a CUDA
graph over a fixed-size cache (``StaticKVCache``; tensor parallel: with its NCCL collectives) and replayed for every
token: at small batch a step is otherwise bound by launching a few hundred small kernels from Python. Under tensor parallelism every rank computes its
vocab shard of the last position's logits, the shards are all-gathered, and tensor-parallel rank 0's choice is
broadcast, so the ranks feed the same token next even where sampling would tie-break differently. Pipeline and
context parallelism and sequence parallelism are training layouts: generation runs with them off.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megallama.errors import ConfigError
from megallama.model.kv_cache import KVCache, StaticKVCache
from megallama.mpu import mappings
from megallama.mpu import parallel_state as ps


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 1234
    stop_ids: Sequence[int] = ()

    def validate(self) -> "SamplingConfig":
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"--temperature {self.temperature} must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k} must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p {self.top_p} must be in (0, 1] (1 turns it off; 0 is Megatron's 'off' but "
                              "HF's 'greedy', so it is refused: pass 1, or --greedy)")
        return self


def check_context(longest: int, max_new_tokens: int, limit: int) -> None:
    """The KV cache holds the prompt and the new tokens, and positions end at the model's context: the longest
    prompt's tokens + ``max_new_tokens`` must be <= it. The fix names the prompt length that fits at this
    --max-new-tokens, and the new tokens that fit after this prompt."""
    if longest + max_new_tokens <= limit:
        return
    room = limit - max_new_tokens  # the longest prompt that fits at this --max-new-tokens
    shorten = f"shorten the prompt to fewer than {room + 1} tokens" if room >= 1 else \
        f"lower --max-new-tokens below {limit} and shorten the prompt"
    if longest >= limit:  # fewer new tokens alone cannot fit it
        more = room >= 1 and max_new_tokens > 1
        fix = shorten + (", or lower --max-new-tokens to leave it more room" if more else "")
    else:
        fix = f"ask for at most {limit - longest} new tokens" + (f", or {shorten}" if room >= 1 else "")
    raise ConfigError(f"the longest prompt ({longest} tokens) + --max-new-tokens ({max_new_tokens}) = "
                      f"{longest + max_new_tokens} exceeds the model's context of {limit} tokens; {fix} (prompt "
                      f"tokens + --max-new-tokens must be <= {limit})")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """[b, V] logits with the tokens outside top-k / the top-p nucleus set to -inf (at least one token kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: Optional[torch.Generator] = None
                ) -> torch.Tensor:
    """[b, V] fp32 logits -> [b] token ids."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def _check_layout(model) -> None:
    if ps.model_parallel_is_initialized():
        if ps.get_pipeline_model_parallel_world_size() > 1 or ps.get_context_parallel_world_size() > 1:
            raise ConfigError("generation runs with tensor parallelism only; launch it with pipeline and context "
                              "parallel sizes 1")
    if not (model.pre_process and model.post_process):
        raise ConfigError("generation needs the whole model on each rank (no pipeline stages)")
    if model.sequence_parallel:
        raise ConfigError("generation runs without --sequence-parallel; build the model without it")


def _last_logits(model, h: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
    """The last position's logits over the whole vocabulary, fp32; padding entries beyond ``vocab_size`` -inf."""
    logits = model.compute_logits(h[:, -1:])
    if ps.get_tensor_model_parallel_world_size() > 1:
        logits = mappings.gather_from_tensor_model_parallel_region(logits)
    logits = logits[:, 0].float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits[:, vocab_size:] = float("-inf")
    return logits


DECODE_MODES = ("auto", "eager", "static", "graph")


def _resolve_mode(model, mode: str, device: torch.device) -> str:
    """auto: a CUDA graph for a dense model on GPUs (tensor parallel too: NCCL collectives are captured), else
    eager (MoE dispatch may size its groups on the host)."""
    if mode not in DECODE_MODES:
        raise ConfigError(f"decode mode {mode!r} is not one of {', '.join(DECODE_MODES)}")
    if mode != "auto":
        if mode == "graph" and device.type != "cuda":
            raise ConfigError("CUDA-graph decoding needs a CUDA device; use decode mode eager or static")
        return mode
    from megallama.model.moe import MoELayer
    dense = not any(isinstance(m, MoELayer) for m in model.modules())
    tp_nccl = ps.get_tensor_model_parallel_world_size() == 1 or \
        dist.get_backend(ps.get_tensor_model_parallel_group()) == "nccl"
    return "graph" if device.type == "cuda" and dense and tp_nccl else "eager"


def _batches(prompts: Sequence[Sequence[int]], batch_size: Optional[int]) -> List[List[int]]:
    """Prompt indices in batches of at most ``batch_size``, longest first, so a batch's lengths are close and the
    left padding short."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    size = batch_size or len(order)
    return [order[i:i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, vocab_size: Optional[int] = None,
             return_logits: bool = False, decode_mode: str = "auto", batch_size: Optional[int] = None):
    """New tokens for each prompt (a list of token ids each), cut at the first stop id (kept out). Prompts run in
    batches of ``batch_size`` (None: all at once), shorter ones left-padded (their pads masked out of attention).
    ``vocab_size``: the tokenizer's, when the embedding is padded past it. With ``return_logits`` also each
    batch's per-step last-position logits [b, V] (tests; rows in the batch's order: longest prompt first).
    ``decode_mode``: eager (``KVCache``), static (``StaticKVCache``, no graph), graph (static + one CUDA graph per
    batch) or auto (graph where it applies). MoE with a capacity factor routes the pads too, so what it drops
    depends on the batch."""
    cfg.validate()
    _check_layout(model)
    if not prompts:
        raise ConfigError("no prompts given; pass at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size} must be >= 1")
    check_context(max(len(p) for p in prompts), cfg.max_new_tokens, model.config.max_position_embeddings)
    device = model.output_layer_weight().device
    mode = _resolve_mode(model, decode_mode, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    out: List[Optional[List[int]]] = [None] * len(prompts)
    all_logits = []
    stop_ids = set(cfg.stop_ids)
    was_training = model.training
    model.eval()
    try:
        for idx in _batches(prompts, batch_size):
            length = len(prompts[idx[0]])
            pad = [length - len(prompts[i]) for i in idx]
            tokens = torch.tensor([[0] * n + list(prompts[i]) for n, i in zip(pad, idx)], dtype=torch.long,
                                  device=device)
            total = length + cfg.max_new_tokens
            cache = KVCache(total) if mode == "eager" else StaticKVCache(total, device)
            cache.set_left_padding(torch.tensor(pad, device=device))
            new, steps = _decode(model, tokens, cfg, vocab_size, gen, cache, mode == "graph")
            all_logits.append(steps)
            for row, i in enumerate(idx):
                seq = new[row].tolist()
                out[i] = seq[:next((j for j, t in enumerate(seq) if t in stop_ids), len(seq))]
    finally:
        model.train(was_training)
    return (out, all_logits) if return_logits else out


class _GraphedStep:
    """One decode step (token [b, 1] -> last logits) captured as a CUDA graph over a ``StaticKVCache``; a replay
    writes the token's K/V at the cache's device position and advances it."""

    def __init__(self, model, cache: StaticKVCache, batch: int, vocab_size: Optional[int]):
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=cache.pos.device)
        step = lambda: _last_logits(model, model.model(input_ids=self.token, kv_cache=cache), vocab_size)  # noqa
        pos, offset = cache.pos.clone(), cache.offset
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (lazy inits, cuBLAS workspaces) off the capture
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        cache.pos.copy_(pos)  # the warm-ups wrote at ``pos`` and moved it; the real steps overwrite and redo that
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()
        cache.offset = offset

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token)
        self.graph.replay()
        return self.logits.clone()


def _decode(model, tokens, cfg, vocab_size, gen, cache, use_graph: bool = False):
    tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    stop = torch.tensor(list(cfg.stop_ids), dtype=torch.long, device=tokens.device)
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    new, steps, step_input, graphed = [], [], tokens, None
    for i in range(cfg.max_new_tokens):
        if graphed is not None:
            logits = graphed(step_input)
        else:
            logits = _last_logits(model, model.model(input_ids=step_input, kv_cache=cache), vocab_size)
            if use_graph and i + 1 < cfg.max_new_tokens:  # after the prefill: capture the one-token step
                graphed = _GraphedStep(model, cache, tokens.shape[0], vocab_size)
        steps.append(logits)
        nxt = sample_next(logits, cfg, gen)
        if tp_group is not None:  # every tp rank continues with rank 0's choice
            dist.broadcast(nxt, ps.get_tensor_model_parallel_src_rank(), group=tp_group)
        new.append(nxt)
        if stop.numel():
            done |= torch.isin(nxt, stop)
            if bool(done.all()):
                break
        step_input = nxt[:, None]
    return torch.stack(new, 1), steps
