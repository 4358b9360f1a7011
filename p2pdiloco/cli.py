"""The `p2pdiloco` command: simulate, peer, status, local-swarm, plot, keygen, admit, tokenize, train-tokenizer,
bench quality, bench allreduce, bench attack, bench resume, bench wan, bench swarm, bench soak.

Errors in configs or input print one line that says what to fix and exit with status 2;
Ctrl-C stops with status 130 and keeps what was already written.
"""
from __future__ import annotations

import argparse
import logging
import sys

import torch

from . import config


def build_parser() -> argparse.ArgumentParser:
    """Every command's options; tests parse the docker image's command lines with it."""
    parser = argparse.ArgumentParser(prog="p2pdiloco", description="Peer-to-peer Streaming DiLoCo trainer.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="train M workers in one process and write a JSON summary")
    config.add_options(sim)
    sim.add_argument("--json", metavar="FILE", default="simulate.json", help="summary file (default: %(default)s)")
    sim.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")

    tok = sub.add_parser("tokenize", help="text folders, JSONL or Parquet -> token shards that --data reads")
    tok.add_argument("inputs", nargs="*", metavar="INPUT", help="text files or folders, .jsonl or .parquet files "
                     "(default: the default corpus, the stdlib's .py sources)")
    tok.add_argument("--tokenizer", metavar="FILE", required=True, help="a tokenizer.json")
    tok.add_argument("--out", metavar="DIR", required=True, help="an empty or new folder for the shards")
    tok.add_argument("--text-field", default="text", help="the JSONL / Parquet field that holds the text")
    tok.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (default: %(default)s)")
    tok.set_defaults(threads=0)
    train_tok = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer here (no download)")
    train_tok.add_argument("inputs", nargs="*", metavar="INPUT", help="as for tokenize (default: the default corpus)")
    train_tok.add_argument("--out", metavar="FILE", required=True, help="where to write the tokenizer.json")
    train_tok.add_argument("--vocab-size", type=int, default=8192)
    train_tok.add_argument("--text-field", default="text")
    train_tok.add_argument("--max-mb", type=float, default=0.0, help="train on the first this many MB of text (0: all)")
    train_tok.set_defaults(threads=0)

    bench = sub.add_parser("bench", help="benchmarks that write JSON")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    quality = bench_sub.add_parser("quality", help="data-parallel vs DiLoCo vs Streaming DiLoCo on the same tokens")
    quality.add_argument("--preset", choices=["smoke", "small", "small-b16"], default="smoke")
    quality.add_argument("--methods", nargs="+", metavar="NAME", help="a subset of the methods (default: all five)")
    quality.add_argument("--json", metavar="FILE", required=True, help="results; a PNG plot is written beside it")
    quality.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); "
                         "with --jobs, per process")
    quality.add_argument("--jobs", type=int, default=1, help="methods run side by side in this many processes "
                         "(each its own seeded run: the results do not change)")
    config.add_options(quality)
    allreduce = bench_sub.add_parser("allreduce", help="one average across N peer processes: ours vs gloo vs hivemind")
    allreduce.add_argument("--peers", type=int, default=4)
    allreduce.add_argument("--numel", type=int, default=10_000_000, help="fp32 values per peer (default: %(default)s)")
    allreduce.add_argument("--repeats", type=int, default=5, help="timed averages per method, after one warm-up")
    allreduce.add_argument("--bandwidth", metavar="RATE", help="shape loopback to this rate (100mbit; root)")
    allreduce.add_argument("--methods", nargs="+", metavar="NAME", help="the methods to run (default: the four of the issue; "
                           "p2pdiloco_grpc_fp32 and p2pdiloco_grpc_e3m0 run Reduce over gRPC, "
                           "p2pdiloco_e3m0-huffman Huffman-codes E3M0's codes)")
    allreduce.add_argument("--auth", action="store_true", help="also run each p2pdiloco method as a closed run "
                           "(mutual TLS with a throwaway run CA, every caller's admission checked), as METHOD_auth")
    allreduce.add_argument("--json", metavar="FILE", required=True)
    allreduce.set_defaults(threads=0)  # every peer process uses one thread
    attack = bench_sub.add_parser("attack", help="4 peers, one adversarial per scenario: honest loss vs a calm run")
    attack.add_argument("--scenarios", nargs="+", metavar="NAME", help="default: calm, calm-mean and every attack")
    attack.add_argument("--baseline", action="store_true", help="also run each attack against undefended peers "
                        "(plain mean, no checks)")
    attack.add_argument("--peer-args", default="", help="more `p2pdiloco peer` options for every peer, one string")
    attack.add_argument("--workdir", default="runs/bench-attack", help="every peer's log and summary, by scenario")
    attack.add_argument("--json", metavar="FILE", required=True)
    attack.set_defaults(threads=0)
    from .wan.cli import add_parser as add_bench_wan_parser
    add_bench_wan_parser(bench_sub)
    from .bench_resume import add_parser as add_bench_resume_parser
    add_bench_resume_parser(bench_sub)
    from .bench_swarm import add_parser as add_bench_swarm_parser
    add_bench_swarm_parser(bench_sub)
    from .bench_soak import add_parser as add_bench_soak_parser
    add_bench_soak_parser(bench_sub)

    from .swarm.cli import add_local_swarm_parser, add_peer_parser
    add_peer_parser(sub)
    add_local_swarm_parser(sub)
    from .swarm.admission_cli import add_parsers as add_admission_parsers
    add_admission_parsers(sub)
    from .plot import add_parser as add_plot_parser
    add_plot_parser(sub)
    return parser


