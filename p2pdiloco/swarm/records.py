"""What peers publish about themselves in the DHT, and what a run's peers must agree on.

A `PeerRecord` lives in the DHT under the run's peers key, one subkey per peer id, with an expiry
that the peer's heartbeat pushes forward; a peer that dies simply stops being listed once its record
expires. Records come from other machines, so reading one is validating it: a record with a missing
or mistyped field is dropped (and logged by the caller), while fields that a newer version adds are
ignored, so old and new peers can share a swarm as long as the protocol version matches.

`config_hash` covers what must be identical for averages to mean anything: the protocol version,
the model (by content) and tokenizer, the fragmenting, the codec, the schedule and the outer optimizer. Local choices (batch
size, inner lr, τ, α, eager updates, timeouts) may differ between peers.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields

# 2: matchmaking windows close after a round's first declaration; time-budget final rounds; Probe.
# 3: addresses host:port+bulk port, Reduce on the bulk port (bulk.py).
PROTOCOL_VERSION = 3
STATES = ("joining", "training", "left")


class RecordError(ValueError):
    """A record or message from another peer that does not have the expected shape."""


def config_hash(cfg) -> str:
    """A short hash of what a run's peers must agree on (cfg: SimConfig)."""
    from ..models import model_fingerprint
    s = cfg.streaming
    # The model by content: a config file's or weights' hash, not their path (models.py).
    shared = {"protocol": PROTOCOL_VERSION, "model": model_fingerprint(cfg.model), "mode": s.mode, "H": s.H,
              "fragments": s.fragments, "strategy": s.strategy, "codec": s.codec,
              "outer": asdict(cfg.outer), "steps": cfg.steps, "seq_len": cfg.data.seq_len,
              "round_s": s.round_s, "duration_s": s.duration_s}
    if cfg.data.tokenizer:  # the vocabulary, and how text becomes tokens (runs without one hash as before)
        from ..tokenizer import fingerprint
        shared["tokenizer"] = fingerprint(cfg.data.tokenizer)
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]


def describe_config(cfg) -> str:
    s = cfg.streaming
    from pathlib import Path
    tokenizer = f" tokenizer={Path(cfg.data.tokenizer).name}" if cfg.data.tokenizer else ""
    return (f"model={cfg.model}{tokenizer} mode={s.mode} H={s.H} fragments={s.fragments} strategy={s.strategy} "
            f"codec={s.codec} outer.lr={cfg.outer.lr} outer.momentum={cfg.outer.momentum} "
            f"steps={cfg.steps} seq_len={cfg.data.seq_len}"
            + (f" round_s={s.round_s} duration_s={s.duration_s}" if s.round_s else ""))


def split_address(address: str) -> tuple[str, int, int | None]:
    """A data-plane address `host:port` or `host:port+bulk port` (swarm/bulk.py) as (host, gRPC
    port, bulk port or None); RecordError if it is neither."""
    host, sep, ports = address.rpartition(":")
    port, plus, bulk = ports.partition("+")
    if not sep or not host or not port.isdigit() or (plus and not bulk.isdigit()) \
            or not 0 < int(port) < 65536 or (plus and not 0 < int(bulk) < 65536):
        raise RecordError(f"peer record address '{address}' is not host:port[+port] or p2p:<peer id>")
    return host, int(port), int(bulk) if plus else None


def peers_key(run_id: str) -> str:
    return f"p2pdiloco/{run_id}/peers"


@dataclass
class PeerRecord:
    peer_id: str
    address: str  # host:port[+bulk port] of the peer's data plane, or p2p:<peer id> (libp2p only)
    maddrs: list[str]  # the peer's libp2p addresses: any of them serves as an initial peer
    protocol: int
    config_hash: str
    config: str  # describe_config(): shown when a mismatch is refused
    state: str  # joining | training | left
    step: int = 0
    tokens: int = 0
    tokens_per_s: float = 0.0
    rounds: dict[str, int] = field(default_factory=dict)  # fragment index -> last round applied
    ends_at: float = 0.0  # time-budget runs: the Unix time the run ends (every peer adopts the first one's)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw) -> "PeerRecord":
        if not isinstance(raw, dict):
            raise RecordError(f"a peer record must be a mapping, got {type(raw).__name__}")
        kwargs = {}
        for f in fields(cls):
            if f.name not in raw:
                if f.name in ("peer_id", "address", "maddrs", "protocol", "config_hash", "config", "state"):
                    raise RecordError(f"peer record without '{f.name}'")
                continue
            kwargs[f.name] = raw[f.name]  # fields of newer versions are not in fields(cls): ignored
        rec = cls(**kwargs)
        rec._check()
        return rec

    def _check(self) -> None:
        for name in ("peer_id", "address", "config_hash", "config", "state"):
            if not isinstance(getattr(self, name), str):
                raise RecordError(f"peer record field '{name}' must be a string")
        if self.state not in STATES:
            raise RecordError(f"peer record state '{self.state}' is not one of {STATES}")
        if not isinstance(self.maddrs, list) or not all(isinstance(m, str) for m in self.maddrs):
            raise RecordError("peer record field 'maddrs' must be a list of strings")
        for name in ("protocol", "step", "tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise RecordError(f"peer record field '{name}' must be a non-negative integer")
        for name in ("tokens_per_s", "ends_at"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise RecordError(f"peer record field '{name}' must be a finite number")
        if not isinstance(self.rounds, dict) or not all(
                isinstance(k, str) and isinstance(v, int) for k, v in self.rounds.items()):
            raise RecordError("peer record field 'rounds' must map fragment names to round numbers")
        if self.address.startswith("p2p:"):  # reachable over libp2p only (libp2p.py)
            if len(self.address) < 10:
                raise RecordError(f"peer record address '{self.address}' has no peer id")
            return
        split_address(self.address)
