"""The control plane: hivemind's DHT over libp2p (the `p2pd` daemon ships in hivemind's wheel).

Every call here is a blocking call into the DHT's own process, bounded by hivemind's request
timeout (`dht_timeout_s`); the swarm's asyncio loop runs them in its executor. No peer is special:
any live peer's multiaddress serves as an initial peer, and a swarm outlives its first peer.

Keys (all under `p2pdiloco/<run_id>/`):
- `peers`: subkey peer id → `PeerRecord` (records.py), expiry pushed forward by the heartbeat;
- `round/<kind>/<index>/<round>`: subkey peer id → data-plane address, for matchmaking.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from .records import PeerRecord, RecordError, peers_key

log = logging.getLogger("p2pdiloco.control")


class SwarmStartError(RuntimeError):
    """The DHT could not start: unreachable initial peers, a bad address, a port in use."""


@dataclass(frozen=True)
class ControlConfig:
    run_id: str
    initial_peers: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0  # libp2p TCP port (0: any free port)
    identity_path: str | None = None  # a persistent libp2p key: the peer id, and so the join line, stays the same
    dht_timeout_s: float = 5.0  # one DHT request; a slower answer counts as no answer
    admission: object = None  # a closed run's admission.Admission: records signed and checked (signed_records.py)


def dht_time() -> float:
    from hivemind.utils import get_dht_time
    return get_dht_time()


def _watched_dht_class():
    """hivemind's DHT, whose process (and its p2pd) ends when the peer process is killed (watchdog.py)."""
    import hivemind

    from .watchdog import die_with_parent

    class WatchedDHT(hivemind.DHT):
        def run(self) -> None:
            die_with_parent(self._peer_pid)
            super().run()

    WatchedDHT._peer_pid = os.getpid()
    return WatchedDHT


def _signed(value) -> bool:
    """A closed run's signed record, as a DHT without its validator reads it (signed_records.py)."""
    return isinstance(value, list) and len(value) == 4 and value[0] == "p2pdiloco-signed1"


class ControlPlane:
    def __init__(self, cfg: ControlConfig):
        self.cfg = cfg
        kwargs = {"host_maddrs": [f"/ip4/{cfg.host}/tcp/{cfg.port}"], "wait_timeout": cfg.dht_timeout_s}
        if cfg.identity_path:
            kwargs["identity_path"] = cfg.identity_path
        if cfg.admission is not None:  # a closed run: only admitted peers' own records are kept
            from .signed_records import AdmissionValidator
            kwargs["record_validators"] = [AdmissionValidator(cfg.admission)]
        try:
            self.dht = _watched_dht_class()(initial_peers=list(cfg.initial_peers), start=True, **kwargs)
        except Exception as exc:  # hivemind raises P2PDaemonError, ValueError or a bare Exception
            hint = ("check that a peer of the run is alive at that address (`p2pdiloco status`)"
                    if cfg.initial_peers else f"check that {cfg.host}:{cfg.port} is a free local address")
            raise SwarmStartError(f"could not start the DHT: {exc}; {hint}") from exc
        self.peer_id = str(self.dht.peer_id)
        self.closed_records = 0  # an open peer: records of a closed run's peers in the last listing (peers())

    def _wait(self, future):
        """Every DHT call is bounded: a dead or stuck DHT process must not hang the peer."""
        try:
            return future.result(timeout=3 * self.cfg.dht_timeout_s)
        except TimeoutError:
            raise TimeoutError(f"the DHT did not answer within {3 * self.cfg.dht_timeout_s:.0f}s") from None

    def maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def publish(self, record: PeerRecord, ttl_s: float) -> bool:
        return bool(self._wait(self.dht.store(peers_key(self.cfg.run_id), record.to_dict(), dht_time() + ttl_s,
                                              subkey=record.peer_id, return_future=True)))

    def peers(self) -> list[PeerRecord]:
        """Live peers of the run (state joining or training), malformed records skipped and logged."""
        found = self._wait(self.dht.get(peers_key(self.cfg.run_id), latest=True, return_future=True))
        out, closed = [], 0
        if found is None or not isinstance(found.value, dict):
            return out
        for subkey, item in found.value.items():
            if self.cfg.admission is None and _signed(item.value):
                closed += 1  # an admitted peer's record (signed_records.py): this open peer cannot join it
                continue
            try:
                rec = PeerRecord.from_dict(item.value)
            except (RecordError, TypeError) as exc:
                log.warning("ignoring a malformed peer record under %r: %s", subkey, exc)
                continue
            if rec.peer_id != subkey:
                log.warning("ignoring a peer record filed under %r that names %r", subkey, rec.peer_id)
                continue
            if rec.state != "left":
                out.append(rec)
        if closed and not self.closed_records:
            log.warning("run '%s' has %d peer(s) of a closed run, which refuse this open peer: start it with "
                        "--admission DIR (docs/swarm.md, 'Closed runs')", self.cfg.run_id, closed)
        self.closed_records = closed
        return sorted(out, key=lambda r: r.peer_id)

    def declare(self, key: str, value: str, ttl_s: float) -> float:
        """Store `value` under `key`, subkey this peer, and return the DHT time it was declared at:
        the entry expires at that time + `ttl_s`, so readers recover it (`declarations`). Stamped
        right before the store, not when the call was queued."""
        full = f"p2pdiloco/{self.cfg.run_id}/{key}"
        at = dht_time()
        if not self._wait(self.dht.store(full, value, at + ttl_s, subkey=self.peer_id, return_future=True)):
            log.debug("the DHT did not take the declaration %s", key)
        return at

    def declared(self, key: str) -> dict[str, str]:
        return {k: value for k, (value, _) in self.declarations(key, 0.0).items()}

    def declarations(self, key: str, ttl_s: float) -> dict[str, tuple[str, float]]:
        """Subkey → (value, the DHT time it was declared at), for entries declared with this ttl_s."""
        found = self._wait(self.dht.get(f"p2pdiloco/{self.cfg.run_id}/{key}", latest=True, return_future=True))
        if found is None or not isinstance(found.value, dict):
            return {}
        return {k: (v.value, v.expiration_time - ttl_s) for k, v in found.value.items()
                if isinstance(k, str) and isinstance(v.value, str)}

    def shutdown(self) -> None:
        start = time.monotonic()
        try:
            self.dht.shutdown()
        except Exception as exc:  # leaving must never fail the peer's exit
            log.warning("DHT shutdown: %s", exc)
        log.debug("DHT shut down in %.2fs", time.monotonic() - start)
