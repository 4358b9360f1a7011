"""A WAN on one Linux machine: one network namespace per peer, each behind its own shaped link
(links.py has the link model), all joined by one switch. Needs root and iproute2;
`unavailable_reason()` says what is missing, so callers can skip with that message.

What a bed creates (names carry a token of this bed, namespaces also the owner's pid, so two beds
never collide and `sweep_stale()` can tell a dead owner's leftovers):
- per peer i: namespace `p2w-<token>-<pid>-<i>`, loopback up, the veth end `p2w<token>n<i>` with
  the i-th address of the subnet (10.77.0.1, .2, ...; nothing in the root namespace gets an
  address), and static neighbour entries for the other peers (no ARP on a lossy link);
- the veth's other end `p2w<token>h<i>` in the root namespace, on the switch;
- the switch: the bridge `p2w<token>b` (backend `netem`) or, on kernels built without sch_netem
  (the dev VM's), wire.py, a userspace switch process (backend `wire`).
Shaping, the same link model in both: netem with the rate, half the delay and half the loss on
both ends of every veth (the namespace end's egress is the peer's uplink, the switch end's its
downlink); or tbf with the rate on both ends, and wire.py adding the delay and the loss.

Teardown (`close()`, on errors, Ctrl-C and SIGTERM too): every process started with `spawn()` is
stopped with its process group, anything else left inside a namespace is killed, the switch
process stopped, and the veths, namespaces and bridge deleted; then it checks nothing is left.
"""
from __future__ import annotations

import ipaddress
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time

from .. import procfs
from .host import (PREFIX, BedError, kill_namespace, killpg, links, live_members, namespaces, netem_available, run,
                   sweep_stale, unavailable_reason)
from .links import QUEUE_S, BedConfig

