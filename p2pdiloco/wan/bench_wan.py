"""`p2pdiloco bench wan`: the same training run, one method after another, by real peers in network
namespaces behind shaped links (netns.py): how much of its wall time each method computes.

Every method trains the same model from the same seed for the same steps on the same data shards
(peer i takes shard i of N), with the same H, and the methods mirror `bench quality`'s
(bench_quality.method_config):
- no_sync: the reference; the peers start together and sync once, at the end (4-bit), so their
  compute time is what the steps cost on this machine with no averaging to wait for;
- data_parallel: gradients averaged every step through our data plane, in bf16;
- diloco: the whole model (P = 1) every H steps, fp32, τ = 0: training stops for every average;
- streaming_overlap_e3m0: P fragments, 4-bit E3M0, α = 0.5 and τ = --tau steps of overlap (τ > 0
  chosen so an average lands in time on the link; τ·(P + 1) < H);
- streaming_tau_auto: streaming_overlap_e3m0 with `--tau auto`: each peer sizes τ to its measured
  round latency and step time (overlap.py); not among the defaults;
- time_budget: streaming_overlap_e3m0 whose fragments sync every --round-seconds of wall clock and
  which ends after --duration seconds (peers of different speeds do different numbers of steps).
  Without those options it takes the wall time and the number of rounds of the fixed-H
  streaming_overlap_e3m0 run before it.
`--slowdown 1,1,1,3` makes peer i's steps take that many times their compute (emulated slower
hardware) in every method; its default methods are then streaming_overlap_e3m0 (fixed H) and
time_budget, and every peer records eval loss against wall clock (`eval_curves`, and a plot).

compute_utilization is each peer's `compute_fraction` (wall time not spent waiting on the network,
swarm/peer.py); speed_vs_no_sync is the share of the wall time the same steps take in no_sync's
compute time, which also counts what the network costs in CPU on a shared machine. other_cpu_s is
the CPU that processes outside the bed took during a method: a measurement is clean only where it
is near zero.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..bench_quality import method_config
from ..simulate import write_json
from ..streaming import StreamingConfig
from .dht_probe import probe_matchmaking
from .host import OtherLoad, wait_quiet
from .links import BedConfig, LinkSpec
from .netns import NetnsBed
from .peers import link_check, start_peers, wait_peers
from .plot import plot

METHODS = ("no_sync", "data_parallel", "diloco", "streaming_overlap_e3m0", "time_budget", "streaming_tau_auto")
DEFAULT_METHODS = METHODS[:5]
SLOWDOWN_METHODS = ("streaming_overlap_e3m0", "time_budget")
# Training options every method shares (the tiny model at a learning rate that moves in a few hundred steps).
TRAINING = {"--model": "tiny", "--batch-size": "8", "--seq-len": "128", "--eval-batches": "8",
            "--inner-lr": "3e-3", "--warmup-steps": "30", "--outer-lr": "0.7", "--outer-momentum": "0.5"}
# Swarm options for a WAN: peers start on a loaded 2-core machine, so joining gets time.
SWARM = {"--join-timeout": "180", "--matchmaking-timeout": "5", "--reduce-timeout": "30", "--timeout": "60"}
LOADED = 0.02  # share of the machine's CPU that other processes may take before a method counts as disturbed


@dataclass(frozen=True)
class WanBenchConfig:
    link: LinkSpec = LinkSpec()
    peers: int = 4
    steps: int = 300
    H: int = 30
    fragments: int = 2
    tau: int = 5
    seed: int = 0
    methods: tuple[str, ...] = DEFAULT_METHODS
    slowdown: tuple[float, ...] = ()  # per peer; () = all at full speed
    round_seconds: float = 0.0  # time_budget; 0: from the fixed-H run
    duration: float = 0.0  # time_budget; 0: from the fixed-H run
    eval_every_seconds: float = 0.0  # peers' eval-loss-against-wall-clock curve; 0: start and end only
    method_timeout_s: float = 0.0  # 0: 300 s + 4 s per step × the largest slowdown
    # A shared machine: wait up to this long before each method for other processes to go quiet,
    # and run a method again (up to `retries` times) when others took over LOADED of the machine.
    quiet_wait_s: float = 0.0
    retries: int = 0
    backend: str = "auto"
    training: dict = field(default_factory=lambda: dict(TRAINING))  # flag -> value, overridable
    extra_args: tuple[str, ...] = ()  # given to every peer as is

    def validate(self) -> "WanBenchConfig":
        self.link.validate()
        if self.peers < 2 or self.steps < 1 or self.retries < 0 or self.quiet_wait_s < 0:
            raise ValueError(f"bench.peers must be ≥ 2, bench.steps ≥ 1, bench.retries and bench.quiet_wait_s ≥ 0; "
                             f"got {self.peers}, {self.steps}, {self.retries}, {self.quiet_wait_s}")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"--methods: '{m}' is unknown; choose from {', '.join(METHODS)}")
        if self.slowdown and (len(self.slowdown) != self.peers or min(self.slowdown) < 1):
            raise ValueError(f"--slowdown needs one factor ≥ 1 per peer ({self.peers}), got {list(self.slowdown)}")
        if "time_budget" in self.methods and not (self.round_seconds and self.duration):
            if "streaming_overlap_e3m0" not in self.methods[:self.methods.index("time_budget")]:
                raise ValueError("time_budget needs --round-seconds and --duration, or streaming_overlap_e3m0 "
                                 "run before it (its wall time and rounds are then used)")
        from ..models import model_info
        blocks = model_info(self.training.get("--model", "tiny")).n_blocks
        for m in self.methods:
            streaming_config(self, m, 1.0).validate(blocks)  # tau·(P + 1) < H and the like, before any peer starts
        return replace(self, method_timeout_s=self.method_timeout_s or 300 + 4 * self.steps * max(self.slowdown or (1,)))


def streaming_config(cfg: WanBenchConfig, name: str, round_s: float) -> StreamingConfig:
    base = StreamingConfig(H=cfg.H, fragments=cfg.fragments)
    if name == "no_sync":  # one fragment, synced once, at the very end (4-bit: a short final wait)
        return replace(base, H=cfg.steps, fragments=1, tau=0, alpha=0.0, codec="e3m0")
    if name == "streaming_tau_auto":
        return replace(method_config("streaming_overlap_e3m0", base), tau_auto=True)
    if name in ("streaming_overlap_e3m0", "time_budget"):
        s = replace(method_config("streaming_overlap_e3m0", base), tau=cfg.tau)
        return replace(s, round_s=round_s, duration_s=cfg.duration or 1.0) if name == "time_budget" else s
    if name == "data_parallel":
        # Gradients travel in bf16 whatever the codec, but a peer's data plane accepts only its run's
        # codec (swarm/dataplane.py), so a data-parallel run must name bf16 as its codec.
        return replace(method_config(name, base), codec="bf16")
    return method_config(name, base)


def peer_args(cfg: WanBenchConfig, name: str, i: int, host: str, budget: tuple[float, float]) -> list[str]:
    s = streaming_config(cfg, name, budget[0])
    args = [x for kv in cfg.training.items() for x in kv] + [x for kv in SWARM.items() for x in kv]
    args += ["--steps", str(cfg.steps), "--seed", str(cfg.seed), "--workers", str(cfg.peers), "--shard", str(i),
             "--mode", s.mode, "--H", str(s.H), "--fragments", str(s.fragments), "--tau", "auto" if s.tau_auto else str(s.tau),
             "--alpha", str(s.alpha), "--codec", s.codec, "--host", host, "--threads", "1", "--json", "summary.json",
             "--run-id", f"wan-{name}", "--wait-for-peers", str(cfg.peers)]
    if name == "time_budget":
        args += ["--round-seconds", f"{budget[0]:.3f}", "--duration", f"{budget[1]:.3f}"]
    if cfg.slowdown:
        args += ["--slowdown", str(cfg.slowdown[i])]
    if cfg.eval_every_seconds:
        args += ["--eval-every-seconds", str(cfg.eval_every_seconds)]
    return args + list(cfg.extra_args)


def summarize(summaries: list[dict]) -> dict:
    mean = statistics.fmean
    cf, losses = [s["compute_fraction"] for s in summaries], [s["eval_loss"] for s in summaries]
    rounds = [x for s in summaries for x in s["matchmaking_s"]]
    return {"compute_utilization": mean(cf), "compute_utilization_min": min(cf),
            "bytes_sent_per_peer": int(mean(s["bytes_sent"] for s in summaries)),
            "bytes_sent_max": max(s["bytes_sent"] for s in summaries),
            "eval_loss": mean(losses), "eval_loss_spread": max(losses) - min(losses),
            "eval_loss_initial": summaries[0]["eval_loss_initial"],
            "wall_s": max(s["wall_s"] for s in summaries), "wait_s": mean(s["wait_s"] for s in summaries),
            "compute_s": mean(s["wall_s"] * s["compute_fraction"] for s in summaries),
            "wait_s_max": max(s["wait_s"] for s in summaries),
            "steps": [s["steps"] for s in summaries], "completed": all(s["completed"] for s in summaries),
            "skipped_rounds": sum(s["skipped_rounds"] for s in summaries),
            "averages": len(rounds), "matchmaking_s_mean": mean(rounds) if rounds else None,
            "matchmaking_s_max": max(rounds) if rounds else None,
            **round_timings(summaries),
            "eval_curves": [s.get("eval_curve", []) for s in summaries], "peer_summaries": summaries}


def round_timings(summaries: list[dict]) -> dict:
    """Per round, over every peer's rounds (the final sync apart: it blocks by design): the time in
    matchmaking (all of it, and what was left once the Δ was handed in: a group formed ahead leaves
    none), in the transfer (reduce-scatter + all-gather, which includes waiting for the group's
    last part), the latency from handing in Δ to its mean, and how long the training loop blocked
    on it; and the τ each regular round was sent with."""
    def mean(xs):
        return statistics.fmean(xs) if xs else None
    rounds = [r for s in summaries for r in s.get("round_log", []) if not r["final"]]
    finals = [r for s in summaries for r in s.get("round_log", []) if r["final"]]
    taus: dict[str, int] = {}
    for r in rounds:
        taus[str(r["tau"])] = taus.get(str(r["tau"]), 0) + 1
    return {"per_round": {
        "rounds": len(rounds), "failed": sum(not r["ok"] for r in rounds),
        "matchmaking_s": mean([x for s in summaries for x in s["matchmaking_s"]]),
        "matchmaking_left_s": mean([x for s in summaries for x in s.get("matchmaking_left_s", [])]),
        "transfer_s": mean([x for s in summaries for x in s.get("transfer_s", [])]),
        "latency_s": mean([r["latency_s"] for r in rounds if r["latency_s"] is not None]),
        "wait_s": mean([r["wait_s"] for r in rounds]),
        "final_wait_s": mean([r["wait_s"] for r in finals]),
        "prepared": sum(s.get("prepared_rounds", 0) for s in summaries),
        "step_s": mean([s["step_s"] for s in summaries if s.get("step_s")]),
        "taus": dict(sorted(taus.items(), key=lambda kv: int(kv[0])))}}


def run_method(bed: NetnsBed, cfg: WanBenchConfig, name: str, workdir: Path, budget, progress) -> dict:
    progress(f"[bench wan] {name}: starting {cfg.peers} peers ({bed.backend} link {cfg.link.rate}, "
             f"{cfg.link.delay_ms:g} ms, {cfg.link.loss_pct:g}% loss)")
    started, cpu0 = time.monotonic(), bed.wire_cpu_s()
    other = OtherLoad({os.getpid()} | ({bed.wire.pid} if bed.wire else set()))
    peers = []
    try:
        peers = start_peers(bed, lambda i: peer_args(cfg, name, i, bed.addresses[i], budget), workdir / name,
                            progress)
        late = wait_peers(peers, cfg.method_timeout_s - (time.monotonic() - started))
    except RuntimeError as exc:
        return {"error": str(exc)}
    finally:
        bed.stop([p.proc for p in peers])
        other_cpu_s = other.stop()
    if late:
        return {"error": f"peer(s) {', '.join(late)} still running after --method-timeout "
                         f"{cfg.method_timeout_s:.0f}s; stopped (logs under {workdir / name})"}
    summaries = [p.summary() for p in peers]
    failed = [p for p, s in zip(peers, summaries) if s is None]
    if failed:
        return {"error": f"peer {failed[0].name} failed (exit {failed[0].proc.returncode}):\n{failed[0].tail()}"}
    result = summarize(summaries)
    # other_cpu_s: CPU that processes outside the bed took meanwhile; on 2 cores, more than a few
    # seconds means the peers did not have the machine to themselves and the figures are too low.
    result.update(method_wall_s=time.monotonic() - started, wire_cpu_s=bed.wire_cpu_s() - cpu0,
                  other_cpu_s=other_cpu_s)
    return result


def run_wan_bench(cfg: WanBenchConfig, json_path: str, workdir: str, progress=print) -> dict:
    cfg = cfg.validate()
    link = cfg.link
    result = {"bandwidth": link.rate, "delay": f"{link.delay_ms:g}ms", "loss": link.loss_pct, "peers": cfg.peers,
              "slowdown": list(cfg.slowdown) or None,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "code": _code_version(),
              "config": {k: v for k, v in asdict(cfg).items() if k != "link"}, "methods": {}}
    root = Path(workdir)  # every peer's log and summary, by method
    with NetnsBed(BedConfig(peers=cfg.peers, link=link, backend=cfg.backend)) as bed:
        result["backend"] = bed.backend
        result["link_check"] = link_check(bed)
        progress(f"[bench wan] link check, peer 0 → 1: round trip {result['link_check']['rtt_ms']:.1f} ms, "
                 f"{result['link_check']['goodput_mbit_s']:.1f} Mbit/s goodput")
        result["matchmaking_floor"] = probe_matchmaking(bed)
        progress(f"[bench wan] matchmaking floor (all peers declare at once, DHT only): "
                 f"{result['matchmaking_floor']['all_declared_s']:.2f}s median")
        budget = (cfg.round_seconds, cfg.duration)
        for name in cfg.methods:
            for attempt in range(1 + cfg.retries):
                if cfg.quiet_wait_s:
                    waited = wait_quiet(cfg.quiet_wait_s)
                    progress(f"[bench wan] waited {waited:.0f}s for other processes to quiet down")
                m = run_method(bed, cfg, name, root, budget, progress)
                m["attempts"] = attempt + 1
                if "error" in m or m["other_cpu_s"] <= LOADED * m["method_wall_s"] * (os.cpu_count() or 1):
                    break
                progress(f"[bench wan] {name}: other processes took {m['other_cpu_s']:.0f} CPU s meanwhile"
                         + ("; running it again" if attempt < cfg.retries else "; its figures are too low"))
            result["methods"][name] = m
            if name == "streaming_overlap_e3m0" and "error" not in m and not (cfg.round_seconds and cfg.duration):
                rounds = cfg.steps / cfg.H  # time_budget: the same wall time and number of rounds
                budget = (cfg.round_seconds or m["wall_s"] / rounds, cfg.duration or m["wall_s"])
                m["time_budget_from_this"] = {"round_seconds": budget[0], "duration": budget[1]}
            if "error" in m:
                progress(f"[bench wan] {name}: FAILED: {m['error']}")
            write_json(json_path, result)  # partial results survive an interrupted run
    add_speeds(result)
    write_json(json_path, result)
    plot(result, Path(json_path).with_suffix(".png"))
    return result


def add_speeds(result: dict) -> None:
    """speed_vs_no_sync: the share of a method's wall time that its peers' steps would take with no
    network at all (no_sync's compute time per step × the method's mean steps); a time-budget run's
    peers do different numbers of steps."""
    ref = result["methods"].get("no_sync", {})
    if "compute_s" not in ref:
        return
    step_s = ref["compute_s"] / statistics.fmean(ref["steps"])
    for m in result["methods"].values():
        if "wall_s" in m:
            m["speed_vs_no_sync"] = step_s * statistics.fmean(m["steps"]) / m["wall_s"]


def _code_version() -> str | None:
    """The checkout the peers ran (`git describe --always --dirty`), where there is one."""
    import subprocess
    try:
        r = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[2]), "describe", "--always", "--dirty"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None

