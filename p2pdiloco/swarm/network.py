"""Everything a peer does on the network, on its own thread: the DHT, the gRPC data plane, the
heartbeat, the averages, and the state download. The training thread sees only `SwarmAverager`
(the engine's `Averager`) and a few blocking calls with explicit timeouts.

Timeouts (all in `SwarmConfig`, swarm/config.py):
- `matchmaking_s`: how long a peer waits for the other live peers to declare a round;
- `reduce_timeout_s`: how long an owner waits for the parts of its span, and a member for an answer;
- `record_ttl_s`: a peer whose heartbeat stops is no longer listed after this;
- `join_timeout_s`: one state download attempt (from up to `VERIFY_DONORS` donors at once).

Leaving (`close`) is bounded as a whole, whatever state the DHT is in: a dead DHT process (killed,
or signalled with the whole process group) is skipped at once, a live one gets `LEAVE_S` to take the
`left` record, the data plane `STOP_S` to stop, and the DHT its bounded shutdown (control.py).
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import Future

import torch

from ..aggregation import AggregateConfig
from ..averaging import AverageResult, Averager, SyncKey
from ..codecs import Encoded
from .config import SwarmConfig
from . import libp2p, reachability
from .control import ControlConfig, ControlPlane, SwarmStartError
from . import servers
from .adversary import Adversary
from .channels import Channels
from .dataplane import Identity, MeanRefused, RoundBook, Servicer, allreduce
from .servers import Servers
from .loop import BackgroundLoop
from .matchmaking import Member, form_group
from ..overlap import OverlapPolicy, steps_for
from .metrics import Metrics
from .records import MAX_REFUSED, PROTOCOL_VERSION, PeerRecord
from .state import StateError, agreed, download_state

VERIFY_DONORS = 3  # a newcomer downloads the state from this many donors at once and compares them

log = logging.getLogger("p2pdiloco.network")

LEAVE_S = 2.0  # the `left` record: a courtesy (the record expires anyway), not worth a long wait
STOP_S = 5.0  # stopping the data plane's servers and channels


def start_control(cfg: SwarmConfig) -> ControlPlane:
    """The peer's DHT node, started before the rest so a newcomer can read the run's config first.
    With --admission it is a closed run's (admission.py): its records signed, strangers' refused;
    an open peer that finds only a closed run's peers says so and stops."""
    admission = _admission(cfg)
    control = ControlPlane(ControlConfig(cfg.run_id, cfg.initial_peers, cfg.host, cfg.dht_port,
                                         admission.identity_path if admission else cfg.identity_path or None,
                                         admission=admission))
    if admission is None and cfg.initial_peers and _closed_run_only(control):
        control.shutdown()
        raise SwarmStartError(f"run '{cfg.run_id}' is a closed run: its peers refuse peers without admission. "
                              f"Make a request with `p2pdiloco keygen --peer DIR`, have the run's owner admit "
                              f"it (`p2pdiloco admit`), and start this peer with --admission DIR")
    return control


def _admission(cfg: SwarmConfig):
    """A closed run's admission (admission.py), or None for an open run."""
    if not cfg.admission_dir:
        if cfg.host not in ("localhost", "::1") and not cfg.host.startswith("127."):
            log.warning("open run: any process that knows run id '%s' and reaches %s can join, read the model "
                        "and send parts; make it a closed run with --admission (docs/swarm.md, 'Closed runs')",
                        cfg.run_id, cfg.host)
        return None
    from .admission import load_admission
    admission = load_admission(cfg.admission_dir, cfg.identity_path, cfg.revoked_path)
    log.info("closed run: admitted as %s; every plane requires the run's admission", admission.peer_id)
    return admission


def _closed_run_only(control: ControlPlane) -> bool:
    """An open peer: are the run's live peers all a closed run's (whose records it cannot use)?"""
    try:
        return not control.peers() and control.closed_records > 0
    except TimeoutError:  # the DHT is slow: the join goes on and says so later, as before
        return False


