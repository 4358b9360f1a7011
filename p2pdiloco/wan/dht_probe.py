"""What matchmaking costs on a link when every peer arrives at once: the floor under a round.

One process per namespace runs the swarm's own control plane (swarm/control.py, hivemind's DHT) and,
on each `go` from the harness, does what `form_group` (swarm/matchmaking.py) does for a round: declare
itself under the round's key, read the live peers (`expected()`), then read the round's key every
50 ms until all N have declared. It reports how long each part took. A real round adds the skew
between peers (a peer declares only when it reaches the round) and the reduce itself.

    python -m p2pdiloco.wan.dht_probe HOST N [INITIAL_MADDR]   (started by `probe_matchmaking`)
"""
from __future__ import annotations

import json
import select
import statistics
import sys
import time


def main(argv: list[str]) -> int:
    from ..swarm.control import ControlConfig, ControlPlane

    host, n, initial = argv[0], int(argv[1]), tuple(argv[2:3])
    control = ControlPlane(ControlConfig("dht-probe", initial, host))
    try:
        print(f"maddr {control.maddrs()[0]}", flush=True)
        for line in sys.stdin:  # "go <round>" from the harness, at the same moment for every probe
            key = f"round/probe/0/{line.split()[1]}"
            t0 = time.perf_counter()
            control.declare(key, host, 60)
            t1 = time.perf_counter()
            control.peers()
            t2 = time.perf_counter()
            polls = 0
            while len(control.declared(key)) < n and time.perf_counter() - t0 < 30:
                polls += 1
                time.sleep(0.05)
            t3 = time.perf_counter()
            print(json.dumps({"declare_s": t1 - t0, "peers_s": t2 - t1, "all_declared_s": t3 - t0,
                              "polls": polls}), flush=True)
    finally:
        control.shutdown()
    return 0


def probe_matchmaking(bed, rounds: int = 5, timeout_s: float = 60.0) -> dict:
    """Medians over `rounds` rounds and all peers of the bed, in seconds."""
    import subprocess

    def start(i: int, extra: list[str]):
        return bed.spawn(i, [sys.executable, "-m", "p2pdiloco.wan.dht_probe", bed.addresses[i], str(n), *extra],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def line(p) -> str:
        ready, _, _ = select.select([p.stdout], [], [], timeout_s)
        text = p.stdout.readline() if ready else ""
        if not text:
            raise RuntimeError(f"the matchmaking probe in a namespace gave no answer within {timeout_s:.0f}s")
        return text

    n = len(bed.namespaces)
    procs = [start(0, [])]
    try:
        first = line(procs[0]).split()[1]
        procs += [start(i, [first]) for i in range(1, n)]
        for p in procs[1:]:
            line(p)
        time.sleep(1.0)  # let the DHT's routing tables settle, as a swarm's have by its first round
        samples = []
        for r in range(rounds):
            for p in procs:
                p.stdin.write(f"go {r}\n")
                p.stdin.flush()
            samples += [json.loads(line(p)) for p in procs]
    finally:
        bed.stop(procs, grace_s=5)
    return {k: statistics.median(s[k] for s in samples) for k in ("declare_s", "peers_s", "all_declared_s", "polls")} | {
        "rounds": rounds, "samples": len(samples)}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
