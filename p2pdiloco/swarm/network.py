"""Everything a peer does on the network, on its own thread: the DHT, the gRPC data plane, the
heartbeat, the averages, and the state download. The training thread sees only `SwarmAverager`
(the engine's `Averager`) and a few blocking calls with explicit timeouts.

Timeouts (all in `SwarmConfig`, swarm/config.py):
- `matchmaking_s`: how long a peer waits for the other live peers to declare a round;
- `reduce_timeout_s`: how long an owner waits for the parts of its span, and a member for an answer;
- `record_ttl_s`: a peer whose heartbeat stops is no longer listed after this;
- `join_timeout_s`: one state download attempt from one donor.
"""
from __future__ import annotations

import asyncio
import logging
import random
from concurrent.futures import Future

import torch

from ..averaging import AverageResult, Averager, SyncKey
from ..codecs import Encoded
from .config import SwarmConfig
from . import libp2p, reachability
from .control import ControlConfig, ControlPlane
from . import servers
from .channels import Channels
from .dataplane import Identity, RoundBook, Servicer, allreduce
from .servers import Servers
from .loop import BackgroundLoop
from .matchmaking import Member, form_group
from .records import PROTOCOL_VERSION, PeerRecord
from .state import StateError, download_state

log = logging.getLogger("p2pdiloco.network")


