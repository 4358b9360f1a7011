"""Resource samples of running peer processes, for `bench swarm` and `bench soak`.

A peer is three processes: the peer itself (training, data plane), its DHT process (forked by
hivemind) and that process's `p2pd` daemon (libp2p). `Sampler` reads, every `interval_s` on its
own thread, each watched peer's process tree with psutil: resident memory and open file
descriptors of the peer process and of the whole tree, and p2pd's I/O — its read + written bytes
(`read_chars + write_chars` of /proc/<pid>/io), all the DHT's traffic: libp2p to other daemons and
the local socket to its own DHT process. Reading /proc costs a few files per process per sample,
nothing the peers notice at 1-5 s intervals.

A frozen peer (SIGSTOP) is still sampled: its memory and descriptors are still held.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Sample:
    t: float  # time.monotonic() when taken
    rss: int  # bytes resident, the peer process
    rss_tree: int  # the peer, its DHT process and p2pd (and any other child)
    fds: int  # open file descriptors of the peer process
    fds_tree: int
    p2pd_io: int  # bytes p2pd has read + written so far (-1: no p2pd found)


def sample_tree(proc: psutil.Process, t: float | None = None) -> Sample | None:
    """One sample of `proc` and its descendants; None once `proc` is gone. Children that exit
    while being read are skipped (a tree changes under us: a DHT process that is starting)."""
    t = time.monotonic() if t is None else t
    try:
        with proc.oneshot():
            rss, fds = proc.memory_info().rss, proc.num_fds()
        children = proc.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    rss_tree, fds_tree, p2pd_io = rss, fds, -1
    for child in children:
        try:
            with child.oneshot():
                rss_tree += child.memory_info().rss
                fds_tree += child.num_fds()
                if child.name() == "p2pd":
                    io = child.io_counters()
                    p2pd_io = max(p2pd_io, 0) + io.read_chars + io.write_chars
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return Sample(t, rss, rss_tree, fds, fds_tree, p2pd_io)


class Sampler:
    """Samples every watched process tree every `interval_s` until `stop()`. `samples[name]` is
    that peer's list, oldest first; watching a new pid under a name already used starts a new list
    under `name` (the old one stays in `history`)."""

    def __init__(self, interval_s: float = 2.0):
        if interval_s <= 0:
            raise ValueError(f"the sampling interval must be positive, got {interval_s}")
        self.interval_s = interval_s
        self.samples: dict[str, list[Sample]] = {}
        self.history: list[tuple[str, list[Sample]]] = []  # lists of trees no longer watched
        self.load: list[tuple[float, float]] = []  # (time, 1-minute load average) per round of samples
        self._procs: dict[str, psutil.Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="p2pdiloco-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            if name in self.samples:
                self.history.append((name, self.samples.pop(name)))
            try:
                self._procs[name] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                return
            self.samples[name] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            with self._lock:
                procs = list(self._procs.items())
            for name, proc in procs:
                s = sample_tree(proc, t)
                if s is not None:
                    with self._lock:
                        if self._procs.get(name) is proc:
                            self.samples[name].append(s)
            self.load.append((t, psutil.getloadavg()[0]))
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - t)))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def between(samples: list[Sample], start: float, end: float) -> list[Sample]:
    """The samples taken in [start, end] (time.monotonic())."""
    return [s for s in samples if start <= s.t <= end]


def growth(samples: list[Sample], field: str = "rss") -> dict:
    """First and last value of `field` over `samples`, the largest, and the growth from first to
    last in percent (the issue's "RSS growth over the run")."""
    if not samples:
        return {"start": None, "end": None, "max": None, "growth_pct": None, "samples": 0}
    first, last = getattr(samples[0], field), getattr(samples[-1], field)
    return {"start": first, "end": last, "max": max(getattr(s, field) for s in samples),
            "growth_pct": round(100.0 * (last - first) / first, 3) if first else None, "samples": len(samples)}
