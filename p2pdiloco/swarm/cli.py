"""The swarm's commands: `p2pdiloco peer` and `p2pdiloco status`.

`peer` takes every training option of `simulate` (or a `--config` file, whose `[swarm]` table holds
the fields of `SwarmConfig`) plus the swarm options below; options given on the command line win.
"""
from __future__ import annotations

import argparse
import json

from .. import config
from ..config import build
from ..hardware import HardwareConfig, load_profile, profile_names
from .config import SwarmConfig

SWARM_OPTIONS: list[tuple[str, str, dict]] = [
    ("--initial-peers", "initial_peers", {"nargs": "+", "metavar": "MADDR",
                                          "help": "multiaddrs of live peers (none: start a new swarm)"}),
    ("--run-id", "run_id", {"help": "name of the run; peers of one run find each other by it"}),
    ("--host", "host", {"help": "address to listen on (default 127.0.0.1)"}),
    ("--announce-host", "announce_host", {"help": "address other peers reach this one at"}),
    ("--port", "port", {"type": int, "help": "gRPC data plane port (default 0: any free port)"}),
    ("--bulk-port", "bulk_port", {"type": int, "help": "TCP port on which Reduce's tensors travel outside gRPC, "
                                  "2x faster (default 0: any free port; -1: none, Reduce over gRPC)"}),
    ("--dht-port", "dht_port", {"type": int, "help": "libp2p DHT port (default 0: any free port)"}),
    ("--identity", "identity_path", {"metavar": "FILE", "help": "libp2p key file for a stable peer id"}),
    ("--admission", "admission_dir", {"metavar": "DIR", "help": "a closed run: this peer's admission folder "
                                      "(`p2pdiloco keygen --peer DIR`, then the owner's `p2pdiloco admit`); its "
                                      "identity.key is the peer's --identity unless one is given"}),
    ("--revoked", "revoked_path", {"metavar": "FILE", "help": "a closed run: peer ids no longer admitted, one per "
                                   "line (read again when it changes)"}),
    ("--bulk-encryption", "bulk_encryption", {"choices": ["aes-gcm", "none"], "help": "a closed run: seal the bulk "
                                              "port's messages with AES-GCM (default), or send them plain after each "
                                              "connection's TLS handshake when both ends choose none (a private "
                                              "network, such as a WireGuard overlay)"}),
    ("--join-dir", "join_dir", {"metavar": "DIR", "help": "shared folder of live peers' addresses: publish this "
                                "peer's there, and join through them when no --initial-peers are given"}),
    ("--transport", "transport", {"choices": ["auto", "grpc", "libp2p"], "help": "how others reach this peer; "
                                  "auto (default): gRPC if a live peer can dial it, else libp2p"}),
    ("--group-size", "group_size", {"type": int}),
    ("--matchmaking-timeout", "matchmaking_s", {"type": float, "help": "a round's window, in seconds from its first declaration (default 5)"}),
    ("--declare-ahead", "declare_ahead", {"type": int, "metavar": "STEPS", "help": "start a round's matchmaking this "
                                          "many steps before it is due (default -1: sized from the measured "
                                          "matchmaking and step time; 0: when due)"}),
    ("--reduce-timeout", "reduce_timeout_s", {"type": float, "help": "seconds to wait for parts and answers"}),
    ("--heartbeat", "heartbeat_s", {"type": float}),
    ("--record-ttl", "record_ttl_s", {"type": float}),
    ("--join-timeout", "join_timeout_s", {"type": float}),
    ("--wait-for-peers", "wait_for_peers", {"type": int, "help": "start once this many peers are present"}),
    ("--max-message-mb", "max_message_mb", {"type": int}),
    ("--shard", "shard", {"type": int, "help": "data shard in [0, --workers); default: a random order of all data"}),
    ("--checkpoint-dir", "checkpoint_dir", {}),
    ("--checkpoint-every", "checkpoint_every", {"type": int, "metavar": "STEPS", "help": "write a checkpoint every "
                                                "this many steps, atomically (default 0: only when leaving)"}),
    ("--resume", "resume", {"metavar": "PATH|auto", "help": "continue from a checkpoint; auto: the newest of "
                            "this run under --checkpoint-dir (this peer's own with --identity), none: start fresh"}),
    ("--eval-every-seconds", "eval_every_s", {"type": float, "help": "evaluate the global model this often "
                                              "for the summary's loss-against-wall-clock curve (default: start and end)"}),
    ("--metrics-port", "metrics_port", {"type": int, "metavar": "PORT", "help": "serve Prometheus metrics on "
                                        "--host:PORT/metrics (0: any free port; the URL is printed); default: none"}),
    ("--metrics-jsonl", "metrics_jsonl", {"metavar": "FILE", "help": "append the same figures to FILE, one JSON "
                                          "line per --metrics-interval (p2pdiloco plot reads them)"}),
    ("--metrics-interval", "metrics_interval_s", {"type": float, "metavar": "SECONDS",
                                                  "help": "seconds between JSONL lines (default 5)"}),
    ("--json", "summary_json", {"metavar": "FILE", "help": "write the peer's summary here at the end"}),
    ("--adversary", "adversary", {"metavar": "KIND", "help": "bench attack only: lie to the other peers "
                                  "(scaled, weight-lie, extreme-scales, garbage, replay, bad-owner)"}),
]


