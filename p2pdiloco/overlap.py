"""Overlap sized to the link (`--tau auto`): how many steps a fragment's mean may take to land.

Streaming DiLoCo sends Δ_f right after step t and applies the mean at step t + τ; the loop blocks
only if the mean is not there by then. A fixed τ is a guess about the link: τ = 1 at 0.2 s a step
asks a round's matchmaking and transfer to land in 0.2 s, which a 100 ms, lossy path cannot do. So
a peer measures what each round really took (submit to mean, `latency_s`) and how long a step of
compute takes, and picks for each new send the smallest τ whose steps cover a high quantile of the
recent latencies with a margin:

    τ = clamp(⌈margin · q_quantile(latencies[-window:]) / step_s⌉, 1, τ_max),  τ_max = ⌊(H − 1) / F⌋

τ_max is the engine's bound τ·F < H (F fragment syncs per H steps, streaming.py): a fragment's mean
lands before the next fragment sends, so at most one sync is in flight at a time. Before any round
has been measured τ = τ_max (the safe side: the first rounds pay cold connections and DHT lookups).

Why τ may differ between peers, and change during a run: the mean of a round does not depend on
when a member applies it; every member's outer step applies the same bytes to the same global copy,
so global copies stay equal. τ only decides how many local steps are merged (α) or kept (eager)
when the mean lands, a choice each peer already makes for itself (records.LOCAL_FIELDS). Its cost
is quality: the τ local steps are half dropped with α = 0.5 (docs/algorithm.md), so smaller is
better, and the policy keeps τ as small as the link allows.

`declare_ahead_steps` sizes the same way how many steps before a fragment is due a peer starts
that round's matchmaking (swarm/network.py `prepare`), so the DHT round trips leave the critical
path and only the transfer remains between sending Δ and its mean.

Pure functions of the measurements: unit-tested with properties in tests/test_overlap.py.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class OverlapPolicy:
    margin: float = 1.5  # the chosen steps cover this many times the latency quantile
    quantile: float = 0.9  # of the recent rounds' latencies (a high one: a late mean blocks the loop)
    window: int = 8  # how many recent rounds count: the link and the swarm's pace change

    def validate(self) -> "OverlapPolicy":
        if not self.margin >= 1:
            raise ValueError(f"overlap.margin must be ≥ 1 (the latency itself, or more), got {self.margin}")
        if not 0 < self.quantile <= 1:
            raise ValueError(f"overlap.quantile must be in (0, 1], got {self.quantile}")
        if self.window < 1:
            raise ValueError(f"overlap.window must be ≥ 1 round, got {self.window}")
        return self


def tau_max(H: int, syncs: int) -> int:
    """The largest τ with τ·syncs < H (0 when even τ = 1 does not fit)."""
    return (H - 1) // syncs


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of values (nearest rank above: a high quantile of few rounds is their max)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def steps_for(latencies_s: list[float], step_s: float, ceiling: int, policy: OverlapPolicy, floor: int = 1) -> int:
    """Steps of `step_s` that cover the policy's quantile of the recent latencies with its margin,
    within [floor, ceiling]; `ceiling` when nothing is measured yet."""
    if ceiling <= floor:
        return max(ceiling, 0)
    recent = [x for x in latencies_s[-policy.window:] if math.isfinite(x) and x >= 0]
    if not recent or not step_s > 0:
        return ceiling
    need = math.ceil(policy.margin * quantile(recent, policy.quantile) / step_s - 1e-9)
    return min(max(need, floor), ceiling)


def choose_tau(latencies_s: list[float], step_s: float, H: int, syncs: int,
               policy: OverlapPolicy = OverlapPolicy(), limit_s: float = math.inf) -> int:
    """τ for the next send (see the module's docstring), its steps lasting at most `limit_s`.

    `limit_s` is the averager's bound on how far a peer may run ahead of the others (a swarm's:
    half its matchmaking window). τ is also the slack between peers: a peer blocks on a round's
    mean only once the slowest member has sent its Δ, so with fixed-H rounds a fast peer runs
    up to τ steps ahead of a slow one, and a slow peer more than a window behind declares its
    next round after the window closed, sits it out, blocks on nothing, and falls further behind.
    """
    ceiling = tau_max(H, syncs)
    if step_s > 0 and math.isfinite(limit_s):
        ceiling = max(1, min(ceiling, int(limit_s / step_s)))
    return steps_for(latencies_s, step_s, ceiling, policy, floor=1)


def declare_ahead_steps(matchmaking_s: list[float], step_s: float, H: int, syncs: int,
                        policy: OverlapPolicy = OverlapPolicy()) -> int:
    """How many steps before a round is due to start its matchmaking: enough to cover it, never
    more than τ_max (a peer that declared commits to the round; the earlier it declares, the
    longer a crash of it costs the others a reduce timeout). At least 1 once anything is measured."""
    return steps_for(matchmaking_s, step_s, tau_max(H, syncs), policy, floor=1)


class StepClock:
    """The compute time of one inner step: the median of the recent ones (an evaluation or a
    checkpoint copy between two steps is one outlier, not a trend)."""

    def __init__(self, keep: int = 32):
        self.keep, self.samples = keep, []

    def add(self, seconds: float) -> None:
        if seconds > 0 and math.isfinite(seconds):
            self.samples = (self.samples + [seconds])[-self.keep:]

    @property
    def step_s(self) -> float:
        return statistics.median(self.samples) if self.samples else 0.0
