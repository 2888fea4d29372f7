"""Each microbatch's batch for the chunk that forwards it, whatever order a pipeline schedule runs them in."""
from typing import Dict, List

from megallama.errors import ConfigError
from megallama.pipeline.schedules import F


class MicrobatchData:
    """Hands microbatch ``m`` to whichever chunk forwards it, pulling each iterator exactly once per microbatch
    in order (as the no-pipelining loop does), whatever order the schedule forwards them in. A list of iterators
    means one per chunk (Megatron's interleaved convention)."""

    def __init__(self, data_iterator, actions, num_chunks: int, num_microbatches: int):
        per_chunk = isinstance(data_iterator, (list, tuple))
        if per_chunk and len(data_iterator) != num_chunks:
            raise ConfigError(f"got {len(data_iterator)} data iterators for {num_chunks} model chunks")
        self.src_of = list(range(num_chunks)) if per_chunk else [0] * num_chunks
        self.iters = list(data_iterator) if per_chunk else [data_iterator]
        self.refs: List[Dict[int, int]] = [dict() for _ in self.iters]
        for a in actions:
            if a.kind == F:
                r = self.refs[self.src_of[a.chunk]]
                r[a.microbatch] = r.get(a.microbatch, 0) + 1
        self.cache: List[Dict[int, object]] = [dict() for _ in self.iters]
        self.pulled = [0] * len(self.iters)
        self.m = num_microbatches

    def _pull(self, i: int, upto: int) -> None:
        while self.pulled[i] <= upto:
            batch = next(self.iters[i])
            if self.refs[i].get(self.pulled[i]):
                self.cache[i][self.pulled[i]] = batch
            self.pulled[i] += 1

    def get(self, m: int, chunk: int):
        i = self.src_of[chunk]
        if self.iters[i] is None:
            return None
        self._pull(i, m)
        batch = self.cache[i][m]
        self.refs[i][m] -= 1
        if not self.refs[i][m]:
            del self.cache[i][m]
        return iter([batch])

    def drain(self) -> None:
        for i, it in enumerate(self.iters):
            if it is not None:
                self._pull(i, self.m - 1)
