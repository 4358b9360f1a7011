"""Adversarial peers, for `bench attack` and the swarm's robustness tests only.

A peer started with `--adversary KIND` trains as usual but lies on the wire in one way. Each kind
is one of issue 14's scenarios; what defends against it is in docs/swarm.md ("Threat model"):

- `scaled`: sends its Δ multiplied by 1000 (finite values, the same direction);
- `weight-lie`: sends a random Δ (of its own Δ's size) and claims 10^6× its tokens;
- `extreme-scales`: sends its Δ with every E3M0 block exponent set to the largest (2^127);
- `garbage`: sends random bytes in a well-formed payload (random scales and codes);
- `replay`: sends, every round, the first part it ever sent for that fragment (a stale message);
- `bad-owner`: sends honest parts but answers the members of its own span with its mean × 1000.

The lie is applied to the part as encoded by the run's codec, so it travels exactly as a hostile
peer's would: through the same transports, checked by the same owners.
"""
from __future__ import annotations

import torch

from ..averaging import SyncKey
from ..codecs import Encoded

KINDS = ("scaled", "weight-lie", "extreme-scales", "garbage", "replay", "bad-owner")


class Adversary:
    def __init__(self, kind: str, seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"swarm.adversary '{kind}' is unknown; use one of {', '.join(KINDS)}")
        self.kind = kind
        self.gen = torch.Generator().manual_seed(seed)
        self.first: dict[tuple[str, int], Encoded] = {}

    def part(self, key: SyncKey, enc: Encoded, weight: float) -> tuple[Encoded, float]:
        """What this peer sends as a member instead of (enc, weight)."""
        codec = enc.codec
        if self.kind == "scaled":
            return codec.encode(enc.decode() * 1000), weight
        if self.kind == "weight-lie":
            x = enc.decode()
            noise = torch.randn(x.numel(), generator=self.gen) * (x.float().std() if x.numel() > 1 else 1.0)
            return codec.encode(noise), weight * 1e6
        if self.kind == "extreme-scales":
            if not enc.scales.numel():
                return codec.encode(torch.full((enc.numel,), 3e38)), weight
            return Encoded(codec, enc.numel, torch.full_like(enc.scales, 254), enc.values.clone()), weight
        if self.kind == "garbage":
            if not codec.decodes_finite:  # a cast codec's random bits may be NaN, which owners refuse on sight
                return codec.encode(torch.randn(enc.numel, generator=self.gen) * 1e30), weight
            scales = torch.randint(0, 256, (enc.scales.numel() * enc.scales.element_size(),), generator=self.gen,
                                   dtype=torch.uint8).view(enc.scales.dtype) if enc.scales.numel() else enc.scales
            values = torch.randint(0, 256, (enc.values.numel(),), generator=self.gen, dtype=torch.uint8)
            return Encoded(codec, enc.numel, scales, values), weight
        if self.kind == "replay":
            old = self.first.setdefault((key.kind, key.index), enc)
            return (old if old.numel == enc.numel else enc), weight
        return enc, weight  # bad-owner: honest as a member

    def mean(self, mean: torch.Tensor) -> torch.Tensor:
        """What this peer answers as a span's owner instead of `mean` (fp32, before encoding)."""
        return mean * 1000 if self.kind == "bad-owner" else mean
