"""Real peers inside a NetnsBed, started the way a user starts them: the first starts the run, the
others join through its printed join line. Each peer is `p2pdiloco peer` in its own namespace and
process group, listening on its namespace's address; its output goes to `peer.log` in its folder,
and its `[peer]` lines are relayed to the caller. Each peer's summary (`--json summary.json`)
holds what the bench reads, the matchmaking time of every average included.
"""
from __future__ import annotations

import select
import subprocess
import sys
import time
from pathlib import Path

from ..swarm.local import PeerProcess
from .netns import NetnsBed


def bed_peer(bed: NetnsBed, i: int, args: list[str], workdir: Path, echo) -> PeerProcess:
    """Peer i of the bed, in its namespace (`NetnsBed.spawn` makes its process group)."""
    return PeerProcess(f"p{i}", args, workdir, echo, spawn=lambda cmd, **kw: bed.spawn(i, cmd, **kw))


def start_peers(bed: NetnsBed, args_for, workdir: Path, echo, join_timeout_s: float = 120.0) -> list[PeerProcess]:
    """One peer per namespace, with the options `args_for(i)`: the first starts the run, the others
    join through its join line."""
    started = [bed_peer(bed, 0, args_for(0), workdir / "p0", echo)]
    try:
        extra = ["--initial-peers", started[0].join_address(join_timeout_s)]
        for i in range(1, len(bed.namespaces)):
            started.append(bed_peer(bed, i, [*args_for(i), *extra], workdir / f"p{i}", echo))
    except BaseException:  # a failed start must not leave the first peer running into what comes next
        bed.stop([p.proc for p in started], grace_s=5)
        raise
    return started


def wait_peers(peers: list[PeerProcess], timeout_s: float) -> list[str]:
    """Wait for every peer to exit; the names of those still running after timeout_s."""
    deadline = time.monotonic() + timeout_s
    for p in peers:
        try:
            p.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in peers:
        p.read_to_end()  # the last lines, for the log
    return [p.name for p in peers if p.proc.poll() is None]


_SERVER = """import socket, sys
s = socket.create_server((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
n, got = int(sys.argv[2]), 0
while got < n:
    b = c.recv(1 << 20)
    if not b:
        break
    got += len(b)
c.sendall(b"k")
"""
_CLIENT = """import socket, sys, time
t = time.perf_counter()
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
rtt = time.perf_counter() - t
n = int(sys.argv[3])
t = time.perf_counter()
c.sendall(bytes(n))
c.recv(1)
print(rtt, time.perf_counter() - t)
"""


def link_check(bed: NetnsBed, i: int = 0, j: int = 1, nbytes: int = 2_000_000, timeout_s: float = 60.0) -> dict:
    """What the link between peers i and j really gives: TCP connect time (one round trip) and the
    goodput of one nbytes transfer (slow start included), measured from i's namespace to j's."""
    server = bed.spawn(j, [sys.executable, "-c", _SERVER, bed.addresses[j], str(nbytes)],
                       stdout=subprocess.PIPE, text=True)
    client = None
    try:
        ready, _, _ = select.select([server.stdout], [], [], timeout_s)
        if not ready:  # the server itself did not start: not the link's fault
            raise RuntimeError(f"the link check's server in peer {j}'s namespace printed no port within {timeout_s:.0f}s")
        port = server.stdout.readline().strip()
        client = bed.spawn(i, [sys.executable, "-c", _CLIENT, bed.addresses[j], port, str(nbytes)],
                           stdout=subprocess.PIPE, text=True)
        out, _ = client.communicate(timeout=timeout_s)
        rtt, seconds = (float(x) for x in out.split())
    except (subprocess.TimeoutExpired, ValueError) as exc:
        raise RuntimeError(f"the test bed's link from peer {i} to peer {j} does not carry TCP ({exc}); "
                           f"a firewall on bridged traffic (br_netfilter) can cause this") from None
    finally:
        bed.stop([p for p in (server, client) if p is not None], grace_s=2)
    return {"from": i, "to": j, "rtt_ms": rtt * 1000, "bytes": nbytes, "goodput_mbit_s": nbytes * 8 / seconds / 1e6}
