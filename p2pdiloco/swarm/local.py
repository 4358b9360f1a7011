"""`p2pdiloco local-swarm`: the README's main command. Starts N real peer processes on loopback (the
first starts the swarm, the others join it through its printed join line), shows their progress,
and ends with a summary: eval loss before and after, bytes each peer sent against what
data-parallel training would have sent, and the fraction of wall time spent computing. Each peer
writes its metrics to `metrics.jsonl` in its folder unless told otherwise (`p2pdiloco plot WORKDIR`).

Every peer is its own process group; all of them are stopped on Ctrl-C, on error, and at the end.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

JOIN = re.compile(r"join with: .*--initial-peers (\S+)")


class PeerProcess:
    """One `p2pdiloco peer` child process: its output goes to `peer.log` in its folder (line by line,
    readable while it runs), and its `[peer]` lines, warnings and errors are relayed to `echo`.
    `spawn(argv, **popen_options)` starts it (a plain Popen in a new session by default; the WAN
    test bed starts it in a network namespace)."""

    def __init__(self, name: str, argv: list[str], workdir: Path, echo, spawn=None):
        workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.name, self.lines, self.echo, self.workdir = name, [], echo, workdir
        self.times: list[float] = []  # time.monotonic() when each of `lines` was read
        spawn = spawn or (lambda cmd, **kw: subprocess.Popen(cmd, start_new_session=True, **kw))
        self.proc = spawn([sys.executable, "-m", "p2pdiloco.cli", "peer", *argv], cwd=workdir, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.workdir / "peer.log", "w", buffering=1) as log:
            for line in self.proc.stdout:
                log.write(line)
                line = line.rstrip()
                self.times.append(time.monotonic())
                self.lines.append(line)
                if line.startswith("[peer]") or "WARN" in line or "error" in line.lower() or "Traceback" in line:
                    self.echo(f"{self.name}: {line}")

    def join_address(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = JOIN.search(line)
                if m:
                    return m.group(1)
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} printed no join line within {timeout:.0f}s (see {self.workdir / 'peer.log'})")

    def when(self, pattern: str | re.Pattern, last: bool = False) -> float | None:
        """time.monotonic() at which the first (or last) line matching `pattern` was read; None if none has."""
        rx = re.compile(pattern)
        found = None
        for t, line in zip(list(self.times), list(self.lines)):
            if rx.search(line):
                if not last:
                    return t
                found = t
        return found

    def summary(self) -> dict | None:
        """The peer's `--json summary.json`, once it has exited 0."""
        path = self.workdir / "summary.json"
        return json.loads(path.read_text()) if self.proc.returncode == 0 and path.exists() else None

    def read_to_end(self, timeout_s: float = 5.0) -> None:
        """Once the peer has exited: wait for its last lines to be read."""
        self._reader.join(timeout_s)

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.lines[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the DHT process and p2pd daemon, if any are left
        except ProcessLookupError:
            pass
        self.proc.wait()


def start_peers(peers: int, argv, folder, echo, then=lambda address: []) -> tuple[list[PeerProcess], list[PeerProcess]]:
    """Peer 0 (options `argv(0)`, in `folder(0)`), then peers 1.. joining through its join line;
    `then(address)` starts more processes once that line is known. If anything fails, every process
    started so far is stopped. Returns (the peers, what `then` started)."""
    procs: list[PeerProcess] = []
    more: list[PeerProcess] = []
    try:
        procs.append(PeerProcess("peer0", argv(0), folder(0), echo))
        address = procs[0].join_address(timeout=120)
        more = then(address)
        for i in range(1, peers):
            procs.append(PeerProcess(f"peer{i}", [*argv(i), "--initial-peers", address], folder(i), echo))
    except BaseException:
        for p in procs + more:
            p.stop()
        raise
    return procs, more


def run_local_swarm(peers: int, peer_args: list[str], workdir: Path, timeout_s: float, echo=print) -> dict:
    start = time.monotonic()
    args = [*peer_args, "--wait-for-peers", str(peers), "--json", "summary.json", "--run-id", "local"]
    if not any(a == "--metrics-jsonl" or a.startswith("--metrics-jsonl=") for a in peer_args):
        args += ["--metrics-jsonl", "metrics.jsonl"]  # in each peer's folder, for `p2pdiloco plot WORKDIR`
    procs, _ = start_peers(peers, lambda i: args, lambda i: workdir / f"peer{i}", echo)
    return {"peers": finish(procs, start + timeout_s), "wall_s": time.monotonic() - start}


def finish(procs: list[PeerProcess], deadline: float, also: list[PeerProcess] = ()) -> list[dict]:
    """Wait until `deadline` (time.monotonic()) for `procs` and `also` to exit, stop whatever is
    left, and return the summaries of `procs`; RuntimeError naming the peer's log if one failed."""
    try:
        for p in [*procs, *also]:
            try:
                p.proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"{p.name} did not finish in time (see {p.workdir / 'peer.log'})") from None
    finally:
        for p in [*procs, *also]:
            p.stop()
    summaries = []
    for p in procs:
        summary = p.summary()
        if summary is None:
            raise RuntimeError(f"{p.name} failed (exit {p.proc.returncode}); its log: {p.workdir / 'peer.log'}")
        summaries.append(summary)
    return summaries


def print_summary(result: dict, out=print) -> None:
    out(f"\n{'peer':14s} {'eval before':>11s} {'eval after':>10s} {'bytes sent':>14s} {'data-parallel':>15s} "
        f"{'fewer':>7s} {'compute':>8s} {'skipped':>8s}")
    for s in result["peers"]:
        out(f"…{s['peer_id'][-12:]:13s} {s['eval_loss_initial']:11.4f} {s['eval_loss']:10.4f} {s['bytes_sent']:14,d} "
            f"{s['data_parallel_bytes']:15,d} {s['data_parallel_bytes'] / max(s['bytes_sent'], 1):6.0f}× "
            f"{s['compute_fraction']:8.0%} {s['skipped_rounds']:8d}")
    out(f"wall time {result['wall_s']:.0f}s; every peer's log and summary.json are under the --workdir")
