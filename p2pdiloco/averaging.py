"""The one interface between the algorithm and the world: average my encoded Δ with the group's.

`Averager.submit(key, encoded, weight)` returns a Future of `AverageResult`: the weighted mean in fp32
and who took part. Weights are tokens processed. The averaging itself is reduce-scatter then
all-gather: the vector is cut into one span per member; each member owns a span, decodes the parts
it receives, accumulates them in fp32 weighted by tokens, and sends the mean back encoded by the
run's codec. Every member decodes the same bytes, so all members end with bit-identical means.

`InProcessAverager` does exactly that for M workers inside one process (the simulator), counting
the bytes each member would put on the wire. The swarm implements the same interface over gRPC.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .aggregation import AggregateConfig, aggregate
from .codecs import Codec, Encoded


@dataclass(frozen=True, order=True)
class SyncKey:
    """What is being averaged: a fragment's pseudo-gradient in a round, or ('grad', step) for DP."""
    kind: str
    index: int
    round: int


@dataclass
class AverageResult:
    mean: torch.Tensor  # fp32, same numel as what was submitted
    participants: tuple[str, ...]
    total_weight: float
    bytes_sent: int = 0  # what this member put on the wire for this average
    # The spans' encoded means, in order, that `mean` decodes (on the host), where the averager keeps
    # them: a peer that trains on a GPU copies these bytes there and decodes, not the fp32 mean.
    encoded: tuple[Encoded, ...] = ()