class NetnsBed:
    """`with NetnsBed(BedConfig(4, LinkSpec("20mbit", 25))) as bed: bed.spawn(i, argv, ...)`."""

    def __init__(self, cfg: BedConfig, grace_s: float = 10.0):
        self.cfg, self.grace_s = cfg.validate(), grace_s
        reason = unavailable_reason()
        if reason:
            raise BedError(reason)
        if cfg.backend == "netem" and not netem_available():
            raise BedError("backend netem: this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM); use wire or auto")
        self.backend = "netem" if cfg.backend == "netem" or (cfg.backend == "auto" and netem_available()) else "wire"
        t, n = secrets.token_hex(3), cfg.peers
        net = ipaddress.IPv4Network(cfg.subnet)
        self.token, self._prefixlen = t, net.prefixlen
        self.addresses = [str(net.network_address + 1 + i) for i in range(n)]
        self.namespaces = [f"{PREFIX}-{t}-{os.getpid()}-{i}" for i in range(n)]
        self.host_ifs = [f"{PREFIX}{t}h{i}" for i in range(n)]
        self.ns_ifs = [f"{PREFIX}{t}n{i}" for i in range(n)]
        self.bridge = f"{PREFIX}{t}b"
        self.macs = [f"02:77:{t[0:2]}:{t[2:4]}:{t[4:6]}:{i:02x}" for i in range(n)]
        self.wire: subprocess.Popen | None = None
        self._procs: list[subprocess.Popen] = []
        self._made_ns: list[str] = []
        self._made_links: list[str] = []
        self._saved_signals: dict = {}

    # ---- building
    def __enter__(self) -> "NetnsBed":
        if threading.current_thread() is threading.main_thread():
            # A SIGTERMed harness must still tear down: make SIGTERM raise as Ctrl-C does.
            self._saved_signals[signal.SIGTERM] = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            sweep_stale()
            self._build()
        except BaseException:
            self.close(raise_errors=False)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(raise_errors=exc_type is None)

    def _build(self) -> None:
        c = self.cfg
        for ns in self.namespaces:  # namespaces first: sweep_stale() spares links whose token has a live one
            run(["ip", "netns", "add", ns])
            self._made_ns.append(ns)
        if self.backend == "netem":
            run(["ip", "link", "add", self.bridge, "type", "bridge"])
            self._made_links.append(self.bridge)
            run(["ip", "link", "set", self.bridge, "addrgenmode", "none"], check=False)  # no IPv6 chatter
            run(["ip", "link", "set", self.bridge, "up"])
        qdisc = self._qdisc()  # the same shaping on both ends of every veth
        for i, (ns, h, n) in enumerate(zip(self.namespaces, self.host_ifs, self.ns_ifs)):
            run(["ip", "link", "add", h, "type", "veth", "peer", "name", n, "address", self.macs[i], "netns", ns])
            self._made_links.append(h)
            run(["ip", "link", "set", h, "addrgenmode", "none"], check=False)
            run(["ip", "-n", ns, "link", "set", n, "addrgenmode", "none"], check=False)
            master = ["master", self.bridge] if self.backend == "netem" else []
            run(["ip", "link", "set", h, "mtu", str(c.mtu), *master, "up"])
            # gso_max_segs 1: the stack sends MTU-sized packets, so loss and queueing act per packet
            # as on a real WAN, not on 64 KiB GSO bursts.
            lines = ["link set lo up", f"link set {n} mtu {c.mtu} gso_max_segs 1",
                     f"address add {self.addresses[i]}/{self._prefixlen} dev {n}", f"link set {n} up"]
            lines += [f"neigh replace {a} lladdr {m} dev {n} nud permanent"
                      for j, (a, m) in enumerate(zip(self.addresses, self.macs)) if j != i]
            run(["ip", "-n", ns, "-batch", "-"], input="\n".join(lines) + "\n")
            run(["tc", "-n", ns, "qdisc", "add", "dev", n, "root", *qdisc])
            run(["tc", "qdisc", "add", "dev", h, "root", *qdisc])
        if self.backend == "wire":
            self._start_wire()

    def _qdisc(self) -> list[str]:
        link, rate = self.cfg.link, self.cfg.link.bytes_per_s
        if self.backend == "wire":  # the rate only; the switch adds delay and loss
            burst = max(2 * (self.cfg.mtu + 14), int(rate * 0.001))  # two frames, or 1 ms at the rate
            return ["tbf", "rate", link.rate, "burst", str(burst), "latency", f"{QUEUE_S * 1000:.0f}ms"]
        # netem's limit counts the packets in its delay line too: the queue plus half the delay.
        limit = max(64, int((QUEUE_S + link.delay_ms / 2000) * rate / (self.cfg.mtu + 14)))
        args = ["netem", "limit", str(limit), "rate", link.rate]
        if link.delay_ms:
            args += ["delay", f"{link.delay_ms * 500:.0f}us"]
        if link.loss_pct:
            args += ["loss", "random", f"{link.half_loss * 100:.6f}%"]
        return args

    def _start_wire(self, timeout_s: float = 20.0) -> None:
        link = self.cfg.link
        spec = {"ports": [{"dev": h, "mac": m, "delay_s": link.delay_ms / 2000, "loss": link.half_loss}
                          for h, m in zip(self.host_ifs, self.macs)]}
        self.wire = subprocess.Popen([sys.executable, "-m", "p2pdiloco.wan.wire", json.dumps(spec)],
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        ready, _, _ = select.select([self.wire.stdout], [], [], timeout_s)
        line = self.wire.stdout.readline() if ready else ""
        if line.strip() != "ready":
            raise BedError(f"the test bed's switch (wire.py) did not start within {timeout_s:.0f}s: {line.strip()!r}")

    # ---- processes inside the namespaces
    def spawn(self, i: int, argv: list[str], **popen) -> subprocess.Popen:
        """Run argv inside peer i's namespace as its own process group; stop() and close() reap it."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespaces[i], *argv], start_new_session=True, **popen)
        self._procs.append(proc)
        return proc

    def stop(self, procs: list[subprocess.Popen], grace_s: float | None = None) -> None:
        """SIGTERM each process group, SIGKILL what is left after grace_s, and reap."""
        deadline = time.monotonic() + (self.grace_s if grace_s is None else grace_s)
        for p in procs:
            if p.poll() is None:
                killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            killpg(p.pid, signal.SIGKILL)  # the group's other members too (a DHT process, p2pd)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        # Forget what is stopped: once reaped, its pid (and so its group id) may be reused by an
        # unrelated process, which a later close() must never signal.
        gone = {p.pid for p in procs if p.poll() is not None and not live_members({p.pid})}
        self._procs = [p for p in self._procs if p.pid not in gone]

    def wire_cpu_s(self) -> float:
        """CPU seconds the userspace switch has used so far (0 with netem): its share of the machine."""
        if self.wire is None or self.wire.poll() is not None:
            return 0.0
        fields = procfs.stat_fields(self.wire.pid)
        return procfs.cpu_seconds(fields) if fields else 0.0

    # ---- teardown
    def close(self, raise_errors: bool = True) -> None:
        errors: list[str] = []
        main = threading.current_thread() is threading.main_thread()
        # A second Ctrl-C must not cut the teardown short; every step below is bounded.
        saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            self.stop(self._procs)
            for ns in self._made_ns:
                kill_namespace(ns)
            if self.wire is not None:
                self.stop([self.wire], grace_s=2.0)
            present = set(links())
            for link in reversed(self._made_links):  # a veth goes with its pair; the bridge last
                if link in present:
                    try:
                        run(["ip", "link", "del", link])
                    except BedError as exc:
                        errors.append(str(exc))
            for ns in self._made_ns:
                try:
                    run(["ip", "netns", "del", ns])
                except BedError as exc:
                    errors.append(str(exc))
            deadline = time.monotonic() + 5  # the kernel frees a namespace's devices asynchronously
            while self.leftovers() and time.monotonic() < deadline:
                time.sleep(0.1)
            errors += [f"still present: {x}" for x in self.leftovers()]
            self._made_ns, self._made_links = [], []
        finally:
            for s, handler in {**saved, **self._saved_signals}.items():
                signal.signal(s, handler)
            self._saved_signals = {}
        if errors:
            msg = "the WAN test bed's teardown failed: " + "; ".join(errors)
            if raise_errors:
                raise BedError(msg)
            print(f"p2pdiloco: warning: {msg}", file=sys.stderr)

    def leftovers(self) -> list[str]:
        """What of this bed still exists: namespaces, links, live processes of its process groups."""
        listed = namespaces()
        out = [f"namespace {ns}" for ns in self.namespaces if ns in listed]
        out += [f"link {name}" for name in links() if name.startswith(f"{PREFIX}{self.token}")]
        groups = {p.pid for p in self._procs + ([self.wire] if self.wire else [])}
        return out + [f"process {pid}" for pid in live_members(groups)]


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)