class Network:
    def __init__(self, cfg: SwarmConfig, config_hash: str, config_text: str, codec: str, state_provider):
        self.cfg, self.config_hash, self.config_text = cfg, config_hash, config_text
        self.loop = BackgroundLoop()
        self.control: ControlPlane | None = None
        self.servers: Servers | None = None
        self.p2p = None
        self.transport_note = ""  # what --transport auto found (reachability.py)
        self._spare_means: dict[tuple[str, int], torch.Tensor] = {}  # see average()
        self.group_sizes: dict[int, int] = {}  # averages completed, by group size
        self.matchmaking_s: list[float] = []  # each completed average's wait for its group
        self.status = {"state": "joining", "step": 0, "tokens": 0, "tokens_per_s": 0.0, "rounds": {}, "ends_at": 0.0}
        try:
            admission, self.trust = self._admission()
            self.control = ControlPlane(ControlConfig(cfg.run_id, cfg.initial_peers, cfg.host, cfg.dht_port,
                                                      admission.identity_path if admission else cfg.identity_path or None,
                                                      admission=admission))
            self.peer_id = self.control.peer_id
            if admission is None and cfg.initial_peers and self._closed_run_only():
                from .control import SwarmStartError
                raise SwarmStartError(f"run '{cfg.run_id}' is a closed run: its peers refuse peers without admission. "
                                      f"Make a request with `p2pdiloco keygen --peer DIR`, have the run's owner admit "
                                      f"it (`p2pdiloco admit`), and start this peer with --admission DIR")
            self.identity = Identity(cfg.run_id, config_hash, self.peer_id, codec,
                                     self.trust.cert_der if self.trust else b"")
            self.book = RoundBook(self.identity, cfg.reduce_timeout_s)
            self.channels = Channels(cfg.max_message_bytes, self.trust)
            # 30 s to serve, plus reachability.py's probe: twice at most a DHT read (15 s) and two peers.
            self.address = self.loop.call(self._serve(state_provider), timeout=120)
            self.me = Member(self.peer_id, self.address)
            self.publish()
            self._heartbeat = self.loop.submit(self._beat())
        except BaseException:
            self.close()
            raise

    def _admission(self):
        """(admission, Trust) of a closed run (admission.py, trust.py), or (None, None) for an open one."""
        cfg = self.cfg
        if not cfg.admission_dir:
            if cfg.host not in ("localhost", "::1") and not cfg.host.startswith("127."):
                log.warning("open run: any process that knows run id '%s' and reaches %s can join, read the model "
                            "and send parts; make it a closed run with --admission (docs/swarm.md, 'Closed runs')",
                            cfg.run_id, cfg.host)
            return None, None
        from .admission import load_admission
        from .trust import Trust
        admission = load_admission(cfg.admission_dir, cfg.identity_path, cfg.revoked_path)
        log.info("closed run: admitted as %s; every plane requires the run's admission", admission.peer_id)
        return admission, Trust(admission)

    def _closed_run_only(self) -> bool:
        """An open peer: are the run's live peers all a closed run's (whose records it cannot use)?"""
        try:
            return not self.control.peers() and self.control.closed_records > 0
        except TimeoutError:  # the DHT is slow: the join goes on and says so later, as before
            return False

    async def _serve(self, state_provider) -> str:
        servicer = Servicer(self.book, state_provider, self.trust)
        self.servers = Servers(servicer, self.cfg.max_message_bytes, self.cfg.reduce_timeout_s)
        port, bulk_port = await self.servers.start(self.cfg.host, self.cfg.port, self.cfg.bulk_port)
        # Every peer also serves (and can call) the libp2p transport, on the DHT's own daemon.
        self.p2p = await self.control.dht.replicate_p2p()
        self.channels.p2p = self.p2p
        await libp2p.serve(self.p2p, servicer, self.cfg.max_message_bytes)
        announce = self.cfg.announce_host or self.cfg.host
        mine = f"{announce}:{port}"  # the gRPC address is what probers dial
        if self.cfg.transport == "libp2p":
            return f"{libp2p.ADDRESS_PREFIX}{self.peer_id}"
        if self.cfg.transport == "auto" and self.cfg.initial_peers:
            for attempt in range(2):  # a second opinion before giving up on gRPC: probers may be busy
                records = await asyncio.get_running_loop().run_in_executor(None, self.control.peers)
                reachable, why = await reachability.check(self.channels, self.identity, records, mine)
                if reachable or attempt:
                    break
                await asyncio.sleep(reachability.RETRY_AFTER_S)
            self.transport_note = (f"transport auto: {mine} " + {True: "is reachable", None: "was not checked",
                                                                    False: "is NOT reachable"}[reachable] + f" ({why})")
            log.info(self.transport_note)
            if reachable is False:
                self.transport_note += "; averaging over libp2p instead"
                return f"{libp2p.ADDRESS_PREFIX}{self.peer_id}"
        return servers.address(announce, port, bulk_port)

    # ---- the peer record and its heartbeat
    def record(self) -> PeerRecord:
        s = self.status
        return PeerRecord(self.peer_id, self.address, self.maddrs(), PROTOCOL_VERSION, self.config_hash,
                          self.config_text, s["state"], int(s["step"]), int(s["tokens"]),
                          float(s["tokens_per_s"]), {str(k): int(v) for k, v in s["rounds"].items()},
                          float(s["ends_at"]))

    def publish(self) -> None:
        if not self.control.publish(self.record(), self.cfg.record_ttl_s):
            log.debug("the DHT did not take this peer's record (a newer one won); the next heartbeat retries")

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            try:
                await loop.run_in_executor(None, self.publish)
            except Exception as exc:  # a missed heartbeat is logged; the record's TTL covers a few
                log.warning("heartbeat failed: %s", exc)

    def maddrs(self) -> list[str]:
        """This peer's DHT addresses, the one others should use first: with --announce-host, that
        address (added if the daemon does not list it, as behind NAT or in a container)."""
        maddrs = self.control.maddrs()
        announce = self.cfg.announce_host
        if not announce or not maddrs:
            return maddrs
        proto = "ip4" if all(p.isdigit() for p in announce.split(".")) and announce.count(".") == 3 else "dns4"
        port, peer = maddrs[0].split("/tcp/", 1)[1].split("/p2p/", 1)
        mine = f"/{proto}/{announce}/tcp/{port}/p2p/{peer}"
        return [mine] + [m for m in maddrs if m != mine]

    def join_line(self) -> str:
        return f"p2pdiloco peer --run-id {self.cfg.run_id} --initial-peers {self.maddrs()[0]}"

    # ---- peers and averages
    def peers(self) -> list[PeerRecord]:
        return self.control.peers()

    def training_peers(self) -> list[str]:
        return [r.peer_id for r in self.control.peers() if r.state == "training" and r.config_hash == self.config_hash]

    def averager(self) -> Averager:
        return SwarmAverager(self)

    async def average(self, key: SyncKey, encoded: Encoded, weight: float) -> AverageResult:
        c = self.cfg
        group = await form_group(self.control, key, self.me, self.training_peers, c.group_size, c.matchmaking_s)
        # The mean is decoded into the previous mean of the same fragment: the engine is done with a
        # mean before it submits that fragment's next average (streaming.py settles it first). An
        # average still running after its caller gave up took the buffer with it; this one then
        # gets a fresh one.
        spare = self._spare_means.pop((key.kind, key.index), None)
        result = await allreduce(self.book, self.channels, group, encoded, weight, c.reduce_timeout_s, out=spare)
        self._spare_means[(key.kind, key.index)] = result.mean
        self.group_sizes[group.size] = self.group_sizes.get(group.size, 0) + 1
        self.matchmaking_s.append(round(group.waited_s, 4))
        log.debug("%s %d round %d: averaged with %d peer(s) (matchmaking %.2fs)", key.kind, key.index, key.round,
                 len(result.participants), group.waited_s)
        return result

    def download(self, donors: list[PeerRecord], fragments: set[int] | None = None) -> bytes:
        """The state of the first donor that gives a complete, verified copy."""
        errors = []
        for rec in random.sample(donors, len(donors)):
            try:
                return self.loop.call(self._download(rec.address, fragments), timeout=self.cfg.join_timeout_s + 5)
            except (StateError, TimeoutError, asyncio.TimeoutError) as exc:
                log.warning("state download from %s failed: %s", rec.peer_id[-8:], exc)
                errors.append(f"{rec.peer_id[-8:]}: {exc}")
        raise StateError("no live peer gave this newcomer its state (" + "; ".join(errors) + ")")

    async def _download(self, address: str, fragments: set[int] | None) -> bytes:
        stub = self.channels.stub(address)  # channels belong to the loop: make them on it
        return await download_state(stub, self.identity.caller(), self.cfg.join_timeout_s, self.cfg.max_state_bytes,
                                    fragments)

    # ---- leaving
    def close(self) -> None:
        """Leave: mark the record 'left' so nobody waits for this peer, stop serving, stop the DHT."""
        if self.control is not None and self.servers is not None:
            self.status["state"] = "left"
            try:
                self.publish()
            except Exception as exc:
                log.warning("could not mark this peer as left: %s", exc)
        if self.servers is not None:
            try:
                self.loop.call(self._stop_serving(), timeout=5)
            except Exception as exc:
                log.warning("data plane shutdown: %s", exc)
        self.loop.stop()
        if self.control is not None:
            self.control.shutdown()
            self.control = None

    async def _stop_serving(self) -> None:
        await self.servers.stop()
        await self.channels.close()
        if self.p2p is not None:
            await self.p2p.shutdown()


class SwarmAverager(Averager):
    def __init__(self, net: Network):
        self.net = net

    def submit(self, key: SyncKey, encoded: Encoded, weight: float) -> "Future[AverageResult]":
        c = self.net.cfg
        # The whole average is bounded even if a remote peer stalls every step of it.
        bound = c.matchmaking_s + c.reduce_timeout_s + 10
        return self.net.loop.submit(asyncio.wait_for(self.net.average(key, encoded, weight), bound))