class Network:
    def __init__(self, cfg: SwarmConfig, config_hash: str, config_text: str, codec: str, state_provider,
                 aggregate: AggregateConfig = AggregateConfig(), status: dict | None = None,
                 *, run_config: dict, control: ControlPlane | None = None, metrics: Metrics | None = None):
        """`run_config`: records.shared_config() of the run, published for newcomers to adopt.
        `control`: a DHT node already started (start_control), which this Network now owns.
        `status`: a resumed peer's counters, for its very first record.
        `metrics`: where rounds and bytes are counted (metrics.py); the peer's, or one of its own."""
        self.cfg, self.config_hash, self.config_text, self.aggregate = cfg, config_hash, config_text, aggregate
        self.metrics = metrics if metrics is not None else Metrics(cfg.run_id)
        self.run_config = run_config
        self.loop = BackgroundLoop()
        self.control: ControlPlane | None = control
        self.servers: Servers | None = None
        self.p2p = None
        self.transport_note = ""  # what --transport auto found (reachability.py)
        self._spare_means: dict[tuple[str, int], torch.Tensor] = {}  # see average()
        self.group_sizes: dict[int, int] = {}  # averages completed, by group size
        self.matchmaking_s: list[float] = []  # each completed average's wait for its group
        self.transfer_s: list[float] = []  # each completed average's reduce-scatter + all-gather
        # Rounds whose matchmaking began before their Δ was ready (`ahead`): key -> its form_group,
        # a concurrent Future on the loop. Inserted by the training thread, taken by `average`.
        self._prepared: dict[SyncKey, Future] = {}
        self.prepared_rounds = 0  # averages whose group was formed ahead
        # Of each completed average, the matchmaking still to wait for once its Δ was handed in:
        # all of it for a group formed then, what was left of it for one formed ahead.
        self.matchmaking_left_s: list[float] = []
        self._lead_samples: list[float] = []  # matchmaking times that size the lead (see `ahead`)
        self._overlap = OverlapPolicy()
        self.averaged_with: set[str] = set()  # peers whose parts were in an average this peer applied
        self._refusals: dict[str, list[float]] = {}  # owner -> when its means failed my check
        self.excluded: set[str] = set()  # peers most others refuse: left out of every group
        self._excluded_said: set[str] = set()
        self.status = {"state": "joining", "step": 0, "tokens": 0, "tokens_per_s": 0.0, "rounds": {}, "ends_at": 0.0}
        self.status.update(status or {})  # a resumed peer's counters, in its very first record
        self.trust = None  # a closed run's TLS and admission checks (trust.py); None: an open run
        try:
            if self.control is None:
                self.control = start_control(cfg)
            self.peer_id = self.control.peer_id
            admission = self.control.cfg.admission
            if admission is not None:
                from .trust import Trust
                self.trust = Trust(admission, cfg.bulk_encryption)
            self.identity = Identity(cfg.run_id, config_hash, self.peer_id, codec,
                                     self.trust.cert_der if self.trust else b"")
            self.book = RoundBook(self.identity, cfg.reduce_timeout_s, aggregate)
            self.adversary = Adversary(cfg.adversary, seed=int.from_bytes(self.peer_id.encode()[-4:], "little")) if cfg.adversary else None
            if self.adversary is not None:
                log.warning("this peer is an ADVERSARY (%s): it lies to the others on purpose (bench attack)", cfg.adversary)
                self.book.poison = self.adversary.mean
            self.channels = Channels(cfg.max_message_bytes, self.trust, self.metrics.traffic)
            # 30 s to serve, plus reachability.py's probe: twice at most a DHT read (15 s) and two peers.
            self.address = self.loop.call(self._serve(state_provider), timeout=120)
            self.me = Member(self.peer_id, self.address)
            self.publish()
            self._heartbeat = self.loop.submit(self._beat())
        except BaseException:
            self.close()
            raise

    async def _serve(self, state_provider) -> str:
        servicer = Servicer(self.book, state_provider, self.trust, self.metrics.traffic)
        self.servers = Servers(servicer, self.cfg.max_message_bytes, self.cfg.reduce_timeout_s)
        port, bulk_port = await self.servers.start(self.cfg.host, self.cfg.port, self.cfg.bulk_port)
        # Every peer also serves (and can call) the libp2p transport, on the DHT's own daemon.
        self.p2p = await self.control.replicate_p2p()
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
                          float(s["ends_at"]), refused=self.refused(), run_config=self.run_config)

    def publish(self, timeout_s: float | None = None) -> None:
        if not self.control.publish(self.record(), self.cfg.record_ttl_s, timeout_s):
            log.debug("the DHT did not take this peer's record (a newer one won); the next heartbeat retries")

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            if (why := self.control.gone()) is not None:  # nothing will ever answer: say so once, loudly
                log.error("%s: this peer can no longer find the others or be found; it trains alone from now on "
                          "(every round is skipped). Stop it (SIGTERM: it writes its checkpoint) and start it again "
                          "with a live peer's join line", why)
                return
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
        """Live training peers of this run, less those most of the others refuse (`excluded`)."""
        records = [r for r in self.control.peers() if r.state == "training" and r.config_hash == self.config_hash]
        self.excluded = excluded(records, self.peer_id)
        if self.excluded - self._excluded_said:
            log.warning("leaving out peer(s) %s: most peers refused their means", ", ".join(sorted(self.excluded)))
            self._excluded_said |= self.excluded
        return [r.peer_id for r in records if r.peer_id not in self.excluded]

    def refuse(self, owner: str) -> None:
        """`owner`'s mean failed this peer's check: after REFUSE_AFTER such rounds in REFUSE_FOR_S,
        this peer's record lists it as refused (and the others may leave it out)."""
        now = time.monotonic()
        times = [t for t in self._refusals.get(owner, []) if now - t < REFUSE_FOR_S] + [now]
        self._refusals[owner] = times
        if len(times) == REFUSE_AFTER:
            log.warning("refusing peer %s: %d of its means failed this peer's check", owner[-8:], len(times))

    def refused(self) -> list[str]:
        now = time.monotonic()
        return sorted(p for p, times in self._refusals.items()
                      if len([t for t in times if now - t < REFUSE_FOR_S]) >= REFUSE_AFTER)[:MAX_REFUSED]

    def averager(self, device: torch.device | None = None) -> Averager:
        """The engine's averager; `device`: where it trains, if not the CPU (the means' encoded spans
        are copied there as they arrive, for the engine to decode: streaming.Worker._mean_here)."""
        return SwarmAverager(self, device)

    def ahead(self, key: SyncKey, steps: int, step_s: float, ceiling: int) -> None:
        """Begin `key`'s matchmaking now if it comes due within the steps that the recent rounds'
        matchmaking took (overlap.declare_ahead_steps's rule, from this peer's own measurements),
        so only the transfer is left when the Δ is sent. Declaring commits this peer to the round
        a little earlier; it never declares more than a quarter of the matchmaking window ahead
        (τ takes half: overlap.choose_tau), so peers that size their lead differently still
        declare within one window of each other."""
        c = self.cfg
        if c.declare_ahead == 0 or key in self._prepared or step_s <= 0:
            return
        if c.declare_ahead > 0:
            lead = min(c.declare_ahead, ceiling)
        else:
            lead = steps_for(self._lead_samples, step_s, ceiling, self._overlap, floor=1)
        lead = min(lead, max(1, int(c.matchmaking_s / 4 / step_s)))
        if steps > lead:
            return
        self._prepared[key] = self.loop.submit(asyncio.wait_for(self._form(key), c.matchmaking_s + 30))
        # Rounds this peer will never send (it stopped) are dropped after a while: their groups' owners time out.
        for old in [k for k in self._prepared if k.index == key.index and k.round < key.round - 1]:
            self._prepared.pop(old).cancel()

    async def _form(self, key: SyncKey):
        c = self.cfg
        return await form_group(self.control, key, self.me, self.training_peers, c.group_size, c.matchmaking_s,
                                excluded=lambda: self.excluded)

    async def average(self, key: SyncKey, encoded: Encoded, weight: float,
                      device: torch.device | None = None) -> AverageResult:
        c = self.cfg
        started = time.monotonic()
        if self.adversary is not None:
            encoded, weight = self.adversary.part(key, encoded, weight)
        prepared = self._prepared.pop(key, None)
        t0 = time.perf_counter()
        group = await (asyncio.wrap_future(prepared) if prepared is not None else self._form(key))
        left = time.perf_counter() - t0
        # The lead is sized from whole matchmakings, not from those formed ahead (which include
        # waiting for the others to reach the round: sized from those, the lead would only grow),
        # unless one formed ahead still kept this peer waiting: then its lead was too short.
        if prepared is None or left > 0.05:
            self._lead_samples = (self._lead_samples + [group.waited_s])[-self._overlap.window:]
        t0 = time.perf_counter()
        # The mean is decoded into the previous mean of the same fragment: the engine is done with a
        # mean before it submits that fragment's next average (streaming.py settles it first). An
        # average still running after its caller gave up took the buffer with it; this one then
        # gets a fresh one.
        spare = self._spare_means.pop((key.kind, key.index), None)
        try:
            result = await allreduce(self.book, self.channels, group, encoded, weight, c.reduce_timeout_s, out=spare,
                                     check_ratio=self.aggregate.check_ratio, device=device)
        except MeanRefused as exc:
            self.refuse(exc.owner)
            self.metrics.round_refused()
            raise
        self._spare_means[(key.kind, key.index)] = result.mean
        self.group_sizes[group.size] = self.group_sizes.get(group.size, 0) + 1
        self.averaged_with.update(p for p in result.participants if p != self.peer_id)
        self.matchmaking_s.append(round(group.waited_s, 4))
        self.metrics.round_done(time.monotonic() - started, group.waited_s, group.size)
        self.transfer_s.append(round(time.perf_counter() - t0, 4))
        self.matchmaking_left_s.append(round(left, 4))
        self.prepared_rounds += prepared is not None
        log.debug("%s %d round %d: averaged with %d peer(s) (matchmaking %.2fs)", key.kind, key.index, key.round,
                 len(result.participants), group.waited_s)
        return result

    def download(self, donors: list[PeerRecord], fragments: set[int] | None = None) -> tuple[bytes, int]:
        """The run's state and how many donors agreed on it: downloaded from up to `VERIFY_DONORS`
        donors at once, and taken only if at least two of them agree on every global copy
        (state.agreed). A run with a single live donor has nobody to compare with: its state is
        taken, with a warning."""
        picked = random.sample(donors, min(len(donors), VERIFY_DONORS))
        results = self.loop.call(self._download_all(picked, fragments), timeout=self.cfg.join_timeout_s + 5)
        blobs, errors = {}, []
        for rec, got in zip(picked, results):
            if isinstance(got, bytes):
                blobs[rec.peer_id] = got
            else:
                log.warning("state download from %s failed: %s", rec.peer_id[-8:], got)
                errors.append(f"{rec.peer_id[-8:]}: {got}")
        if not blobs:
            raise StateError("no live peer gave this newcomer its state (" + "; ".join(errors) + ")")
        if len(blobs) == 1:
            if len(donors) > 1:
                raise StateError(f"only 1 of {len(picked)} donors gave its state; no second copy to check it against "
                                 f"({'; '.join(errors)})")
            log.warning("one live donor: its state is taken without a second copy to check it against")
            return next(iter(blobs.values())), 1
        _, blob, agreeing = agreed(blobs, fragments)
        return blob, agreeing

    async def _download_all(self, donors: list[PeerRecord], fragments: set[int] | None) -> list:
        async def one(rec):
            try:
                return await self._download(rec.address, fragments)
            except (StateError, asyncio.TimeoutError) as exc:
                return exc
        return await asyncio.gather(*(one(r) for r in donors))

    async def _download(self, address: str, fragments: set[int] | None) -> bytes:
        stub = self.channels.stub(address)  # channels belong to the loop: make them on it
        blob = await download_state(stub, self.identity.caller(), self.cfg.join_timeout_s, self.cfg.max_state_bytes,
                                    fragments)
        self.metrics.traffic.add("state", received=len(blob))
        return blob

    # ---- leaving
    def close(self) -> None:
        """Leave: mark the record 'left' so nobody waits for this peer, stop serving, stop the DHT.
        Bounded (see the module's docstring), and never raises: leaving must not lose the exit."""
        if self.control is not None and self.servers is not None:
            self.status["state"] = "left"
            why = self.control.gone()
            try:
                if why is None:
                    self.publish(timeout_s=LEAVE_S)
                else:
                    log.warning("not marking this peer as left: %s (its record expires by itself)", why)
            except Exception as exc:
                log.warning("could not mark this peer as left: %s", exc)
        if self.servers is not None:
            try:
                self.loop.call(self._stop_serving(), timeout=STOP_S)
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


