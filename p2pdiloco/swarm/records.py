"""What peers publish about themselves in the DHT, and what a run's peers must agree on.

A `PeerRecord` lives in the DHT under the run's peers key, one subkey per peer id, with an expiry
that the peer's heartbeat pushes forward; a peer that dies simply stops being listed once its record
expires. Records come from other machines, so reading one is validating it: a record with a missing
or mistyped field is dropped (and logged by the caller), while fields that a newer version adds are
ignored, so old and new peers can share a swarm as long as the protocol version matches.

`config_hash` covers what must be identical for averages to mean anything: the protocol version and
the run's shared training config (`shared_config`): every field of the run's `SimConfig` except the
local choices in `LOCAL_FIELDS` (batch size, evaluation, this machine's data files, the inner
optimizer, τ, α, eager updates, error feedback, timeouts, robust aggregation), which may differ between peers. A field
added to a config dataclass later is shared by default. The record carries that config in full
(`run_config`), so a newcomer given no training options adopts it (runconfig.py); a record whose
`run_config` does not hash to its `config_hash`, or is too large or of the wrong shape, is refused.
A model or tokenizer given as a file travels as a hash of its content (models.py, tokenizer.py),
not its path: peers keep files in different places, and a joiner passes its own copy.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields

# 2: matchmaking windows close after a round's first declaration; time-budget final rounds; Probe.
# 3: addresses host:port+bulk port, Reduce on the bulk port (bulk.py).
# 4: records carry the run's shared config (run_config, required); config_hash is its hash.
PROTOCOL_VERSION = 4
STATES = ("joining", "training", "left")
MAX_REFUSED = 256


# A closed run's DHT values are `[MARK, value, cert, signature]` (signed_records.py); an open peer
# recognizes them without the validator.
MARK = "p2pdiloco-signed1"


def is_signed(value) -> bool:
    """A closed run's signed value, deserialized."""
    return isinstance(value, list) and len(value) == 4 and value[0] == MARK


class RecordError(ValueError):
    """A record or message from another peer that does not have the expected shape."""


# Local choices: "section.field" or a whole "section". Everything else in SimConfig is shared.
LOCAL_FIELDS = frozenset({
    "batch_size", "eval_every", "eval_batches",  # this peer's hardware and evaluation
    "data.paths", "data.token_dtype",  # this machine's files (byte-level text needs no shared tokenizer)
    "inner",  # the inner optimizer: lr, warmup, clipping... are this peer's
    "streaming.tau", "streaming.tau_auto", "streaming.alpha", "streaming.eager", "streaming.error_feedback", "streaming.timeout_s",
    "aggregate",  # how this peer combines the parts of the spans it owns, and checks the means it gets
})
# Bounds on a run_config read from another peer: it is a claim, checked before anything uses it.
MAX_RUN_CONFIG_BYTES = 8192
MAX_STRING = 256
MAX_LIST = 64


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def shared_config(cfg) -> dict:
    """The run's shared training config (cfg: SimConfig) as plain data: {field: value, section: {field: value}}."""
    out: dict = {}
    for name, value in asdict(cfg).items():
        if name in LOCAL_FIELDS:
            continue
        if isinstance(value, dict):
            out[name] = {k: _plain(v) for k, v in value.items() if f"{name}.{k}" not in LOCAL_FIELDS}
        else:
            out[name] = _plain(value)
    from ..models import model_fingerprint
    out["model"] = model_fingerprint(cfg.model)  # a built-in's name, or a file's content hash
    if cfg.data.tokenizer:
        from ..tokenizer import fingerprint
        out["data"]["tokenizer"] = fingerprint(cfg.data.tokenizer)
    return out


def shared_hash(shared: dict) -> str:
    return hashlib.sha256(json.dumps({"protocol": PROTOCOL_VERSION, "config": shared}, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(cfg) -> str:
    """A short hash of what a run's peers must agree on (cfg: SimConfig)."""
    return shared_hash(shared_config(cfg))


def _check_leaf(value, where: str) -> None:
    if isinstance(value, (list, tuple)):  # msgpack may hand a list back as a tuple
        if len(value) > MAX_LIST:
            raise RecordError(f"run_config field '{where}' is a list of over {MAX_LIST} items")
        for v in value:
            if isinstance(v, (list, tuple, dict)):
                raise RecordError(f"run_config field '{where}' nests lists")
            _check_leaf(v, where)
    elif isinstance(value, str):
        if len(value) > MAX_STRING:
            raise RecordError(f"run_config field '{where}' is a string of over {MAX_STRING} characters")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise RecordError(f"run_config field '{where}' is not a finite number")
    elif value is not None and not isinstance(value, (bool, int)):
        raise RecordError(f"run_config field '{where}' has type {type(value).__name__}")


def check_run_config(raw, claimed_hash: str) -> None:
    """A run_config from another peer: fields and sections of plain values, bounded in size, and
    hashing to the record's config_hash (so what a newcomer adopts is what the run agrees on).
    Whether its fields are ones this version knows is checked when it is adopted (runconfig.py):
    a newer peer's record stays listed."""
    if not isinstance(raw, dict):
        raise RecordError("peer record field 'run_config' must be a mapping")
    try:
        size = len(json.dumps(raw, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise RecordError(f"peer record field 'run_config' is not plain data: {exc}") from None
    if size > MAX_RUN_CONFIG_BYTES:
        raise RecordError(f"peer record field 'run_config' is {size:,} bytes, over {MAX_RUN_CONFIG_BYTES:,}")
    for key, value in raw.items():
        if not isinstance(key, str) or len(key) > MAX_STRING:
            raise RecordError("run_config keys must be short strings")
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str) or len(k) > MAX_STRING or isinstance(v, dict):
                    raise RecordError(f"run_config section '{key}' must map short field names to plain values")
                _check_leaf(v, f"{key}.{k}")
        else:
            _check_leaf(value, key)
    if shared_hash(raw) != claimed_hash:
        raise RecordError("peer record field 'run_config' does not hash to its config_hash")


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


REQUIRED = ("peer_id", "address", "maddrs", "protocol", "config_hash", "config", "run_config", "state")


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
    # Peers whose means this peer refused (aggregation.check_mean) more than once lately: a peer that
    # most others refuse is left out of every group (network.py `excluded`).
    refused: list[str] = field(default_factory=list)
    run_config: dict = field(default_factory=dict)  # shared_config(): what a newcomer given no training options adopts (required when read)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw) -> "PeerRecord":
        if not isinstance(raw, dict):
            raise RecordError(f"a peer record must be a mapping, got {type(raw).__name__}")
        kwargs = {}
        for f in fields(cls):
            if f.name not in raw:
                if f.name in REQUIRED:
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
        if len(self.config) > 4 * MAX_STRING:
            raise RecordError(f"peer record field 'config' is over {4 * MAX_STRING} characters")
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
        if not isinstance(self.refused, list) or len(self.refused) > MAX_REFUSED or not all(
                isinstance(p, str) and 0 < len(p) <= 128 for p in self.refused):
            raise RecordError(f"peer record field 'refused' must be a list of at most {MAX_REFUSED} peer ids")
        check_run_config(self.run_config, self.config_hash)
        if self.address.startswith("p2p:"):  # reachable over libp2p only (libp2p.py)
            if len(self.address) < 10:
                raise RecordError(f"peer record address '{self.address}' has no peer id")
            return
        split_address(self.address)
