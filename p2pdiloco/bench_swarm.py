"""`p2pdiloco bench swarm`: how does the swarm hold up as it grows, on one machine?

For each swarm size N (`--peers 8,16,32`) and each group size G (`--group-size 8,16`), N real peer
processes on loopback train the same short run (the micro model by default); every peer's process
tree is sampled meanwhile (proc_sampler.py). Reported per (N, G), from the peers' summaries and the
samples:

- rounds applied and skipped (summed over peers) and the applied fraction (issue target ≥ 90%);
- matchmaking time: each completed average's wait for its group (median, 90th percentile, max);
- DHT traffic: calls each peer made (records published and read, round declarations and reads)
  per second, and p2pd's read + written bytes per second (everything the DHT moves);
- memory: each peer process's RSS from its first applied average to its last step (issue target:
  growth < 5%), and the same for the whole tree (peer, DHT process, p2pd);
- groups: every (fragment, round, group) that any peer applied, checked across peers: all members
  applied a mean with the same hash, and as many applied it as the group has members ("a round is
  applied by all of a group's members or by none"); with G ≥ N the groups cover the swarm and
  every peer's global model must be the same at the end;
- a hang: a peer that did not finish within `--timeout`.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from .proc_sampler import Sampler, between, growth
from .swarm.local import PeerProcess, start_peers

# The setting: the micro model, a short run whose fragments sync often (3 syncs per H).
TRAINING = ["--model", "micro", "--H", "10", "--fragments", "2", "--batch-size", "8", "--seq-len", "64",
            "--eval-batches", "4", "--inner-lr", "6e-3", "--warmup-steps", "5", "--threads", "1"]
FIRST_AVERAGE = r"\[peer\] first average applied"
LAST_STEP = r"\[peer\] checkpoint: "  # written on leaving, after the last step and the final evaluation


@dataclass(frozen=True)
class SwarmBenchConfig:
    peers: tuple[int, ...] = (8, 16, 32)
    group_sizes: tuple[int, ...] = (16,)
    steps: int = 60
    sample_s: float = 2.0  # how often each peer's processes are sampled
    timeout_s: float = 1800.0  # per run: a peer still running after this has hung
    join_timeout_s: float = 600.0  # every peer's --join-timeout: N processes start at once on few cores
    workdir: str = "runs/bench-swarm"

    def validate(self) -> SwarmBenchConfig:
        if not self.peers or min(self.peers) < 2:
            raise ValueError(f"--peers: each swarm needs at least 2 peers, got {list(self.peers)}")
        if not self.group_sizes or min(self.group_sizes) < 2:
            raise ValueError(f"--group-size: each must be at least 2, got {list(self.group_sizes)}")
        if self.steps < 1 or self.sample_s <= 0 or self.timeout_s <= 0 or self.join_timeout_s <= 0:
            raise ValueError("--steps must be ≥ 1 and --sample-seconds, --timeout, --join-timeout positive")
        return self


def run_one(n: int, group_size: int, cfg: SwarmBenchConfig, peer_args: list[str], echo=print) -> dict:
    """One swarm of `n` peers with `--group-size group_size`; its figures (`figures`)."""
    workdir = Path(cfg.workdir) / f"n{n}-g{group_size}"
    args = [*TRAINING, "--steps", str(cfg.steps), *peer_args, "--group-size", str(group_size),
            "--wait-for-peers", str(n), "--join-timeout", str(cfg.join_timeout_s), "--json", "summary.json",
            "--run-id", f"bench-swarm-{n}-{group_size}"]
    load_before = os.getloadavg()
    sampler = Sampler(cfg.sample_s).start()
    start = time.monotonic()
    quiet = lambda line: None

    def folder(i: int) -> Path:
        return workdir / f"peer{i}"

    try:
        procs, _ = start_peers(n, lambda i: args, folder, quiet)
        for p in procs:
            sampler.watch(p.name, p.proc.pid)
        hung = wait_all(procs, start + cfg.timeout_s)
    finally:
        sampler.stop()
    wall = time.monotonic() - start
    for p in procs:
        p.read_to_end()
    result = figures(procs, sampler, hung)
    result.update(peers=n, group_size=group_size, steps=cfg.steps, wall_s=round(wall, 1),
                  load_before=[round(x, 2) for x in load_before],
                  load_during=_load(sampler.load), workdir=str(workdir), peer_args=args)
    echo(f"[bench swarm] {n} peers, groups of {group_size}: {result['rounds']['applied']} rounds applied, "
         f"{result['rounds']['skipped']} skipped ({result['rounds']['applied_fraction']:.1%}); "
         f"{len(hung)} hung; {wall:.0f}s")
    return result


def wait_all(procs: list[PeerProcess], deadline: float) -> list[str]:
    """Wait for every peer until `deadline`; stop whatever is left. A peer that exits with an error
    ends the run at once: the others (--wait-for-peers N) would wait for it until --join-timeout.
    Returns the names of the peers still running at the deadline (hung)."""
    hung = []
    try:
        while time.monotonic() < deadline:
            codes = [p.proc.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.5)
        else:
            hung = [p.name for p in procs if p.proc.poll() is None]
    finally:
        for p in procs:
            p.stop()
    return hung


def figures(procs: list[PeerProcess], sampler: Sampler, hung: list[str]) -> dict:
    summaries = {p.name: p.summary() for p in procs}
    done = {k: s for k, s in summaries.items() if s is not None}
    failed = sorted(k for k, s in summaries.items() if s is None and k not in hung)
    applied = sum(len(s["applied"]) for s in done.values())
    skipped = sum(s["skipped_rounds"] for s in done.values())
    waits = sorted(w for s in done.values() for w in s["matchmaking_s"])
    per_peer, rss_growth, tree_growth = {}, [], []
    for p in procs:
        s, samples = done.get(p.name), sampler.samples.get(p.name, [])
        t0, t1 = p.when(FIRST_AVERAGE), p.when(LAST_STEP)
        window = between(samples, t0, t1) if t0 is not None and t1 is not None else []
        rss, tree = growth(window, "rss"), growth(window, "rss_tree")
        io = [x.p2pd_io for x in window if x.p2pd_io >= 0]
        span_s = window[-1].t - window[0].t if len(window) > 1 else 0.0
        per_peer[p.name] = {
            "exit_code": p.proc.returncode, "rss": rss, "rss_tree": tree, "fds": growth(window, "fds"),
            "fds_tree": growth(window, "fds_tree"),
            "p2pd_io_bytes_per_s": round((io[-1] - io[0]) / span_s, 1) if len(io) > 1 and span_s else None,
            **({"applied": len(s["applied"]), "skipped": s["skipped_rounds"], "eval_loss": s["eval_loss"],
                "dht_calls": s["dht_calls"], "dht_calls_per_s": round(sum(s["dht_calls"].values()) / s["wall_s"], 2),
                "wall_s": round(s["wall_s"], 1)} if s else {})}
        if rss["growth_pct"] is not None:
            rss_growth.append(rss["growth_pct"])
            tree_growth.append(tree["growth_pct"])
    io_rates = [v["p2pd_io_bytes_per_s"] for v in per_peer.values() if v["p2pd_io_bytes_per_s"] is not None]
    call_rates = [v["dht_calls_per_s"] for v in per_peer.values() if "dht_calls_per_s" in v]
    mib = 1 << 20
    return {
        "completed": not hung and not failed and all(s["completed"] for s in done.values()),
        "hung": hung, "failed": failed,
        "rounds": {"applied": applied, "skipped": skipped,
                   "applied_fraction": applied / (applied + skipped) if applied + skipped else 0.0,
                   "min_peer_applied_fraction": min((len(s["applied"]) / max(1, len(s["applied"]) + s["skipped_rounds"])
                                                     for s in done.values()), default=0.0)},
        "matchmaking_s": {"averages": len(waits), "median": _q(waits, 0.5), "p90": _q(waits, 0.9),
                          "max": waits[-1] if waits else None},
        "dht": {"calls_per_peer_per_s": _mean(call_rates),
                "calls_by_kind": _sum_dicts(s["dht_calls"] for s in done.values()),
                "p2pd_io_bytes_per_peer_per_s": _mean(io_rates)},
        "rss": {"start_mb_mean": _mean([v["rss"]["start"] / mib for v in per_peer.values() if v["rss"]["start"]]),
                "end_mb_mean": _mean([v["rss"]["end"] / mib for v in per_peer.values() if v["rss"]["end"]]),
                "tree_start_mb_mean": _mean([v["rss_tree"]["start"] / mib for v in per_peer.values()
                                             if v["rss_tree"]["start"]]),
                "growth_pct_max": max(rss_growth, default=None), "growth_pct_mean": _mean(rss_growth),
                "tree_growth_pct_max": max(tree_growth, default=None)},
        "groups": check_groups(list(done.values())),
        "eval_loss_mean": _mean([s["eval_loss"] for s in done.values()]),
        "per_peer": per_peer,
    }


def check_groups(summaries: list[dict]) -> dict:
    """Every (fragment, round, group) any peer applied: did all its members apply the same mean?
    `mismatched`: groups whose members applied means of different hashes; `incomplete`: groups
    fewer of whose members applied a mean than the group has (some skipped a round others applied).
    `global_models`: distinct final global models among the peers (1 when groups cover the swarm)."""
    groups: dict[tuple, list] = {}
    for s in summaries:
        for f, rnd, group, size, mean in s["applied"]:
            groups.setdefault((f, rnd, group), []).append((size, mean))
    mismatched = sorted(k for k, v in groups.items() if len({m for _, m in v}) > 1)
    incomplete = sorted(k for k, v in groups.items() if len(v) != v[0][0])
    sizes = [v[0][0] for v in groups.values()]
    return {"checked": len(groups), "mismatched": len(mismatched), "incomplete": len(incomplete),
            "consistent": not mismatched and not incomplete,
            "examples": [list(k) for k in (mismatched + incomplete)[:5]],
            "mean_group_size": _mean(sizes),
            "global_models": len({s["global_fingerprint"] for s in summaries})}


def run_swarm_bench(cfg: SwarmBenchConfig, peer_args: list[str], json_path: str, echo=print) -> dict:
    cfg = cfg.validate()
    result = {"config": {"peers": list(cfg.peers), "group_sizes": list(cfg.group_sizes), "steps": cfg.steps,
                         "sample_s": cfg.sample_s, "training": TRAINING, "peer_args": peer_args},
              "cpus": os.cpu_count(), "runs": []}
    for n in cfg.peers:
        for g in cfg.group_sizes:
            result["runs"].append(run_one(n, g, cfg, peer_args, echo))
            _write(json_path, result)
    return result


def print_table(result: dict, out=print) -> None:
    out(f"{'peers':>5s} {'group':>5s} {'applied':>8s} {'skipped':>7s} {'applied%':>8s} {'mm med/p90/max s':>17s} "
        f"{'DHT calls/s':>11s} {'p2pd KB/s':>9s} {'RSS MB':>7s} {'RSS +%max':>9s} {'groups ok':>9s} "
        f"{'models':>6s} {'hung':>4s} {'wall s':>6s}")
    for r in result["runs"]:
        mm, g = r["matchmaking_s"], r["groups"]
        mm_text = "/".join("-" if x is None else f"{x:.1f}" for x in (mm["median"], mm["p90"], mm["max"]))
        io = r["dht"]["p2pd_io_bytes_per_peer_per_s"]
        out(f"{r['peers']:5d} {r['group_size']:5d} {r['rounds']['applied']:8d} {r['rounds']['skipped']:7d} "
            f"{r['rounds']['applied_fraction']:8.1%} {mm_text:>17s} {_fmt(r['dht']['calls_per_peer_per_s']):>11s} "
            f"{_fmt(io / 1000 if io is not None else None):>9s} {_fmt(r['rss']['start_mb_mean'], 0):>7s} "
            f"{_fmt(r['rss']['growth_pct_max'], 2):>9s} {'yes' if g['consistent'] else 'NO':>9s} "
            f"{g['global_models']:6d} {len(r['hung']):4d} {r['wall_s']:6.0f}")


def _fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _q(xs: list[float], q: float) -> float | None:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def _mean(xs) -> float | None:
    xs = list(xs)
    return round(statistics.fmean(xs), 3) if xs else None


def _sum_dicts(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _load(load: list[tuple[float, float]]) -> dict:
    values = [x for _, x in load]
    return {"mean": _mean(values), "max": max(values, default=None)}


def _write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers like 8,16,32, got '{text}'") from None


def add_parser(bench_sub) -> None:
    p = bench_sub.add_parser("swarm", help="N real peers on loopback per swarm size: rounds, matchmaking, DHT, RSS",
                             description="Options not listed here (any `peer` option) are passed to every peer.")
    p.add_argument("--peers", default="8,16,32", help="swarm sizes, comma-separated (default: %(default)s)")
    p.add_argument("--group-size", dest="group_sizes", default="16",
                   help="the peers' --group-size, comma-separated; each swarm size runs with each (default: %(default)s)")
    p.add_argument("--steps", type=int, default=60, help="inner steps of each run (default: %(default)s)")
    p.add_argument("--sample-seconds", type=float, default=2.0, help="how often each peer's RSS, fds and p2pd "
                   "I/O are read (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run; a peer still running then has hung")
    p.add_argument("--join-timeout", type=float, default=600, help="every peer's --join-timeout (default: %(default)s)")
    p.add_argument("--workdir", default="runs/bench-swarm", help="every peer's log and summary, by run")
    p.add_argument("--json", metavar="FILE", required=True)
    p.set_defaults(threads=0)


def cli(args, peer_args: list[str]) -> int:
    cfg = SwarmBenchConfig(_ints(args.peers), _ints(args.group_sizes), args.steps, args.sample_seconds, args.timeout,
                           args.join_timeout, args.workdir)
    result = run_swarm_bench(cfg, peer_args, args.json, echo=lambda m: print(m, flush=True))
    print_table(result)
    print(f"results in {args.json}")
    return 0