def span_bounds(numel: int, parts: int, align: int) -> list[tuple[int, int]]:
    """Cut [0, numel) into `parts` contiguous spans whose inner boundaries are multiples of align."""
    units = -(-numel // align)
    bounds = [min(numel, (units * i // parts) * align) for i in range(parts + 1)]
    bounds[-1] = numel
    return list(zip(bounds[:-1], bounds[1:]))


def member_bytes(codec: Codec, numel: int, members: int, index: int) -> int:
    """Bytes member `index` of `members` sends to average `numel` values once: its encoded parts
    of the others' spans (reduce-scatter) and M − 1 copies of its span's encoded mean (all-gather).
    Exact for codecs of a fixed size; for a `variable_size` codec, the most it can send."""
    spans = span_bounds(numel, members, codec.align)
    own = codec.nbytes(spans[index][1] - spans[index][0])
    others = sum(codec.nbytes(hi - lo) for i, (lo, hi) in enumerate(spans) if i != index)
    return others + own * (members - 1)


def weighted_mean(parts: list[tuple[Encoded | torch.Tensor, float]], out: torch.Tensor | None = None) -> torch.Tensor:
    """The owner's reduction: decode each part to fp32 (unless it already is) and accumulate
    weighted by tokens, in the parts' order (into `out`, an fp32 buffer of the parts' size, if
    given). Parts all encoded by a codec with a `weighted_sum` (E3M0) are accumulated without
    decoding each, with the same result bit for bit."""
    total = sum(w for _, w in parts)
    if total <= 0:
        raise ValueError("weighted mean needs a positive total weight")
    codecs = {enc.codec for enc, _ in parts if isinstance(enc, Encoded)}
    if len(codecs) == 1 and all(isinstance(enc, Encoded) for enc, _ in parts):
        fused = getattr(next(iter(codecs)), "weighted_sum", None)
        acc = fused([(enc, w / total) for enc, w in parts], out) if fused is not None else None
        if acc is not None:
            return acc
    acc = None
    for enc, w in parts:
        x = enc.decode() if isinstance(enc, Encoded) else enc
        if acc is None:  # 0 + w·x, not w·x: a part's -0.0 gives +0.0, as in every other sum
            acc = torch.zeros(x.numel(), dtype=torch.float32) if out is None else out.zero_()
        acc.add_(x, alpha=w / total)
    return acc


def reduce_parts(parts: list[tuple[Encoded | torch.Tensor, float]], cfg: AggregateConfig,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """The owner's reduction of one span by `cfg.method` (aggregation.py): the plain weighted mean
    on its fused path, or the robust methods on the decoded parts."""
    if cfg.method == "mean":
        return weighted_mean(parts, out)
    decoded = [enc.decode() if isinstance(enc, Encoded) else enc for enc, _ in parts]
    return aggregate(decoded, [w for _, w in parts], cfg, out)


class Averager(ABC):
    # The longest τ steps may last (overlap.choose_tau): how far a worker may run ahead of the
    # others. None in the simulator (its workers move in lock-step); a swarm's matchmaking window.
    overlap_limit_s: float = float("inf")

    @abstractmethod
    def submit(self, key: SyncKey, encoded: Encoded, weight: float) -> "Future[AverageResult]":
        """Hand in my encoded vector; the future resolves to the group's weighted mean."""

    def ahead(self, key: SyncKey, steps: int, step_s: float, ceiling: int) -> None:
        """`key` comes due in `steps` inner steps of about `step_s` seconds (asked for every round
        within `ceiling` steps, every step). An averager that needs time to form a group (a swarm)
        may start now; one that does not (the simulator) ignores it."""


@dataclass
class _Pending:
    members: dict[str, tuple[Encoded, float]] = field(default_factory=dict)
    futures: dict[str, Future] = field(default_factory=dict)


class InProcessAverager:
    """M members in one process. `member(name)` gives each worker its own `Averager` view.

    A round completes when every expected member has submitted. `drop(name)` makes a member absent
    (failure injection): rounds then complete with the others, as the swarm does after a timeout.
    """

    def __init__(self, members: list[str], aggregate: AggregateConfig = AggregateConfig(method="mean")):
        self.expected = list(members)
        self.aggregate = aggregate
        self._pending: dict[SyncKey, _Pending] = {}
        self._lock = threading.Lock()

    def member(self, name: str) -> Averager:
        outer = self

        class _Member(Averager):
            def submit(self, key, encoded, weight):
                return outer._submit(name, key, encoded, weight)

        return _Member()

    def drop(self, name: str) -> None:
        with self._lock:
            self.expected.remove(name)
            ready = [k for k, p in self._pending.items() if set(p.members) >= set(self.expected)]
        for key in ready:
            self._complete(key)

    def _submit(self, name: str, key: SyncKey, encoded: Encoded, weight: float) -> Future:
        fut: Future = Future()
        with self._lock:
            pending = self._pending.setdefault(key, _Pending())
            if name in pending.members:
                raise RuntimeError(f"{name} submitted {key} twice")
            pending.members[name], pending.futures[name] = (encoded, weight), fut
            ready = set(pending.members) >= set(self.expected)
        if ready:
            self._complete(key)
        return fut

    def _complete(self, key: SyncKey) -> None:
        with self._lock:
            pending = self._pending.pop(key)
        try:
            results = self._reduce(pending)
        except Exception as exc:  # a round that cannot be averaged fails for its members, as in the swarm
            for fut in pending.futures.values():
                fut.set_exception(exc)
            return
        for n, result in results.items():
            pending.futures[n].set_result(result)

    def _reduce(self, pending: _Pending) -> dict[str, AverageResult]:
        names = sorted(pending.members)
        first = pending.members[names[0]][0]
        codec, numel = first.codec, first.numel  # the mean travels in the codec it was sent in
        spans = span_bounds(numel, len(names), codec.align)
        sent = {n: 0 for n in names}
        means, encoded = [], []
        for owner, (lo, hi) in zip(names, spans):
            parts = [(pending.members[n][0].slice(lo, hi), pending.members[n][1]) for n in names]
            for n, (enc, _) in zip(names, parts):  # reduce-scatter: everyone but the owner sends
                if n != owner:
                    sent[n] += enc.nbytes
            mean = codec.encode(reduce_parts(parts, self.aggregate))
            sent[owner] += mean.nbytes * (len(names) - 1)  # all-gather: the owner sends the mean back
            means.append(mean.decode())
            encoded.append(mean)
        mean = torch.cat(means) if means else torch.zeros(0)
        total = float(sum(w for _, w in pending.members.values()))
        return {n: AverageResult(mean.clone(), tuple(names), total, sent[n], tuple(encoded)) for n in names}
