"""`p2pdiloco bench soak`: does a swarm stay healthy through an hour of faults?

N real peers (4 by default, the micro model, each peer its own data shard) train one run. Every
`--every` seconds (60) for `--minutes`, one peer is hit, in turn:

- *killed*: SIGKILL to its process group (peer, DHT process, p2pd; nothing written on the way out),
  then restarted at once with `--resume auto` from its last checkpoint (`--checkpoint-every`),
  joining through the other peers' addresses; kills go to the last half of the peers;
- *frozen*: SIGSTOP to its process group for `--freeze-seconds`, then SIGCONT; freezes go to the
  first half, which are never killed, so their processes live through the whole run.

Meanwhile every peer process tree is sampled (proc_sampler.py). Reported: each survivor's RSS
growth from its first applied average to its last step (issue target < 5%), its open file
descriptors over the run (target: flat), stalls (a running, unfrozen peer that prints no progress
for `--stall-seconds`: a hang), and the final eval loss of the global model against a calm run of
the same steps without faults (`--baseline`; target within 2%).

The run's length is its `--steps`; without it, `--minutes` × 60 × `--steps-per-second` (an estimate
of the calm swarm's speed on the machine), so the faults land while the peers train. Faults stop
after `--minutes`; the peers then finish their steps.
"""
from __future__ import annotations

import json
import os
import re
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from .bench_swarm import FIRST_AVERAGE, LAST_STEP, _load, _mean
from .proc_sampler import Sample, Sampler, between, growth
from .swarm.local import JOIN, PeerProcess, start_peers

TRAINING = ["--model", "micro", "--H", "20", "--fragments", "2", "--batch-size", "8", "--seq-len", "64",
            "--eval-batches", "8", "--inner-lr", "6e-3", "--warmup-steps", "20", "--outer-momentum", "0.5",
            "--threads", "1"]
PROGRESS = re.compile(r"\[peer\] step (\d+)/")
TRAINING_FROM = r"\[peer\] training from"


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 30.0  # how long faults are injected
    every_s: float = 60.0  # one fault every this many seconds
    freeze_s: float = 20.0  # how long a frozen peer stays stopped (well over --record-ttl: the others drop it)
    peers: int = 4
    steps: int = 0  # 0: minutes × 60 × steps_per_s
    steps_per_s: float = 3.0
    checkpoint_every: int = 20
    sample_s: float = 5.0
    stall_s: float = 120.0  # no progress line for this long from a running, unfrozen peer: a hang
    baseline: bool = False
    workdir: str = "runs/bench-soak"

    @property
    def total_steps(self) -> int:
        return self.steps or max(1, round(self.minutes * 60 * self.steps_per_s))

    @property
    def timeout_s(self) -> float:
        """The whole run's bound: a generous multiple of the time faults take, plus the restarts."""
        return 3 * self.minutes * 60 + 900

    def validate(self) -> SoakConfig:
        if self.peers < 3:
            raise ValueError(f"--peers must be at least 3 (faults hit one peer while two go on), got {self.peers}")
        if self.minutes <= 0 or self.every_s <= 0 or self.freeze_s <= 0 or self.sample_s <= 0 or self.stall_s <= 0:
            raise ValueError("--minutes, --every, --freeze-seconds, --sample-seconds and --stall-seconds must be positive")
        if self.freeze_s >= self.every_s:
            raise ValueError(f"--freeze-seconds ({self.freeze_s}) must be below --every ({self.every_s}): "
                             f"one fault at a time")
        if self.steps < 0 or self.steps_per_s <= 0 or self.checkpoint_every < 1:
            raise ValueError("--steps must be ≥ 0, --steps-per-second positive and --checkpoint-every ≥ 1")
        return self


