"""`p2pdiloco plot RUNDIR`: the figures of a run from its peers' metrics files (JSONL, written by
`p2pdiloco peer --metrics-jsonl`; `local-swarm` writes one per peer, swarm/metrics.py).

One PNG of four panels, one line per peer: training loss (and the global model's eval loss, as
dots) against tokens and against wall clock, bytes sent on the data plane (every plane, state
downloads included) and the fraction of wall time spent computing. Wall clock is shared: each
peer's line starts at the moment it started training, counted from the first peer's start.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

PLANES = ("grpc", "bulk", "libp2p", "state")


def read_runs(rundir: Path) -> tuple[dict[str, list[dict]], list[Path]]:
    """{peer id: its lines in time order} from every *.jsonl under `rundir`, and the files read.
    Lines that are not JSON objects with a peer id (a file cut mid-line by a kill) are skipped."""
    files = sorted(p for p in rundir.rglob("*.jsonl") if p.is_file())
    peers: dict[str, list[dict]] = {}
    for path in files:
        for raw in path.read_text().splitlines():
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(line, dict) and line.get("peer_id") and "time" in line and "tokens" in line:
                peers.setdefault(line["peer_id"], []).append(line)
    for lines in peers.values():
        lines.sort(key=lambda x: x["time"])
    return peers, files


def series(lines: list[dict], t0: float) -> dict[str, list[float]]:
    """A peer's columns: wall clock (from the run's first start), tokens, losses, MB sent, compute."""
    def num(x):
        return math.nan if x is None else float(x)

    return {"wall_s": [x["time"] - t0 for x in lines],
            "tokens": [x["tokens"] for x in lines],
            "loss": [num(x.get("loss")) for x in lines],
            "eval_loss": _new_values([num(x.get("eval_loss")) for x in lines]),
            "mb_sent": [sum(x.get("bytes", {}).get(p, {}).get("sent", 0) for p in PLANES) / 1e6 for x in lines],
            "compute": [num(x.get("compute_fraction")) for x in lines]}


def _new_values(values: list[float]) -> list[float]:
    """Each line holds the last evaluation's loss: keep it only where a new one appears (NaN elsewhere),
    so an evaluation is one dot, at the first line written after it."""
    out, last = [], math.nan
    for v in values:
        out.append(v if v != last and not math.isnan(v) else math.nan)
        last = v if not math.isnan(v) else last
    return out


def plot_run(rundir: str | Path, out: str | Path | None = None) -> tuple[Path, int, int]:
    """Write the PNG (default RUNDIR/metrics.png); returns (its path, peers, files read)."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed: files only
    import matplotlib.pyplot as plt

    rundir = Path(rundir)
    if not rundir.is_dir():
        raise ValueError(f"plot: {rundir} is not a folder")
    peers, files = read_runs(rundir)
    if not peers:
        raise ValueError(f"plot: no metrics lines in any *.jsonl under {rundir}; run the peers with "
                         f"--metrics-jsonl FILE (local-swarm writes peerN/metrics.jsonl by default)")
    # The run's clock starts when its first peer started training (each line's time less its wall_s).
    t0 = min(lines[0]["time"] - lines[0].get("wall_s", 0.0) for lines in peers.values())
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (by_tokens, by_wall), (sent, compute) = axes
    for i, (peer, lines) in enumerate(sorted(peers.items())):
        s, color, name = series(lines, t0), f"C{i % 10}", f"…{peer[-8:]}"
        by_tokens.plot(s["tokens"], s["loss"], color=color, lw=1, label=name)
        by_tokens.plot(s["tokens"], s["eval_loss"], "o", color=color, ms=3)
        by_wall.plot(s["wall_s"], s["loss"], color=color, lw=1, label=name)
        by_wall.plot(s["wall_s"], s["eval_loss"], "o", color=color, ms=3)
        sent.plot(s["wall_s"], s["mb_sent"], color=color, label=name)
        compute.plot(s["wall_s"], s["compute"], color=color, label=name)
    for ax, xlabel, ylabel in ((by_tokens, "tokens (this peer's)", "loss (line: training; dots: eval, global model)"),
                               (by_wall, "wall clock (s)", "loss (line: training; dots: eval, global model)"),
                               (sent, "wall clock (s)", "MB sent, every plane"),
                               (compute, "wall clock (s)", "compute fraction of wall time")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    compute.set_ylim(0, 1.05)
    by_tokens.legend(fontsize="small", title="peer")
    fig.suptitle(f"{rundir}: {len(peers)} peer(s)")
    fig.tight_layout()
    path = Path(out) if out else rundir / "metrics.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, len(peers), len(files)


def add_parser(sub) -> None:
    plot = sub.add_parser("plot", help="draw a run's loss, bytes and compute from its peers' metrics JSONL files")
    plot.add_argument("rundir", metavar="RUNDIR", help="a folder searched for *.jsonl (e.g. local-swarm's --workdir)")
    plot.add_argument("--out", metavar="FILE", help="the PNG to write (default: RUNDIR/metrics.png)")
    plot.set_defaults(threads=0)


def cli(args) -> int:
    path, peers, files = plot_run(args.rundir, args.out)
    print(f"plot of {peers} peer(s) from {files} metrics file(s): {path}")
    return 0