HARDWARE_OPTIONS: list[tuple[str, str, dict]] = [
    ("--device", "device", {"choices": ["auto", "cpu", "cuda", "mps"], "help": "default auto: cuda, else mps, else cpu"}),
    ("--threads", "threads", {"type": int, "help": "torch CPU threads (0: torch's default)"}),
    ("--micro-batch", "micro_batch", {"type": int, "help": "sequences per forward/backward; a step accumulates "
                                                           "batch-size / micro-batch of them"}),
    ("--slowdown", "slowdown", {"type": float, "help": "emulate slower hardware: each step takes this many times "
                                                       "its compute time (tests and bench wan)"}),
]


def add_peer_parser(sub) -> None:
    peer = sub.add_parser("peer", help="join (or start) a swarm and train")
    config.add_options(peer)
    peer.add_argument("--profile", metavar="NAME|FILE",
                      help=f"hardware profile from peers/ ({', '.join(profile_names())}) or a TOML file; "
                           f"options given here override it")
    for flag, field, kwargs in SWARM_OPTIONS:
        peer.add_argument(flag, dest=f"swarm_{field}", default=None, **kwargs)
    for flag, field, kwargs in HARDWARE_OPTIONS:
        peer.add_argument(flag, dest=f"hw_{field}", default=None, **kwargs)
    peer.set_defaults(threads=0)  # the peer sets its threads from its hardware config
    status = sub.add_parser("status", help="the live peers of a run and their progress, from the DHT")
    status.add_argument("--initial-peers", nargs="+", metavar="MADDR", required=True)
    status.add_argument("--run-id", default="p2pdiloco")
    status.add_argument("--json", action="store_true", help="print the records as JSON")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                        help="a live table, refreshed every SECONDS (default 2) until Ctrl-C")
    status.add_argument("--watch-count", type=int, default=0, metavar="N",
                        help="with --watch: stop after N refreshes (default 0: until Ctrl-C)")
    status.add_argument("--admission", metavar="DIR", help="a closed run: list only admitted peers' records, checked "
                        "with this admission's run CA (any admitted peer's folder)")
    status.set_defaults(threads=0)


def add_local_swarm_parser(sub) -> None:
    local = sub.add_parser("local-swarm", help="run N peer processes on loopback and summarize (the README's main command)",
                           description="Options not listed here (any `peer` option) are passed to every peer.")
    local.add_argument("--peers", type=int, default=4)
    local.add_argument("--workdir", default="runs/local-swarm", help="each peer's log, checkpoint and summary")
    local.add_argument("--timeout", type=float, default=1800, help="seconds before the whole run is stopped")
    local.set_defaults(threads=0)