class Swarm:
    """The run's peers by index, each its current incarnation (a killed peer is replaced)."""

    def __init__(self, cfg: SoakConfig, args: list[str], root: Path, sampler: Sampler):
        self.cfg, self.args, self.root, self.sampler = cfg, args, root, sampler
        self.procs: list[PeerProcess] = []
        self.incarnation = [0] * cfg.peers
        self.frozen: dict[int, float] = {}  # peer index -> when to thaw it (time.monotonic())
        self.resumed_at = [0.0] * cfg.peers  # when each peer last came back (restart or thaw)

    def argv(self, i: int) -> list[str]:
        return [*self.args, "--shard", str(i), "--checkpoint-dir", str((self.root / f"peer{i}" / "checkpoints").resolve())]

    def start(self) -> None:
        quiet = lambda line: None
        self.procs, _ = start_peers(self.cfg.peers, lambda i: [*self.argv(i), "--wait-for-peers", str(self.cfg.peers)],
                                    lambda i: self.root / f"peer{i}" / "run0", quiet)
        now = time.monotonic()
        for i, p in enumerate(self.procs):
            self.sampler.watch(p.name, p.proc.pid)
            self.resumed_at[i] = now

    def addresses(self, but: int) -> list[str]:
        """The join addresses of the live, unfrozen peers other than `but`."""
        out = []
        for i, p in enumerate(self.procs):
            if i != but and i not in self.frozen and p.proc.poll() is None:
                out += [m.group(1) for line in list(p.lines) for m in [JOIN.search(line)] if m][:1]
        return out

    def kill_and_restart(self, i: int) -> dict:
        old = self.procs[i]
        step = last_step(old)
        os.killpg(old.proc.pid, signal.SIGKILL)
        old.proc.wait(30)
        old.read_to_end()
        self.incarnation[i] += 1
        k = self.incarnation[i]
        # No --wait-for-peers: a restarted peer is a newcomer that takes the live swarm's state.
        new = PeerProcess(f"peer{i}", [*self.argv(i), "--resume", "auto", "--initial-peers", *self.addresses(i)],
                          self.root / f"peer{i}" / f"run{k}", lambda line: None)
        self.procs[i] = new
        self.sampler.watch(f"peer{i}#{k}", new.proc.pid)
        self.resumed_at[i] = time.monotonic()
        return {"kind": "kill", "peer": i, "step": step}

    def freeze(self, i: int) -> dict:
        os.killpg(self.procs[i].proc.pid, signal.SIGSTOP)
        self.frozen[i] = time.monotonic() + self.cfg.freeze_s
        return {"kind": "freeze", "peer": i, "step": last_step(self.procs[i]), "seconds": self.cfg.freeze_s}

    def thaw_due(self) -> None:
        now = time.monotonic()
        for i, until in list(self.frozen.items()):
            if now >= until:
                os.killpg(self.procs[i].proc.pid, signal.SIGCONT)
                del self.frozen[i]
                self.resumed_at[i] = now

    def stalled(self) -> list[int]:
        """Running, unfrozen peers with no progress line for stall_s (since the later of their last
        progress line and their last restart or thaw)."""
        now, out = time.monotonic(), []
        for i, p in enumerate(self.procs):
            if i in self.frozen or p.proc.poll() is not None:
                continue
            last = max(p.when(PROGRESS, last=True) or 0.0, self.resumed_at[i])
            if now - last > self.cfg.stall_s:
                out.append(i)
        return out

    def stop(self) -> None:
        for i in list(self.frozen):
            os.killpg(self.procs[i].proc.pid, signal.SIGCONT)
        self.frozen.clear()
        for p in self.procs:
            p.stop()


def last_step(p: PeerProcess) -> int:
    steps = [int(m.group(1)) for line in list(p.lines) for m in [PROGRESS.search(line)] if m]
    return steps[-1] if steps else 0


