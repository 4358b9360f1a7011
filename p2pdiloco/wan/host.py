"""The host side of the WAN test bed: bounded `ip`/`tc` commands, what this machine can build
(`unavailable_reason`, `netem_available`), the leftovers of beds whose owner died (`sweep_stale`),
and how busy the rest of a shared machine is (`OtherLoad`, `wait_quiet`).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import lru_cache

from .. import procfs

PREFIX = "p2w"  # every name a bed makes starts with it
CMD_TIMEOUT_S = 10.0  # one `ip`/`tc` command
STALE_NS = re.compile(r"^p2w-([0-9a-f]{6})-(\d+)-\d+$")  # p2w-<token>-<owner pid>-<peer>
BED_LINK = re.compile(r"^p2w([0-9a-f]{6})[hnb]\d*$")  # p2w<token>h<peer>, p2w<token>b


class BedError(RuntimeError):
    pass


def run(argv: list[str], input: str | None = None, check: bool = True) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=CMD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BedError(f"`{' '.join(argv)}` did not finish within {CMD_TIMEOUT_S:.0f}s") from None
    except OSError as exc:
        raise BedError(f"`{' '.join(argv)}`: {exc}") from None
    if r.returncode and check:
        raise BedError(f"`{' '.join(argv)}` failed: {(r.stderr or r.stdout).strip()}")
    return r.stdout


@lru_cache(maxsize=1)
def _probe() -> tuple[str | None, bool]:
    """(why no bed can be built here, or None; whether the kernel has netem), from a throwaway namespace."""
    if not sys.platform.startswith("linux"):
        return f"the WAN test bed needs Linux network namespaces; this is {sys.platform}", False
    if os.geteuid() != 0:
        return "the WAN test bed needs root (it creates network namespaces, veths and qdiscs)", False
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the WAN test bed needs `{tool}` from iproute2 (apt-get install iproute2)", False
    ns = f"{PREFIX}-{secrets.token_hex(3)}-{os.getpid()}-0"  # a bed's name: swept if this process dies mid-probe
    try:
        run(["ip", "netns", "add", ns])
        run(["ip", "-n", ns, "link", "add", "p2wprobe0", "type", "veth", "peer", "name", "p2wprobe1"])
        run(["tc", "-n", ns, "qdisc", "add", "dev", "p2wprobe0", "root", "tbf", "rate", "1mbit", "burst", "4k",
             "latency", "50ms"])
        run(["tc", "-n", ns, "qdisc", "add", "dev", "p2wprobe1", "root", "netem", "delay", "1ms"], check=False)
        netem = "qdisc netem " in run(["tc", "-n", ns, "qdisc", "show", "dev", "p2wprobe1"], check=False)
    except BedError as exc:
        return f"cannot build the WAN test bed here (no permission, or no veth/tbf in this kernel): {exc}", False
    finally:
        run(["ip", "netns", "del", ns], check=False)
    return None, netem


def unavailable_reason() -> str | None:
    """None when this process can build a bed; otherwise one line that says why not."""
    return _probe()[0]


def netem_available() -> bool:
    return _probe()[1]


def namespaces() -> set[str]:
    return {line.split()[0] for line in run(["ip", "netns", "list"], check=False).splitlines() if line.split()}


def links() -> list[str]:
    """Names of the root namespace's network devices."""
    return [line.split(":")[1].strip().split("@")[0] for line in run(["ip", "-o", "link", "show"]).splitlines()]


def kill_namespace(ns: str, timeout_s: float = 5.0) -> None:
    """SIGKILL whatever still runs inside a namespace (a process that left our process groups)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = [int(p) for p in run(["ip", "netns", "pids", ns], check=False).split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def sweep_stale() -> list[str]:
    """Delete what beds of dead owners left (a SIGKILLed harness): their namespaces, the processes
    in them, and every bed link whose token has no live namespace (a bed makes its namespaces
    before its links, so a bed being built is never swept). Returns the names removed."""
    removed, live = [], set()
    for name in sorted(namespaces()):
        m = STALE_NS.match(name)
        if m and _alive(int(m.group(2))):
            live.add(m.group(1))
        elif m:
            kill_namespace(name)
            run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    for link in links():
        m = BED_LINK.match(link)
        if m and m.group(1) not in live:
            run(["ip", "link", "del", link], check=False)
            removed.append(link)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def live_members(groups: set[int]) -> list[int]:
    """Live (not zombie) processes whose process group is one of `groups`."""
    out = []
    for pid in procfs.pids():
        fields = procfs.stat_fields(pid)
        if fields and fields[procfs.STATE] != "Z" and int(fields[procfs.PGRP]) in groups:
            out.append(pid)
    return out


class OtherLoad:
    """CPU seconds used by processes outside the bed's namespaces other than ours, sampled every
    `every_s` in a thread: on a shared machine, whether a measurement had the cores to itself.
    (A process that starts and ends between two samples is missed; kernel threads are not counted.)"""

    def __init__(self, exclude: set[int], every_s: float = 2.0):
        self.exclude, self.every_s, self.cpu_s = exclude, every_s, 0.0
        self._root_ns = os.readlink("/proc/self/ns/net")
        self._seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._sample(count=False)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self, count: bool = True) -> None:
        for pid in procfs.pids():
            if pid in self.exclude:
                continue
            try:
                if os.readlink(f"/proc/{pid}/ns/net") != self._root_ns:
                    continue  # the bed's peers
            except OSError:
                continue
            fields = procfs.stat_fields(pid)
            if fields is None or pid == 2 or int(fields[procfs.PPID]) == 2:
                continue  # gone, or a kernel thread: ksoftirqd moves the bed's own packets
            cpu = procfs.cpu_seconds(fields)
            if count:
                self.cpu_s += cpu - self._seen.get(pid, 0.0)  # a process new since the last sample: all of it
            self._seen[pid] = cpu

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(self.every_s + 5)
        self._sample()
        return self.cpu_s


def wait_quiet(max_s: float, window_s: float = 10.0, busy: float = 0.1) -> float:
    """Wait (at most max_s) for a window_s window in which the machine's CPUs are under `busy` busy;
    between methods the bed runs nothing, so that is other processes. Returns the seconds waited."""
    def jiffies() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v) - v[3] - v[4], sum(v)  # (busy, total): all but idle and iowait

    start = time.monotonic()
    while time.monotonic() - start < max_s:
        b0, t0 = jiffies()
        time.sleep(window_s)
        b1, t1 = jiffies()
        if (b1 - b0) / max(t1 - t0, 1) < busy:
            break
    return time.monotonic() - start
