"""Robust aggregation: the owner's reduction of one span when some members may lie.

A span's owner sees every member's part of that span (averaging.py, swarm/dataplane.py), so it is
the place to bound what one member can do to the mean. Every part is a claim: its weight (tokens
since the last round) and its values. Before any method runs, the owner

1. bounds each weight to `max_weight_ratio` × the median weight (a peer that claims 10^6× the
   tokens counts as that bound, not as the whole group);
2. clips each part's L2 norm to `max_norm_ratio` × the median norm (a Δ scaled ×1000, or an E3M0
   payload whose block exponents are all 2^127, keeps its direction and loses its size).

The median is the lower one (of an even count, the smaller middle value), so in a group of two an
honest owner's own part is the reference, and in larger groups a minority cannot move it past the
honest parts. Norms are taken in fp64: a part decoded from extreme scales (2^127 per value) has a
squared norm far beyond fp32. Then one of:

- `mean`: the weighted mean of the parts as sent, no bounds (today's behaviour before this file;
  for a swarm of trusted peers, and the baseline of `bench attack`);
- `clipped-mean`: the weighted mean of the bounded parts;
- `trimmed-mean`: per coordinate, drop the `trim` fraction of largest and smallest values (at
  least one each with three or more parts), mean of the rest (unweighted: a lied weight buys nothing);
- `centered-clip` (default): CenteredClip (Karimireddy et al. 2021; BTARD-SGD, arXiv 2106.11257)
  from the coordinate-wise median, v ← v + Σ wᵢ·(xᵢ − v)·min(1, τ/‖xᵢ − v‖) with τ the median
  distance, a few iterations: each part pulls the result by at most its weight × τ, so a minority
  of arbitrary parts moves it by a bounded amount, while parts that agree average as the mean.

A member checks every mean it is given (`check_mean`): finite, and no larger than `check_ratio` ×
its own Δ over the same span, so a lying owner can at worst make a round be refused, not applied.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("mean", "clipped-mean", "trimmed-mean", "centered-clip")


@dataclass(frozen=True)
class AggregateConfig:
    method: str = "centered-clip"  # see METHODS and the module docstring
    max_weight_ratio: float = 2.0  # a part's weight counts as at most this × the median weight
    max_norm_ratio: float = 2.0  # a part's norm is clipped to this × the median norm
    trim: float = 0.25  # trimmed-mean: fraction dropped at each end, per coordinate
    iterations: int = 3  # centered-clip's iterations
    check_ratio: float = 4.0  # a member refuses a mean whose norm exceeds this × its own Δ's (0: no check)

    def validate(self) -> "AggregateConfig":
        if self.method not in METHODS:
            raise ValueError(f"aggregate.method '{self.method}' is unknown; use one of {', '.join(METHODS)}")
        for name in ("max_weight_ratio", "max_norm_ratio"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"aggregate.{name} must be ≥ 1 (1: nobody above the median), got {getattr(self, name)}")
        if not 0 <= self.trim < 0.5:
            raise ValueError(f"aggregate.trim must be in [0, 0.5), got {self.trim}")
        if not 1 <= self.iterations <= 50:
            raise ValueError(f"aggregate.iterations must be in [1, 50], got {self.iterations}")
        if not (self.check_ratio == 0 or self.check_ratio >= 1):
            raise ValueError(f"aggregate.check_ratio must be 0 (no check) or ≥ 1, got {self.check_ratio}")
        return self


def lower_median(values: list[float]) -> float:
    return sorted(values)[(len(values) - 1) // 2]


def norm(x: torch.Tensor) -> float:
    """L2 norm in fp64 (finite for any finite fp32 input)."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) if x.numel() else 0.0


def bound_weights(weights: list[float], ratio: float) -> list[float]:
    """Each weight at most `ratio` × the median; all zero (nobody trained since the last round): equal."""
    if not any(w > 0 for w in weights):
        return [1.0] * len(weights)
    cap = ratio * lower_median(weights)
    if cap <= 0:  # most parts claim no tokens: the ones that do count as one part each
        return [1.0 if w > 0 else 0.0 for w in weights]
    return [min(w, cap) for w in weights]


def clip_norms(parts: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Each part scaled down to at most `ratio` × the median norm (new tensors only where clipped)."""
    norms = [norm(x) for x in parts]
    cap = ratio * lower_median(norms)
    return [x if n <= cap or n == 0 else x * torch.tensor(cap / n, dtype=torch.float32) for x, n in zip(parts, norms)]


def aggregate(parts: list[torch.Tensor], weights: list[float], cfg: AggregateConfig,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """The robust mean of decoded fp32 `parts` (all the same size) claimed with `weights`."""
    assert parts and len(parts) == len(weights)
    if cfg.method == "mean":
        w = weights if sum(weights) > 0 else [1.0] * len(weights)
        return _weighted(parts, w, out)
    w = bound_weights(weights, cfg.max_weight_ratio)
    x = clip_norms(parts, cfg.max_norm_ratio)
    if cfg.method == "clipped-mean" or len(x) == 1:
        return _weighted(x, w, out)
    if cfg.method == "trimmed-mean":
        return _trimmed(x, cfg.trim, out)
    return _centered_clip(x, w, cfg.iterations, out)


def _weighted(parts: list[torch.Tensor], weights: list[float], out: torch.Tensor | None) -> torch.Tensor:
    total = float(sum(weights))
    acc = torch.zeros(parts[0].numel(), dtype=torch.float32) if out is None else out.zero_()
    for x, w in zip(parts, weights):
        if w > 0:
            acc.add_(x, alpha=w / total)
    return acc


def _trimmed(parts: list[torch.Tensor], trim: float, out: torch.Tensor | None) -> torch.Tensor:
    n = len(parts)
    k = max(int(trim * n), 1 if n >= 3 else 0)
    kept = torch.stack(parts).sort(dim=0).values[k: n - k]
    mean = kept.mean(dim=0)
    return mean if out is None else out.copy_(mean)


def _centered_clip(parts: list[torch.Tensor], weights: list[float], iterations: int,
                   out: torch.Tensor | None) -> torch.Tensor:
    total = float(sum(weights))
    w = [wi / total for wi in weights]
    # Start from the coordinate-wise median, which a minority cannot drag far; the iterations then
    # move it to where the parts that agree average.
    v = torch.stack(parts).median(dim=0).values
    for _ in range(iterations):
        dists = [norm(x - v) for x in parts]
        tau = lower_median(dists)
        if tau == 0:
            break
        step = torch.zeros_like(v)
        for x, wi, d in zip(parts, w, dists):
            if wi > 0 and d > 0:
                step.add_(x - v, alpha=wi * min(1.0, tau / d))
        v.add_(step)
    return v if out is None else out.copy_(v)


def check_mean(mean: torch.Tensor, own: torch.Tensor, ratio: float) -> str | None:
    """Why a member should refuse `mean` (the group's answer over a span) given its own Δ over the
    same span, or None if it may apply it. With no Δ of its own (zero) only finiteness is checked."""
    n = norm(mean)  # NaN or inf exactly when some value is
    if not math.isfinite(n):
        return "the mean holds non-finite values"
    mine = norm(own)
    if ratio and mine > 0 and n > ratio * mine:
        return f"the mean's norm {n:.3g} is over {ratio:g}× this peer's own Δ ({mine:.3g})"
    return None
