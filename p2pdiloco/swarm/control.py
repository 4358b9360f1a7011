"""The control plane: hivemind's DHT over libp2p (the `p2pd` daemon ships in hivemind's wheel).

Every call here is a blocking call into the DHT's own process, bounded by hivemind's request
timeout (`dht_timeout_s`); the swarm's asyncio loop runs them in its executor. No peer is special:
any live peer's multiaddress serves as an initial peer, and a swarm outlives its first peer.

The DHT process can die under the peer: killed, crashed, or sent the same SIGTERM/SIGINT as the
peer when a supervisor signals the whole process group. hivemind's calls then wait forever (its
futures are never answered), so none is made without a bound: every call checks that the process
and its `p2pd` are alive, then waits for the answer in short slices, checking again between them
(`DHTGone` at once instead of a timeout); the addresses are read once at the start and kept; and
`shutdown` is bounded too, killing what does not stop, `p2pd` included.

Keys (all under `p2pdiloco/<run_id>/`):
- `peers`: subkey peer id → `PeerRecord` (records.py), expiry pushed forward by the heartbeat;
- `round/<kind>/<index>/<round>`: subkey peer id → data-plane address, for matchmaking.
"""
from __future__ import annotations

import atexit
import collections
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

from .. import procfs
from .records import PeerRecord, RecordError, is_signed, peers_key
from .watchdog import children

log = logging.getLogger("p2pdiloco.control")


POLL_S = 0.25  # how often a waiting call checks that the DHT process is still alive
SHUTDOWN_S = 4.0  # the DHT's own shutdown; then it is killed, and its p2pd with it
BOOTSTRAP_ATTEMPTS, BOOTSTRAP_RETRY_S = 3, (2.0, 5.0)  # joining through initial peers that may be busy


class SwarmStartError(RuntimeError):
    """The DHT could not start: unreachable initial peers, a bad address, a port in use."""


class DHTGone(TimeoutError):
    """The DHT process or its p2pd has exited: no call will ever be answered. A TimeoutError, so
    whatever handles "no answer in time" (a skipped round, a missed heartbeat) handles this too."""


# Run inside the DHT process (hivemind's run_coroutine pickles them by name).
async def _node_peer_id(_dht, node):
    return node.peer_id


async def _node_maddrs(_dht, node):
    return await node.get_visible_maddrs(latest=False)


async def _node_daemon_maddr(_dht, node):
    return node.p2p.daemon_listen_maddr


@dataclass(frozen=True)
class ControlConfig:
    run_id: str
    initial_peers: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0  # libp2p TCP port (0: any free port)
    identity_path: str | None = None  # a persistent libp2p key: the peer id, and so the join line, stays the same
    dht_timeout_s: float = 5.0  # one DHT request; a slower answer counts as no answer
    admission: object = None  # a closed run's admission.Admission: records signed and checked (signed_records.py)
    start_timeout_s: float = 120.0  # the DHT process and its p2pd up, and the initial peers reached


def dht_time() -> float:
    from hivemind.utils import get_dht_time
    return get_dht_time()


def _watched_dht_class():
    """hivemind's DHT, whose process (and its p2pd) ends when the peer process is killed (watchdog.py)."""
    import hivemind

    from .watchdog import die_with_parent

    class WatchedDHT(hivemind.DHT):
        def run(self) -> None:
            # The fork inherits the peer's handlers ("finish the step, then leave"). SIGTERM: die, as
            # before they were installed (a handler would keep this process alive without its p2pd
            # after a signal to the process group). SIGINT: ignored, as hivemind sets it a little
            # later anyway (and p2pd, started after, inherits that: Ctrl-C leaves the DHT running
            # for the peer's own, orderly shutdown).
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            die_with_parent(self._peer_pid)
            super().run()

    WatchedDHT._peer_pid = os.getpid()
    return WatchedDHT


