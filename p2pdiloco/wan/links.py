"""What the WAN test bed emulates, as typed config: each peer's link (LinkSpec) and the bed (BedConfig).

The link model: every peer has an access link that carries `rate` in each direction; a packet
between two peers sees a one-way delay of `delay_ms` and is lost with probability `loss_pct`.
Each end of a path (the sender's uplink, the receiver's downlink) holds half of the delay and
half of the loss (`half_loss`), so peers with the same link see exactly these figures between them.
"""
from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass

QUEUE_S = 0.1  # each link direction buffers 100 ms at its rate (a typical access link); beyond it, tail drop
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)$", re.IGNORECASE)
_RATE_BYTES = {"bit": 1 / 8, "kbit": 125, "mbit": 125e3, "gbit": 125e6, "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}
_DELAY = re.compile(r"^(\d+(?:\.\d+)?)(us|ms|s)?$")


def rate_bytes_per_s(rate: str, field: str = "link.rate") -> float:
    m = _RATE.match(rate)
    if not m:
        raise ValueError(f"{field} '{rate}' is not a tc rate like 20mbit, 1gbit or 500kbit")
    return float(m.group(1)) * _RATE_BYTES[m.group(2).lower()]


def parse_delay_ms(text: str, field: str = "link.delay") -> float:
    m = _DELAY.match(text.strip())
    if not m:
        raise ValueError(f"{field} '{text}' is not a delay like 25ms, 0.1s or 500us")
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3, None: 1.0}[m.group(2)]


@dataclass(frozen=True)
class LinkSpec:
    rate: str = "20mbit"  # each peer's link, each direction (tc syntax)
    delay_ms: float = 25.0  # one-way delay between two peers
    loss_pct: float = 0.0  # packets lost between two peers, percent

    def validate(self) -> "LinkSpec":
        rate_bytes_per_s(self.rate)
        if not 0 <= self.delay_ms <= 10_000:
            raise ValueError(f"link.delay_ms must be in [0, 10000], got {self.delay_ms}")
        if not 0 <= self.loss_pct < 100:
            raise ValueError(f"link.loss_pct must be in [0, 100), got {self.loss_pct}")
        return self

    @property
    def bytes_per_s(self) -> float:
        return rate_bytes_per_s(self.rate)

    @property
    def half_loss(self) -> float:
        """Loss on each end of a path, so that a packet crossing both is lost with loss_pct."""
        return 1 - math.sqrt(1 - self.loss_pct / 100)


@dataclass(frozen=True)
class BedConfig:
    peers: int
    link: LinkSpec = LinkSpec()
    subnet: str = "10.77.0.0/24"  # our own private range; only the namespaces get addresses in it
    backend: str = "auto"  # netem, wire, or auto: netem where the kernel has it
    mtu: int = 1500

    def validate(self) -> "BedConfig":
        self.link.validate()
        try:
            net = ipaddress.IPv4Network(self.subnet)
        except ValueError as exc:
            raise ValueError(f"bed.subnet '{self.subnet}': {exc}") from None
        if not net.is_private or not 1 <= self.peers <= min(255, net.num_addresses - 2):
            raise ValueError(f"bed.peers ({self.peers}) must be in [1, 255] and fit in bed.subnet {self.subnet}, "
                             f"which must be private")
        if self.backend not in ("auto", "netem", "wire"):
            raise ValueError(f"bed.backend '{self.backend}' is unknown; use auto, netem or wire")
        if not 576 <= self.mtu <= 9000:
            raise ValueError(f"bed.mtu must be in [576, 9000], got {self.mtu}")
        return self
