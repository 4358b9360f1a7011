"""Clean shutdown, measured: a training peer's whole process group gets SIGTERM (or SIGINT), as
`timeout`, systemd and most supervisors send it, so the peer, its hivemind DHT process and `p2pd`
get the signal at the same moment. Each run must end with exit status 0 within `--limit` seconds,
a checkpoint written and no process of the group left. Optionally the DHT process is SIGKILLed
first (a crashed DHT), and the run also checks that the peer reported it.

    python -m p2pdiloco.swarm.shutdown_check --runs 20 --data FILE --json results/shutdown.json

Writes a JSON summary: one entry per run (exit status, seconds from the signal to the exit,
checkpoint, leftovers) and the count of clean runs; exits 0 only if every run was clean.
tests/test_swarm_join_leave.py runs a few of these; the 20-run loop is this command.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from .. import procfs
from .local import PeerProcess
from .watchdog import children

# A single, small peer that trains at once: the micro model, short sequences, frequent syncs.
PEER_ARGS = ["--model", "micro", "--steps", "1000000", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2",
             "--H", "6", "--fragments", "2", "--threads", "1", "--heartbeat", "0.5", "--record-ttl", "3"]
DHT_DEAD = "the DHT process .* has exited"


def dht_process(peer_pid: int) -> int | None:
    """The peer's hivemind DHT process: its child that runs a `p2pd`."""
    for child in children(peer_pid):
        for grandchild in children(child):
            try:
                if Path(f"/proc/{grandchild}/comm").read_text().strip() == "p2pd":
                    return child
            except OSError:
                pass
    return None


def session_processes(sid: int) -> list[int]:
    """Live processes of a session (a peer started with start_new_session: its group and session)."""
    out = []
    for pid in procfs.pids():
        try:
            if os.getsid(pid) == sid and not procfs.is_zombie_or_gone(pid):
                out.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return out


def wait_for_line(peer: PeerProcess, pattern: str, timeout_s: float) -> bool:
    rx, deadline = re.compile(pattern), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(rx.search(line) for line in list(peer.lines)):
            return True
        if peer.proc.poll() is not None:
            return False
        time.sleep(0.1)
    return False


def one_run(workdir: Path, peer_args: list[str], sig: int = signal.SIGTERM, kill_dht: bool = False,
            limit_s: float = 20.0, start_timeout_s: float = 180.0) -> dict:
    """Start a peer, wait until it has trained and averaged, signal its group; what happened."""
    peer = PeerProcess(workdir.name, [*peer_args, "--checkpoint-dir", "checkpoints"], workdir, echo=lambda _: None)
    result = {"signal": signal.Signals(sig).name, "dht_killed_first": kill_dht}
    try:
        if not wait_for_line(peer, r"first average applied", start_timeout_s):
            return {**result, "clean": False, "error": "the peer did not start training", "tail": peer.tail()}
        if kill_dht:
            dht = dht_process(peer.proc.pid)
            if dht is None:
                return {**result, "clean": False, "error": "no DHT process found", "tail": peer.tail()}
            os.kill(dht, signal.SIGKILL)
            # The heartbeat notices within a heartbeat or two; 30 s leaves room for a loaded machine.
            result["dht_death_reported"] = wait_for_line(peer, DHT_DEAD, 30.0)
        start = time.monotonic()
        os.killpg(peer.proc.pid, sig)
        try:
            result["exit_code"] = peer.proc.wait(limit_s)
        except subprocess.TimeoutExpired:
            result["exit_code"] = None
        result["seconds"] = round(time.monotonic() - start, 2)
        peer.read_to_end()
        result["checkpoint"] = bool(list((workdir / "checkpoints").rglob("*.pt")))
        deadline = time.monotonic() + 5.0  # a p2pd signalled with the group may take a moment to go
        while session_processes(peer.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        result["leftovers"] = len(session_processes(peer.proc.pid))
        result["clean"] = (result["exit_code"] == 0 and result["checkpoint"] and not result["leftovers"]
                           and result.get("dht_death_reported", True))
        if not result["clean"]:
            result["tail"] = peer.tail(40)
        return result
    finally:
        peer.stop()  # whatever is left of the group: SIGTERM, then SIGKILL, and reaped


def run_checks(runs: int, workdir: Path, peer_args: list[str], sig: int = signal.SIGTERM, kill_dht: bool = False,
               limit_s: float = 20.0, progress=None) -> dict:
    results = []
    for i in range(runs):
        results.append(one_run(workdir / f"run{i}", peer_args, sig, kill_dht, limit_s))
        if progress:
            progress(f"run {i}: {json.dumps({k: v for k, v in results[-1].items() if k != 'tail'})}")
    seconds = [r["seconds"] for r in results if "seconds" in r]
    return {"runs": runs, "clean": sum(r["clean"] for r in results), "signal": signal.Signals(sig).name,
            "dht_killed_first": kill_dht, "limit_s": limit_s, "max_seconds": max(seconds, default=None),
            "results": results}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m p2pdiloco.swarm.shutdown_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--signal", choices=["SIGTERM", "SIGINT"], default="SIGTERM")
    ap.add_argument("--kill-dht-first", action="store_true", help="SIGKILL the peer's DHT process before the signal")
    ap.add_argument("--limit", type=float, default=20.0, help="seconds from the signal to the exit")
    ap.add_argument("--data", nargs="+", metavar="PATH", help="the peer's --data (default: the stdlib's sources)")
    ap.add_argument("--workdir", default="runs/shutdown-check")
    ap.add_argument("--json", required=True, metavar="FILE")
    args = ap.parse_args(argv)
    # The peer runs in its own folder: a relative --data would not be found there.
    peer_args = PEER_ARGS + (["--data", *(str(Path(d).resolve()) for d in args.data)] if args.data else [])
    summary = run_checks(args.runs, Path(args.workdir), peer_args, getattr(signal, args.signal), args.kill_dht_first,
                         args.limit, progress=lambda m: print(m, file=sys.stderr, flush=True))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['clean']}/{summary['runs']} clean exits ({summary['signal']} to the process group"
          f"{', DHT killed first' if args.kill_dht_first else ''}); slowest {summary['max_seconds']}s; {args.json}")
    return 0 if summary["clean"] == summary["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