class ControlPlane:
    @staticmethod
    def _start_dht(cfg: ControlConfig, kwargs: dict):
        dht = _watched_dht_class()(initial_peers=list(cfg.initial_peers), start=False, **kwargs)
        # Bounded: hivemind waits for its process's "ready" without a limit, and a child that never
        # gets there (a stuck p2pd, a fork that deadlocked) would hang the peer for good.
        try:
            dht.run_in_background(await_ready=True, timeout=cfg.start_timeout_s)
        except TimeoutError:
            dht.terminate()
            raise TimeoutError(f"not ready after {cfg.start_timeout_s:.0f} s") from None
        return dht

    def __init__(self, cfg: ControlConfig):
        self.cfg = cfg
        self._malformed: set[tuple] = set()
        # DHT calls made, by kind (publish, peers, declare, declarations): what a swarm's size costs
        # each peer on the control plane (bench swarm). Calls come from several executor threads.
        self.calls: collections.Counter[str] = collections.Counter()
        self._calls_lock = threading.Lock()
        kwargs = {"host_maddrs": [f"/ip4/{cfg.host}/tcp/{cfg.port}"], "wait_timeout": cfg.dht_timeout_s}
        if cfg.identity_path:
            kwargs["identity_path"] = cfg.identity_path
        if cfg.admission is not None:  # a closed run: only admitted peers' own records are kept
            from .signed_records import AdmissionValidator
            kwargs["record_validators"] = [AdmissionValidator(cfg.admission)]
        # A busy initial peer may miss the bootstrap ping (hivemind waits `wait_timeout`): when a
        # swarm of 8 or more starts at once on 2 cores, some newcomers failed so and exited, and
        # the rest waited for them until --join-timeout. Try again, after a pause, a few times.
        attempts = BOOTSTRAP_ATTEMPTS if cfg.initial_peers else 1
        for attempt in range(attempts):
            try:
                self.dht = self._start_dht(cfg, kwargs)
                break
            except Exception as exc:  # hivemind raises P2PDaemonError, ValueError or a bare Exception
                if attempt + 1 < attempts:
                    log.warning("could not start the DHT (%s); trying again in %.0fs", exc, BOOTSTRAP_RETRY_S[attempt])
                    time.sleep(BOOTSTRAP_RETRY_S[attempt])
                    continue
                hint = ("check that a peer of the run is alive at that address (`p2pdiloco status`)"
                        if cfg.initial_peers else f"check that {cfg.host}:{cfg.port} is a free local address")
                raise SwarmStartError(f"could not start the DHT: {exc}; {hint}") from exc
        # Its p2pd, by pid and start time (a pid may be reused): stopped at shutdown if the DHT cannot.
        self._p2pd = [(pid, f[procfs.STARTTIME]) for pid in children(self.dht.pid)
                      if (f := procfs.stat_fields(pid))]
        # An exit that skips shutdown (a second Ctrl-C) lets multiprocessing SIGTERM the DHT process,
        # which leaves its p2pd behind: stop that too.
        atexit.register(self._stop_p2pd)
        self.closed_records = 0  # an open peer: records of a closed run's peers in the last listing (peers())
        try:
            self.peer_id = str(self._wait(self.dht.run_coroutine(_node_peer_id, return_future=True)))
            self._maddrs = [str(m) for m in self._wait(self.dht.run_coroutine(_node_maddrs, return_future=True))]
        except BaseException as exc:
            self.shutdown()
            raise SwarmStartError(f"the DHT started but does not answer: {exc}") from exc

    # ---- bounded calls
    def gone(self) -> str | None:
        """Why the DHT cannot answer any more, or None while its process and its p2pd are alive."""
        if not self.dht.is_alive():
            return f"the DHT process (pid {self.dht.pid}) has exited (exit code {self.dht.exitcode})"
        for pid, started in self._p2pd:
            f = procfs.stat_fields(pid)
            if f is None or f[procfs.STARTTIME] != started or f[procfs.STATE] == "Z":
                return f"the DHT's p2pd daemon (pid {pid}) has exited"
        return None

    def _wait(self, future, timeout_s: float | None = None):
        """Every DHT call is bounded: a dead or stuck DHT process must not hang the peer."""
        timeout_s = 3 * self.cfg.dht_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return future.result(timeout=max(0.0, min(POLL_S, deadline - time.monotonic())))
            except TimeoutError:
                if (why := self.gone()) is not None:
                    raise DHTGone(why) from None
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the DHT did not answer within {timeout_s:.0f}s") from None

    def _check_alive(self) -> None:
        # A call into a dead DHT process is never answered; its pipe would fill up and block. Said at once.
        if (why := self.gone()) is not None:
            raise DHTGone(why)

    def maddrs(self) -> list[str]:
        """This node's libp2p addresses, read once at the start: no DHT call, so leaving never waits on it."""
        return list(self._maddrs)

    async def replicate_p2p(self):
        """A client of the DHT's own p2pd for this process (hivemind's `DHT.replicate_p2p`, bounded)."""
        from hivemind.p2p import P2P
        self._check_alive()
        return await P2P.replicate(self._wait(self.dht.run_coroutine(_node_daemon_maddr, return_future=True)))

    def _count(self, kind: str) -> None:
        with self._calls_lock:
            self.calls[kind] += 1

    def publish(self, record: PeerRecord, ttl_s: float, timeout_s: float | None = None) -> bool:
        self._check_alive()
        self._count("publish")
        return bool(self._wait(self.dht.store(peers_key(self.cfg.run_id), record.to_dict(), dht_time() + ttl_s,
                                              subkey=record.peer_id, return_future=True), timeout_s))

    def peers(self) -> list[PeerRecord]:
        """Live peers of the run (state joining or training), malformed records skipped and logged."""
        self._check_alive()
        self._count("peers")
        found = self._wait(self.dht.get(peers_key(self.cfg.run_id), latest=True, return_future=True))
        out, closed = [], 0
        if found is None or not isinstance(found.value, dict):
            return out
        for subkey, item in found.value.items():
            if self.cfg.admission is None and is_signed(item.value):
                closed += 1  # an admitted peer's record (signed_records.py): this open peer cannot join it
                continue
            try:
                rec = PeerRecord.from_dict(item.value)
            except (RecordError, TypeError) as exc:
                if (subkey, str(exc)) not in self._malformed:  # once each: peers() is polled
                    if len(self._malformed) > 1024:  # bounded, whatever others publish
                        self._malformed.clear()
                    self._malformed.add((subkey, str(exc)))
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
        self._check_alive()
        self._count("declare")
        at = dht_time()
        if not self._wait(self.dht.store(full, value, at + ttl_s, subkey=self.peer_id, return_future=True)):
            log.debug("the DHT did not take the declaration %s", key)
        return at

    def declared(self, key: str) -> dict[str, str]:
        return {k: value for k, (value, _) in self.declarations(key, 0.0).items()}

    def declarations(self, key: str, ttl_s: float) -> dict[str, tuple[str, float]]:
        """Subkey → (value, the DHT time it was declared at), for entries declared with this ttl_s."""
        self._check_alive()
        self._count("declarations")
        found = self._wait(self.dht.get(f"p2pdiloco/{self.cfg.run_id}/{key}", latest=True, return_future=True))
        if found is None or not isinstance(found.value, dict):
            return {}
        return {k: (v.value, v.expiration_time - ttl_s) for k, v in found.value.items()
                if isinstance(k, str) and isinstance(v.value, str)}

    def shutdown(self, timeout_s: float = SHUTDOWN_S) -> None:
        """Stop the DHT process and its p2pd, in at most about timeout_s + 2 seconds: hivemind's own
        shutdown (on a thread, since it may block), then SIGKILL for whatever is left."""
        start = time.monotonic()
        why = self.gone()
        if why is None:
            def stop() -> None:
                try:
                    self.dht.shutdown()
                except Exception as exc:  # leaving must never fail the peer's exit
                    log.warning("DHT shutdown: %s", exc)
            stopper = threading.Thread(target=stop, name="p2pdiloco-dht-shutdown", daemon=True)
            stopper.start()
            stopper.join(timeout_s)
        if self.dht.is_alive():  # stuck, or of no use without its p2pd (a signal to the process group)
            if why is None:
                log.warning("the DHT process did not stop within %.0fs; killing it", timeout_s)
            self.dht.kill()
            self.dht.join(1.0)
        self._stop_p2pd()
        atexit.unregister(self._stop_p2pd)  # done: the hook would only keep this object alive
        log.debug("DHT shut down in %.2fs", time.monotonic() - start)

    def _stop_p2pd(self) -> None:
        """A p2pd whose DHT process died or was killed is nobody's child any more: stop it here."""
        live = lambda: [pid for pid, started in self._p2pd
                        if (f := procfs.stat_fields(pid)) and f[procfs.STARTTIME] == started and f[procfs.STATE] != "Z"]
        for sig, wait_s in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 0.0)):
            pids = live()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while pids and live() and time.monotonic() < deadline:
                time.sleep(0.05)

