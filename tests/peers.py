"""Real peers as separate processes for the swarm tests: start, read their output, stop, reap.

Every peer runs in its own process group, so `stop()` reaches the DHT process and the p2pd daemon it
forks too; the `swarm` fixture (conftest.py) reaps every group a test started, whatever happened.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from p2pdiloco.swarm.local import JOIN

# A configuration small enough for CPU tests: the tiny model, short sequences, frequent syncs.
TINY = ["--model", "tiny", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--H", "6",
        "--fragments", "2", "--tau", "1", "--threads", "1", "--inner-lr", "3e-3", "--warmup-steps", "2",
        "--heartbeat", "0.5", "--record-ttl", "3", "--matchmaking-timeout", "8", "--reduce-timeout", "8",
        "--timeout", "30"]


class PeerProcess:
    def __init__(self, args: list[str], cwd: Path, name: str):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.name, self.lines, self.cwd = name, [], cwd
        self.proc = subprocess.Popen([sys.executable, "-m", "p2pdiloco.cli", "peer", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = rx.search(line)
                if m:
                    return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: no line matching {pattern!r} within {timeout}s; output:\n{self.output()[-4000:]}")

    def join_address(self, timeout: float = 60) -> str:
        return self.wait_for(JOIN.pattern, timeout).group(1)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running after {timeout}s; output:\n{self.output()[-4000:]}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def signal_group(self, sig: int) -> None:
        """The signal to the peer's whole process group (it, its DHT process, p2pd), as `timeout`,
        systemd and most supervisors send it."""
        os.killpg(self.proc.pid, sig)

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


class Swarm:
    """The peers one test starts; `close()` kills whatever is still alive, process groups included."""

    def __init__(self, root: Path):
        self.root, self.peers = root, []

    def start(self, *args: str, name: str | None = None) -> PeerProcess:
        name = name or f"peer{len(self.peers)}"
        cwd = self.root / name
        cwd.mkdir(parents=True, exist_ok=True)
        peer = PeerProcess(list(args), cwd, name)
        self.peers.append(peer)
        return peer

    def start_run(self, n: int, *args: str) -> list[PeerProcess]:
        """A first peer, then n - 1 that join it through its printed join line."""
        first = self.start(*args)
        addr = first.join_address()
        return [first] + [self.start(*args, "--initial-peers", addr) for _ in range(n - 1)]

    def close(self) -> None:
        for p in self.peers:
            p.kill_group()