def run_soak(cfg: SoakConfig, args: list[str], root: Path, faults: bool, echo=print) -> dict:
    """One run of the swarm, with faults or calm; its figures."""
    sampler = Sampler(cfg.sample_s).start()
    swarm = Swarm(cfg, args, root, sampler)
    start = time.monotonic()
    events, stalls, hung = [], [], []
    try:
        swarm.start()
        deadline = start + cfg.timeout_s
        while time.monotonic() < deadline and not all(p.when(TRAINING_FROM) for p in swarm.procs):
            if any(p.proc.poll() is not None for p in swarm.procs):
                break
            time.sleep(0.5)
        t0 = time.monotonic()
        planned = int(cfg.minutes * 60 // cfg.every_s) if faults else 0
        kill_victims = list(range(cfg.peers // 2, cfg.peers))
        freeze_victims = list(range(cfg.peers // 2))
        while time.monotonic() < deadline and any(p.proc.poll() is None for p in swarm.procs):
            swarm.thaw_due()
            k = len(events)
            if k < planned and time.monotonic() >= t0 + (k + 1) * cfg.every_s and not swarm.frozen:
                victims = kill_victims if k % 2 == 0 else freeze_victims
                i = victims[(k // 2) % len(victims)]
                if swarm.procs[i].proc.poll() is None:  # a peer that already finished is not hit
                    e = swarm.kill_and_restart(i) if k % 2 == 0 else swarm.freeze(i)
                else:
                    e = {"kind": "skipped (peer finished)", "peer": i}
                e["at_s"] = round(time.monotonic() - t0, 1)
                events.append(e)
                echo(f"[bench soak] {e['at_s']:.0f}s: {e['kind']} peer{i}" + (f" at step {e['step']}" if "step" in e else ""))
            for i in swarm.stalled():
                if not any(s["peer"] == i and s["incarnation"] == swarm.incarnation[i] for s in stalls):
                    stalls.append({"peer": i, "incarnation": swarm.incarnation[i], "at_s": round(time.monotonic() - t0, 1),
                                   "step": last_step(swarm.procs[i])})
                    echo(f"[bench soak] peer{i} has made no progress for {cfg.stall_s:.0f}s (step {stalls[-1]['step']})")
            time.sleep(0.5)
        hung = [p.name for p in swarm.procs if p.proc.poll() is None]
    finally:
        swarm.stop()
        sampler.stop()
    for p in swarm.procs:
        p.read_to_end()
    wall = time.monotonic() - start
    summaries = [p.summary() for p in swarm.procs]
    done = [s for s in summaries if s is not None]
    survivors = {f"peer{i}": survivor_figures(swarm.procs[i], sampler.samples.get(f"peer{i}", []))
                 for i in range(cfg.peers) if swarm.incarnation[i] == 0}
    return {"faults": faults, "wall_s": round(wall, 1), "events": events, "events_planned": planned,
            "stalls": stalls, "hung": hung,
            "completed": not hung and len(done) == cfg.peers and all(s["completed"] for s in done),
            "exit_codes": [p.proc.returncode for p in swarm.procs],
            "eval_loss": _mean([s["eval_loss"] for s in done]) if len(done) == cfg.peers else None,
            "eval_loss_per_peer": [s["eval_loss"] if s else None for s in summaries],
            "eval_loss_initial": done[0]["eval_loss_initial"] if done else None,
            "global_models": len({s["global_fingerprint"] for s in done}),
            "steps": [s["steps"] if s else None for s in summaries],
            "skipped_rounds": [s["skipped_rounds"] if s else None for s in summaries],
            "applied_rounds": [len(s["applied"]) if s else None for s in summaries],
            "survivors": survivors, "load": _load(sampler.load)}


def survivor_figures(p: PeerProcess, samples: list[Sample]) -> dict:
    """A process that lived through the whole run: memory and descriptors from its first applied
    average to its last step, and the descriptors' trend (least-squares slope per minute)."""
    t0, t1 = p.when(FIRST_AVERAGE), p.when(LAST_STEP)
    window = between(samples, t0, t1) if t0 is not None and t1 is not None else []
    return {"rss": growth(window, "rss"), "rss_tree": growth(window, "rss_tree"), "fds": growth(window, "fds"),
            "fds_tree": growth(window, "fds_tree"), "fds_slope_per_min": _slope(window, "fds"),
            "fds_tree_slope_per_min": _slope(window, "fds_tree"), "minutes": round((window[-1].t - window[0].t) / 60, 1)
            if window else 0.0}


def _slope(samples: list[Sample], field: str) -> float | None:
    if len(samples) < 3:
        return None
    ts = [(s.t - samples[0].t) / 60 for s in samples]
    ys = [getattr(s, field) for s in samples]
    return round(statistics.linear_regression(ts, ys).slope, 3)


def run_soak_bench(cfg: SoakConfig, peer_args: list[str], json_path: str, echo=print) -> dict:
    cfg = cfg.validate()
    args = [*TRAINING, *peer_args, "--steps", str(cfg.total_steps), "--workers", str(cfg.peers),
            "--checkpoint-every", str(cfg.checkpoint_every), "--json", "summary.json", "--run-id", "bench-soak"]
    root = Path(cfg.workdir)
    result: dict = {"config": {"minutes": cfg.minutes, "every_s": cfg.every_s, "freeze_s": cfg.freeze_s,
                               "peers": cfg.peers, "steps": cfg.total_steps, "checkpoint_every": cfg.checkpoint_every,
                               "sample_s": cfg.sample_s, "stall_s": cfg.stall_s, "peer_args": args},
                    "cpus": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()]}
    echo(f"[bench soak] {cfg.peers} peers, {cfg.total_steps} steps; a fault every {cfg.every_s:g}s for {cfg.minutes:g} min")
    result["soak"] = run_soak(cfg, args, root / "soak", faults=True, echo=echo)
    _write(json_path, result)
    if cfg.baseline:
        echo("[bench soak] the calm run (same steps, no faults)")
        result["calm"] = run_soak(cfg, args, root / "calm", faults=False, echo=echo)
    result["verdict"] = verdict(result)
    _write(json_path, result)
    return result


def verdict(result: dict) -> dict:
    """The issue's targets, each True/False (None: not measured)."""
    soak, calm = result["soak"], result.get("calm")
    surv = soak["survivors"].values()
    rss = [s["rss"]["growth_pct"] for s in surv if s["rss"]["growth_pct"] is not None]
    fds = [s["fds"] for s in surv if s["fds"]["start"] is not None]
    ratio = soak["eval_loss"] / calm["eval_loss"] if calm and soak["eval_loss"] and calm["eval_loss"] else None
    return {"rss_growth_pct_max": max(rss, default=None), "rss_under_5_percent": max(rss) < 5 if rss else None,
            # flat: no more descriptors at the end than at the start, give or take a few that come and go
            "fds_flat": all(f["end"] - f["start"] <= max(4, 0.05 * f["start"]) for f in fds) if fds else None,
            "no_hang": not soak["stalls"] and not soak["hung"] and soak["completed"],
            "eval_loss_ratio_to_calm": round(ratio, 4) if ratio else None,
            "loss_within_2_percent": abs(ratio - 1) <= 0.02 if ratio else None}


def print_report(result: dict, out=print) -> None:
    soak, v = result["soak"], result["verdict"]
    kills = sum(e["kind"] == "kill" for e in soak["events"])
    freezes = sum(e["kind"] == "freeze" for e in soak["events"])
    out(f"soak: {soak['wall_s']:.0f}s, {kills} kills and {freezes} freezes; completed {soak['completed']}; "
        f"stalls {len(soak['stalls'])}, hung {soak['hung'] or 'none'}; eval loss {soak['eval_loss']}")
    for name, s in soak["survivors"].items():
        out(f"  survivor {name}: RSS {s['rss']['start'] and s['rss']['start'] / 2**20:.0f} -> "
            f"{s['rss']['end'] and s['rss']['end'] / 2**20:.0f} MB ({s['rss']['growth_pct']}%), tree "
            f"{s['rss_tree']['growth_pct']}%; fds {s['fds']['start']} -> {s['fds']['end']} (max {s['fds']['max']}, "
            f"{s['fds_slope_per_min']}/min); over {s['minutes']} min")
    if "calm" in result:
        out(f"calm: eval loss {result['calm']['eval_loss']}; soak / calm = {v['eval_loss_ratio_to_calm']}")
    out("targets: " + ", ".join(f"{k} {val}" for k, val in v.items()))


def _write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def add_parser(bench_sub) -> None:
    p = bench_sub.add_parser("soak", help="4 peers, one killed or frozen every minute: RSS, fds, hangs, loss vs calm",
                             description="Options not listed here (any `peer` option) are passed to every peer.")
    p.add_argument("--minutes", type=float, default=30.0, help="how long faults are injected (default: %(default)s)")
    p.add_argument("--every", type=float, default=60.0, metavar="SECONDS", help="one fault every this many seconds")
    p.add_argument("--freeze-seconds", type=float, default=20.0, help="how long a frozen peer stays stopped")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--steps", type=int, default=0, help="the run's steps (default: --minutes × 60 × --steps-per-second)")
    p.add_argument("--steps-per-second", type=float, default=3.0, help="the calm swarm's speed, for the default --steps")
    p.add_argument("--checkpoint-every", type=int, default=20, metavar="STEPS")
    p.add_argument("--sample-seconds", type=float, default=5.0)
    p.add_argument("--stall-seconds", type=float, default=120.0, help="a running peer with no progress this long has hung")
    p.add_argument("--baseline", action="store_true", help="also run the same steps calm (no faults) and compare losses")
    p.add_argument("--workdir", default="runs/bench-soak")
    p.add_argument("--json", metavar="FILE", required=True)
    p.set_defaults(threads=0)


def cli(args, peer_args: list[str]) -> int:
    cfg = SoakConfig(args.minutes, args.every, args.freeze_seconds, args.peers, args.steps, args.steps_per_second,
                     args.checkpoint_every, args.sample_seconds, args.stall_seconds, args.baseline, args.workdir)
    result = run_soak_bench(cfg, peer_args, args.json, echo=lambda m: print(m, flush=True))
    print_report(result)
    print(f"results in {args.json}")
    return 0
