"""`p2pdiloco bench wan`'s options and its table (bench_wan.py runs it)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .bench_wan import DEFAULT_METHODS, LOADED, METHODS, SLOWDOWN_METHODS, TRAINING, WanBenchConfig, run_wan_bench
from .host import BedError
from .links import LinkSpec, parse_delay_ms


def add_parser(bench_sub) -> None:
    wan = bench_sub.add_parser("wan", help="the methods by real peers in network namespaces behind shaped links (root)")
    wan.add_argument("--peers", type=int, default=4)
    wan.add_argument("--bandwidth", default="20mbit", metavar="RATE", help="each peer's link, each direction (tc rate)")
    wan.add_argument("--delay", default="25ms", help="one-way delay between two peers (default: %(default)s)")
    wan.add_argument("--loss", type=float, default=0.0, metavar="PCT", help="packet loss between two peers, percent")
    wan.add_argument("--steps", type=int, default=300)
    wan.add_argument("--H", type=int, default=30)
    wan.add_argument("--fragments", type=int, default=2)
    wan.add_argument("--tau", type=int, default=5, help="overlap of streaming_overlap_e3m0 and time_budget, in steps")
    wan.add_argument("--seed", type=int, default=0)
    wan.add_argument("--model", default=TRAINING["--model"])
    wan.add_argument("--batch-size", default=TRAINING["--batch-size"])
    wan.add_argument("--methods", nargs="+", metavar="NAME",
                     help=f"of {' '.join(METHODS)}; default: {' '.join(DEFAULT_METHODS)}; "
                          f"with --slowdown: {' '.join(SLOWDOWN_METHODS)}")
    wan.add_argument("--slowdown", metavar="F,F,...", help="per peer: each step takes F times its compute")
    wan.add_argument("--round-seconds", type=float, default=0.0, help="time_budget's round (default: from the fixed-H run)")
    wan.add_argument("--duration", type=float, default=0.0, help="time_budget's length (default: from the fixed-H run)")
    wan.add_argument("--eval-every-seconds", type=float, help="eval loss against wall clock (default: 10 with --slowdown)")
    wan.add_argument("--method-timeout", type=float, default=0.0, help="seconds before a method's peers are stopped")
    wan.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                     help="on a shared machine: wait up to this long before each method for other processes to go quiet")
    wan.add_argument("--retries", type=int, default=0, help="run a method again when other processes took "
                                                            f"over {LOADED * 100:.0f}%% of the machine meanwhile")
    wan.add_argument("--backend", choices=["auto", "netem", "wire"], default="auto")
    wan.add_argument("--peer-args", default="", help="more `p2pdiloco peer` options for every peer, one string")
    wan.add_argument("--workdir", default="runs/bench-wan", help="every peer's log and summary, by method")
    wan.add_argument("--json", metavar="FILE", required=True, help="results; a PNG plot is written beside it")
    wan.set_defaults(threads=0)


def cli(args) -> int:
    slowdown = tuple(float(x) for x in args.slowdown.split(",")) if args.slowdown else ()
    eval_every = args.eval_every_seconds if args.eval_every_seconds is not None else (10.0 if slowdown else 0.0)
    cfg = WanBenchConfig(
        link=LinkSpec(args.bandwidth, parse_delay_ms(args.delay, "--delay"), args.loss), peers=args.peers,
        steps=args.steps, H=args.H, fragments=args.fragments, tau=args.tau, seed=args.seed,
        methods=tuple(args.methods or (SLOWDOWN_METHODS if slowdown else DEFAULT_METHODS)), slowdown=slowdown,
        round_seconds=args.round_seconds, duration=args.duration, eval_every_seconds=eval_every,
        method_timeout_s=args.method_timeout, backend=args.backend, quiet_wait_s=args.wait_quiet,
        retries=args.retries,
        training={**TRAINING, "--model": args.model, "--batch-size": str(args.batch_size)},
        extra_args=tuple(shlex.split(args.peer_args)))
    try:
        result = run_wan_bench(cfg, args.json, args.workdir, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except BedError as exc:
        print(f"p2pdiloco: error: bench wan: {exc}", file=sys.stderr)
        return 2
    print(f"{'method':24s} {'compute':>8s} {'(min)':>6s} {'vs no_sync':>10s} {'bytes/peer':>13s} {'eval loss':>9s} "
          f"{'wall s':>7s} {'wait s':>7s} {'matchmaking s':>13s} {'other CPU s':>11s}")
    for name, m in result["methods"].items():
        if "error" in m:
            print(f"{name:24s} failed: {m['error'].splitlines()[0]}")
            continue
        mm = m["matchmaking_s_mean"]
        print(f"{name:24s} {m['compute_utilization']:8.1%} {m['compute_utilization_min']:6.1%} "
              f"{m.get('speed_vs_no_sync', float('nan')):10.2f} {m['bytes_sent_per_peer']:13,d} {m['eval_loss']:9.4f} "
              f"{m['wall_s']:7.1f} {m['wait_s']:7.1f} {'-' if mm is None else f'{mm:.2f}':>13s} {m['other_cpu_s']:11.1f}")
    print("\nper round (mean over peers and rounds; the final sync apart): seconds of matchmaking (left once Δ "
          "was handed in), transfer, latency (Δ to mean), loop blocked; τ used")
    for name, m in result["methods"].items():
        r = m.get("per_round")
        if not r or not r["rounds"]:
            continue
        f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        print(f"{name:24s} matchmaking {f(r['matchmaking_s'])} ({f(r['matchmaking_left_s'])})  transfer "
              f"{f(r['transfer_s'])}  latency {f(r['latency_s'])}  blocked {f(r['wait_s'])}  "
              f"(final {f(r['final_wait_s'])})  τ {r['taus']}  step {f(r['step_s'])}s")
    print(f"results in {args.json}, plot in {Path(args.json).with_suffix('.png')}, peer logs under {args.workdir}")
    return 0 if all("error" not in m for m in result["methods"].values()) else 1
