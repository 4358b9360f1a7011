"""`p2pdiloco bench resume`: does a run survive the whole swarm stopping?

Two local swarms of N real peer processes with the same seeds and data (peer i reads shard i of N,
so both runs see the same tokens in the same order): one runs uninterrupted; the other writes a
checkpoint every `--checkpoint-every` steps, and once every peer has written one at or after
`--stop-at` (and `--kill-after` seconds more have passed) every peer's process group is killed with
SIGKILL — nothing is written on the way out — and all N are restarted with `--resume auto`. The
JSON holds both runs' final eval loss (the mean over peers of the global model's), their ratio
(issue target: within 1%), the steps the peers resumed from and the wall times.
"""
from __future__ import annotations

import re
import signal
import os
import time
from pathlib import Path

from .simulate import write_json
from .swarm.local import PeerProcess, finish, start_peers

CHECKPOINT = re.compile(r"\[peer\] checkpoint at step (\d+)")
RESUMED = re.compile(r"\[peer\] resumed from \S+ at step (\d+)")


def _start(peers: int, common: list[str], workdir: Path, echo, extra: list[str] = ()) -> list[PeerProcess]:
    return start_peers(peers, lambda i: [*common, "--shard", str(i), "--checkpoint-dir",
                                         str((workdir / f"peer{i}" / "checkpoints").resolve()), *extra],
                       lambda i: workdir / f"peer{i}" / ("resumed" if extra else "run"), echo)[0]


def _wait_for_checkpoints(procs: list[PeerProcess], stop_at: int, deadline: float) -> dict[str, int]:
    while time.monotonic() < deadline:
        steps = {p.name: max([int(m.group(1)) for line in list(p.lines) for m in [CHECKPOINT.search(line)] if m],
                             default=-1) for p in procs}
        if min(steps.values()) >= stop_at:
            return steps
        for p in procs:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} ended (exit {p.proc.returncode}) before a checkpoint at step "
                                   f"{stop_at}: lower --stop-at (see {p.workdir / 'peer.log'})")
        time.sleep(0.1)
    raise RuntimeError(f"not every peer wrote a checkpoint at step {stop_at} or later within --timeout")


def _result(summaries: list[dict], wall_s: float) -> dict:
    losses = [s["eval_loss"] for s in summaries]
    return {"eval_loss": sum(losses) / len(losses), "eval_loss_per_peer": losses,
            "steps": [s["steps"] for s in summaries], "completed": all(s["completed"] for s in summaries),
            "skipped_rounds": [s["skipped_rounds"] for s in summaries], "wall_s": wall_s}


def run_resume_bench(peers: int, peer_args: list[str], workdir: Path, json_path: str, checkpoint_every: int,
                     stop_at: int, kill_after_s: float, timeout_s: float, echo=print) -> dict:
    if peers < 1 or checkpoint_every < 1 or stop_at < 1:
        raise ValueError("--peers, --checkpoint-every and --stop-at must be at least 1")
    common = [*peer_args, "--workers", str(peers), "--wait-for-peers", str(peers), "--json", "summary.json",
              "--run-id", "bench-resume"]
    start = time.monotonic()
    echo("[bench resume] the uninterrupted run")
    procs = _start(peers, common, workdir / "uninterrupted", echo)
    uninterrupted = _result(finish(procs, start + timeout_s), time.monotonic() - start)

    echo(f"[bench resume] the interrupted run: checkpoints every {checkpoint_every} steps, SIGKILL of every peer "
         f"{kill_after_s:g}s after all have one at step {stop_at} or later")
    t0 = time.monotonic()
    interrupted_dir = workdir / "interrupted"
    procs = _start(peers, [*common, "--checkpoint-every", str(checkpoint_every)], interrupted_dir, echo)
    try:
        _wait_for_checkpoints(procs, stop_at, t0 + timeout_s)
        time.sleep(kill_after_s)
        saved = _wait_for_checkpoints(procs, stop_at, t0 + timeout_s)  # those written meanwhile count
        for p in procs:
            os.killpg(p.proc.pid, signal.SIGKILL)
        if any("[peer] done:" in line for p in procs for line in p.lines):
            raise RuntimeError("a peer finished before the kill: raise --steps or lower --stop-at")
    finally:
        for p in procs:
            p.stop()
    echo(f"[bench resume] killed; last checkpoints at steps {saved}; restarting every peer with --resume auto")
    procs = _start(peers, [*common, "--checkpoint-every", str(checkpoint_every)], interrupted_dir, echo,
                   extra=["--resume", "auto"])
    summaries = finish(procs, t0 + 2 * timeout_s)
    resumed = _result(summaries, time.monotonic() - t0)
    resumed["checkpoint_steps_at_kill"] = list(saved.values())
    resumed["resumed_from_steps"] = [int(m.group(1)) for p in procs for line in p.lines for m in [RESUMED.search(line)] if m]
    ratio = resumed["eval_loss"] / uninterrupted["eval_loss"]
    result = {"peers": peers, "peer_args": peer_args, "checkpoint_every": checkpoint_every, "stop_at": stop_at,
              "kill_after_s": kill_after_s, "uninterrupted": uninterrupted, "resumed": resumed,
              "eval_loss_ratio": ratio, "within_1_percent": abs(ratio - 1) <= 0.01}
    write_json(json_path, result)
    return result


def add_parser(bench_sub) -> None:
    p = bench_sub.add_parser("resume", help="an uninterrupted local swarm vs one killed mid-run (SIGKILL) and resumed",
                             description="Options not listed here (any `peer` option) are passed to every peer.")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="STEPS")
    p.add_argument("--stop-at", type=int, required=True, metavar="STEP",
                   help="kill every peer once each has a checkpoint at this step or later")
    p.add_argument("--kill-after", type=float, default=2.0, metavar="SECONDS",
                   help="seconds of training after that before the kill (work the resumed run redoes)")
    p.add_argument("--workdir", default="runs/bench-resume", help="every peer's log, checkpoints and summary")
    p.add_argument("--timeout", type=float, default=3600, help="seconds for each run before it is stopped")
    p.add_argument("--json", metavar="FILE", required=True)
    p.set_defaults(threads=0)


def cli(args, peer_args: list[str]) -> int:
    result = run_resume_bench(args.peers, peer_args, Path(args.workdir), args.json, args.checkpoint_every,
                              args.stop_at, args.kill_after, args.timeout)
    u, r = result["uninterrupted"], result["resumed"]
    print(f"eval loss uninterrupted {u['eval_loss']:.4f}, stopped and resumed {r['eval_loss']:.4f}: "
          f"ratio {result['eval_loss_ratio']:.4f} (resumed from steps {r['resumed_from_steps']}); results in {args.json}")
    return 0
