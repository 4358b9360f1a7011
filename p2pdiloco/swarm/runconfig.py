"""A newcomer trains what the run trains: it reads the run's config from the peers' DHT records.

Every peer publishes its run's shared training config (records.shared_config: everything that
`config_hash` covers) in its record, so the printed join line (`p2pdiloco peer --run-id R
--initial-peers MADDR`) is all a newcomer needs, whatever options the run was started with:

- a newcomer that gives no training options adopts the run's config (and says what it adopted);
- one that gives some keeps them and adopts the rest; if what it gave conflicts with the run, it
  is refused (`ConfigMismatch`, exit status 2) with both configs and the differing fields named;
- local choices (records.LOCAL_FIELDS: batch size, the inner optimizer, τ, α, data files...) are
  always the newcomer's own.

And it never trains alone without saying so: a newcomer that reaches the DHT through
`--initial-peers` but finds no live peer of its run there within `--join-timeout` stops with
`NoRunPeers` (exit 2), unless `--wait-for-peers N` (N ≥ 2) asks it to wait for peers to come, in
which case it goes on with its own config and waits for them (peer.py's join).

The choice of the run's config among records is a pure, deterministic function (`choose_run`), so
every newcomer that sees the same records picks the same config.
"""
from __future__ import annotations

import threading
import time
from dataclasses import asdict

from ..config import build, merge
from ..simulate import SimConfig
from .control import ControlPlane, SwarmStartError
from .records import PeerRecord, config_hash, describe_config, shared_config


class ConfigMismatch(ValueError):
    """This peer's training options conflict with the run's."""


class NoRunPeers(SwarmStartError):
    """The DHT started through --initial-peers, but no live peer of the run is listed there."""


def choose_run(records: list[PeerRecord]) -> PeerRecord | None:
    """The record whose config the run trains: the config of the most training peers, then of the
    most peers, then the smallest hash; of its peers, the smallest peer id."""
    groups: dict[str, list[PeerRecord]] = {}
    for r in records:
        groups.setdefault(r.config_hash, []).append(r)
    if not groups:
        return None
    best = min(groups.items(), key=lambda kv: (-sum(r.state == "training" for r in kv[1]), -len(kv[1]), kv[0]))
    return min(best[1], key=lambda r: r.peer_id)


def _flat(mapping: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in mapping.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def differences(run: dict, mine: dict) -> str:
    """'field: run X, here Y' for every shared field that differs (both from shared_config)."""
    a, b = _flat(run), _flat(mine)
    return "; ".join(f"{k}: run {a.get(k, '-')!r}, here {b.get(k, '-')!r}"
                     for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))


def adopt(given: dict | None, cfg: SimConfig, run: PeerRecord, run_id: str) -> SimConfig:
    """This peer's config in run `run`: the run's shared config, overridden by what was given here
    (`given`: the mapping of options, config file and profile, before defaults; None: all of `cfg`
    counts as given). Raises ConfigMismatch if what was given conflicts with the run's."""
    if given is None:
        given = asdict(cfg)
    elif "seed" in given and "seed" not in given.get("data", {}):  # as config.sim_config does
        given = merge(given, {"data": {"seed": given["seed"]}})
    _needs_files(run.run_config, given, run_id)
    try:
        mine = build(SimConfig, merge(run.run_config, given)).validate()
    except ValueError as exc:
        raise ConfigMismatch(f"run '{run_id}' trains {run.config}, which this peer cannot train: {exc}. If the "
                             f"run's peers run a newer p2pdiloco, upgrade this one") from None
    if config_hash(mine) != run.config_hash:
        raise ConfigMismatch(
            f"run '{run_id}' trains {run.config}, this peer {describe_config(mine)} "
            f"(differs in {differences(run.run_config, shared_config(mine)) or 'the protocol version'}); "
            f"leave out the training options to adopt the run's, give the same ones, or use another --run-id")
    return mine


def _needs_files(run_config: dict, given: dict, run_id: str) -> None:
    """A run's model or tokenizer given as a file travels as a hash of its content (records.py):
    a joiner must pass its own copy; say so rather than try to build a model from the hash."""
    model = run_config.get("model")
    if "model" not in given and isinstance(model, str) and model.split(":")[0] in FILE_KINDS:
        raise ConfigMismatch(f"run '{run_id}' trains a model from a {model.split(':')[0]} (content hash "
                             f"{model.split(':', 1)[1]}): pass --model with your copy of the same file or function")
    data = run_config.get("data") if isinstance(run_config.get("data"), dict) else {}
    if data.get("tokenizer") and "tokenizer" not in given.get("data", {}):
        raise ConfigMismatch(f"run '{run_id}' reads text with a tokenizer (content hash {data['tokenizer']}): "
                             f"pass --tokenizer with your copy of the same tokenizer.json")


FILE_KINDS = ("hf-config", "hf-pretrained", "function")


def given_names(given: dict | None, cfg: SimConfig) -> list[str]:
    """The shared fields that were given here (for the adoption message)."""
    shared = _flat(shared_config(cfg))
    return sorted(k for k in _flat(given or {}) if k in shared)


def find_run(control: ControlPlane, run_id: str, timeout_s: float, stopping: threading.Event,
             poll_s: float = 0.5) -> list[PeerRecord]:
    """The live records of run `run_id` other than this peer's, as soon as there is one, or [] after
    `timeout_s` (or once `stopping` is set). A DHT read that fails counts as none found yet."""
    deadline = time.monotonic() + timeout_s
    while not stopping.is_set():
        try:
            records = [r for r in control.peers() if r.peer_id != control.peer_id]
        except TimeoutError:
            records = []
        if records or time.monotonic() >= deadline:
            return records
        stopping.wait(poll_s)
    return []