# Benchmarks that start peer processes: the options they do not know go to every peer.
PASS_THROUGH = ("resume", "swarm", "soak")


def main(argv: list[str] | None = None) -> int:
    from .swarm.control import SwarmStartError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "local-swarm" and getattr(args, "bench", None) not in PASS_THROUGH:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.command == "simulate":
            return _simulate(args)
        if args.command in ("tokenize", "train-tokenizer"):
            return _tokens(args)
        if args.command == "local-swarm":
            from .swarm.cli import run_local_swarm_command
            return run_local_swarm_command(args, rest)
        if args.command == "plot":
            from .plot import cli as plot
            return plot(args)
        if args.command in ("keygen", "admit"):
            from .swarm.admission_cli import run as run_admission_command
            return run_admission_command(args)
        if args.command in ("peer", "status"):
            from .swarm.cli import run_peer_command, run_status_command
            return run_peer_command(args) if args.command == "peer" else run_status_command(args)
        if args.bench == "allreduce":
            from .bench_allreduce import cli as bench_allreduce
            return bench_allreduce(args)
        if args.bench == "attack":
            return _bench_attack(args)
        if args.bench == "resume":  # the options it does not know go to every peer
            from .bench_resume import cli as bench_resume
            return bench_resume(args, rest)
        if args.bench == "swarm":
            from .bench_swarm import cli as bench_swarm
            return bench_swarm(args, rest)
        if args.bench == "soak":
            from .bench_soak import cli as bench_soak
            return bench_soak(args, rest)
        if args.bench == "wan":
            from .wan.cli import cli as bench_wan
            return bench_wan(args)
        return _bench_quality(args)
    except (ValueError, SwarmStartError, TimeoutError) as exc:
        print(f"p2pdiloco: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("p2pdiloco: interrupted", file=sys.stderr)
        return 130


def _simulate(args) -> int:
    from .simulate import run_simulation, write_json

    cfg = config.sim_config(args)
    summary = run_simulation(cfg)
    write_json(args.json, summary)
    print(f"eval loss {summary['eval_loss_initial']:.4f} -> {summary['eval_loss']:.4f}; "
          f"{summary['tokens']:,} tokens; {summary['bytes_sent_per_worker']:,} bytes sent per worker "
          f"(largest sync {summary['peak_sync_bytes']:,}); {summary['wall_s']:.1f}s; summary in {args.json}")
    return 0


def _bench_attack(args) -> int:
    import shlex

    from tqdm import tqdm

    from .bench_attack import SCENARIOS, print_table, run_attack_bench
    unknown = [s for s in args.scenarios or () if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"--scenarios: {', '.join(unknown)} unknown; choose from {', '.join(SCENARIOS)}")
    result = run_attack_bench(args.json, args.workdir, tuple(args.scenarios or SCENARIOS),
                              tuple(shlex.split(args.peer_args)), args.baseline,
                              echo=lambda m: tqdm.write(m, file=sys.stderr))  # above its bar over the scenarios
    print_table(result)
    return 0


def _tokens(args) -> int:
    from . import shards
    if args.command == "train-tokenizer":
        shards.train(args.inputs, args.vocab_size, args.out, args.text_field, args.max_mb)
        from .tokenizer import vocab_size
        print(f"tokenizer of {vocab_size(args.out):,} tokens in {args.out}")
        return 0
    meta = shards.tokenize(args.inputs, args.tokenizer, args.out, args.text_field, args.shard_tokens)
    print(f"{meta['documents']:,} documents -> {meta['tokens']:,} tokens ({meta['dtype']}) in "
          f"{len(meta['shards'])} shard(s) under {args.out}; train on them with --data {args.out} "
          f"--tokenizer {args.tokenizer}")
    return 0


def _bench_quality(args) -> int:
    from .bench_quality import METHODS, PRESETS, run_quality

    cfg = config.sim_config(args, defaults=PRESETS[args.preset])
    result = run_quality(args.preset, cfg, args.json, tuple(args.methods or METHODS),
                         progress=lambda m: print(m, file=sys.stderr, flush=True), jobs=args.jobs,
                         threads=args.threads)
    print(f"{'method':32s} {'eval loss':>9s} {'vs DP':>7s} {'bytes/worker':>14s} {'DP/bytes':>9s} {'peak sync':>11s} {'wall s':>7s}")
    for name, m in result["methods"].items():
        r = result["ratios"][name]
        print(f"{name:32s} {m['eval_loss']:9.4f} {r.get('eval_loss_vs_data_parallel', float('nan')):7.4f} "
              f"{m['bytes_sent_per_worker']:14,d} {r.get('bytes_fewer_than_data_parallel', float('nan')):9.1f} "
              f"{m['peak_sync_bytes']:11,d} {m['wall_s']:7.1f}")
    print(f"results in {args.json}, plot in {args.json.rsplit('.', 1)[0]}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