def run_local_swarm_command(args, peer_args: list[str]) -> int:
    from pathlib import Path

    from .local import print_summary, run_local_swarm
    if args.peers < 1:
        raise ValueError(f"--peers must be at least 1, got {args.peers}")
    # Each peer runs in its own folder under --workdir: the files named here, and the modules of a
    # --model module:function, are found from where this command runs.
    import os
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    result = run_local_swarm(args.peers, absolute_paths(peer_args), Path(args.workdir), args.timeout)
    print_summary(result)
    (Path(args.workdir) / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


PATH_OPTIONS = ("--data", "--tokenizer", "--model", "--config", "--profile", "--identity", "--join-dir",
                "--admission", "--revoked")


def absolute_paths(peer_args: list[str]) -> list[str]:
    """The peer options' values that name existing files or folders, made absolute (a --model or
    --profile that is a name, not a path here, stays as it is)."""
    from pathlib import Path

    from ..models import HF_CONFIGS, MODEL_SIZES
    names = set(MODEL_SIZES) | set(HF_CONFIGS)
    out, flag = [], None
    for arg in peer_args:
        if arg.startswith("-"):
            name, eq, value = arg.partition("=")
            flag = name if name in PATH_OPTIONS else None
            if eq and flag and Path(value).exists() and value not in names:
                arg = f"{name}={Path(value).resolve()}"
                flag = None
        elif flag and Path(arg).exists() and arg not in names:
            arg = str(Path(arg).resolve())
        out.append(arg)
    return out


def peer_configs(args: argparse.Namespace):
    """(SimConfig, SwarmConfig, HardwareConfig): the profile, then the --config file, then options."""
    return peer_setup(args)[:3]


def peer_setup(args: argparse.Namespace):
    """peer_configs() and the training fields given by the profile, --config file or options
    (before defaults): a newcomer adopts the run's config for every shared field not given."""
    mapping = load_profile(args.profile) if args.profile else {}
    if args.config:
        mapping = config.merge(mapping, config.read_file(args.config))
    tables = {}
    for table, options, prefix in (("swarm", SWARM_OPTIONS, "swarm_"), ("hardware", HARDWARE_OPTIONS, "hw_")):
        tables[table] = mapping.pop(table, {})
        if not isinstance(tables[table], dict):
            raise ValueError(f"config: '{table}' must be a table of fields")
        for _, field, _ in options:
            value = getattr(args, f"{prefix}{field}")
            if value is not None:
                tables[table][field] = tuple(value) if isinstance(value, list) else value
    args.config = None
    given = config.merge(mapping, config.options_to_mapping(args))
    sim = config.sim_config(args, defaults=mapping)
    swarm = build(SwarmConfig, tables["swarm"], "swarm.").validate(sim.workers)
    if swarm.admission_dir:  # checked up front: a peer that is not admitted exits 2 saying why
        from dataclasses import replace

        from .admission import load_admission
        admission = load_admission(swarm.admission_dir, swarm.identity_path, swarm.revoked_path)
        swarm = replace(swarm, identity_path=admission.identity_path)
    return sim, swarm, build(HardwareConfig, tables["hardware"], "hardware.").validate(sim.batch_size), given


def run_peer_command(args) -> int:
    from .peer import run_peer
    sim, swarm, hardware, given = peer_setup(args)
    return run_peer(sim, swarm, hardware, given=given)


def run_status_command(args) -> int:
    from .control import ControlConfig, ControlPlane
    SwarmConfig(run_id=args.run_id, initial_peers=tuple(args.initial_peers)).validate(1)
    if args.watch is not None and not args.watch > 0:
        raise ValueError(f"--watch must be a positive number of seconds, got {args.watch}")
    if args.watch_count < 0 or (args.watch_count and args.watch is None):
        raise ValueError("--watch-count must be ≥ 0, and goes with --watch")
    if args.watch is not None and args.json:
        raise ValueError("--watch and --json do not go together: --json prints the records once")
    admission = None
    if args.admission:  # its run CA checks the records; its identity stays unused (the peer may be running)
        from .admission import load_admission
        admission = load_admission(args.admission)
    control = ControlPlane(ControlConfig(args.run_id, tuple(args.initial_peers), admission=admission))
    if args.watch is not None:
        from .status_view import watch
        try:
            return watch(control, args.run_id, args.watch, args.watch_count)
        finally:
            control.shutdown()
    try:
        records = control.peers()
    finally:
        control.shutdown()
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return 0
    print(f"run '{args.run_id}': {len(records)} live peer(s)")
    for r in records:
        rounds = " ".join(f"f{k}:r{v}" for k, v in sorted(r.rounds.items())) or "-"
        print(f"  {r.peer_id}  {r.state:8s} step {r.step:>7,d}  {r.tokens_per_s:>10,.0f} tok/s  "
              f"last rounds {rounds}  at {r.address}")
    return 0