# A peer whose means fail my check this many times within REFUSE_FOR_S is listed as refused in my
# record. Twice, not once: a single refusal may be a borderline honest mean; a lying owner fails
# every round it owns a span in.
REFUSE_AFTER, REFUSE_FOR_S = 2, 600.0


def excluded(records: list[PeerRecord], me: str) -> set[str]:
    """Peers that more than half of the other live training peers list as refused. One liar's
    votes cannot exclude an honest peer in a swarm of three or more; in a pair, each peer trusts
    its own judgment. A pure function of the records, so peers that read the same ones agree."""
    out = set()
    ids = {r.peer_id for r in records} | {me}
    for p in ids:
        voters = [r for r in records if r.peer_id != p]
        votes = sum(1 for r in voters if p in r.refused)
        if voters and 2 * votes > len(voters):
            out.add(p)
    return out


class SwarmAverager(Averager):
    def __init__(self, net: Network, device: torch.device | None = None):
        self.net, self.device = net, device
        # τ steps within half the matchmaking window: a peer never runs so far ahead that the
        # slowest one declares after the window closed (overlap.choose_tau).
        self.overlap_limit_s = net.cfg.matchmaking_s / 2

    def submit(self, key: SyncKey, encoded: Encoded, weight: float) -> "Future[AverageResult]":
        c = self.net.cfg
        # The whole average is bounded even if a remote peer stalls every step of it.
        bound = c.matchmaking_s + c.reduce_timeout_s + 10
        return self.net.loop.submit(asyncio.wait_for(self.net.average(key, encoded, weight, self.device), bound))

    def ahead(self, key: SyncKey, steps: int, step_s: float, ceiling: int) -> None:
        self.net.ahead(key, steps, step_s, ceiling)
