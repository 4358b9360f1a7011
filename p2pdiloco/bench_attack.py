"""`p2pdiloco bench attack`: does one bad peer of four hurt the honest ones?

For each scenario, 4 real peer processes on loopback train the same run (same seeds, each peer its
own data shard); in an attack scenario the last peer to join is an adversary (swarm/adversary.py).
A calm run of the same config is the reference. Reported per scenario: the honest peers' final
eval loss, its ratio to the calm run's (the issue's target: ≤ 1.05, finite), whether the adversary's
parts were in any average an honest peer applied, and the rounds the honest peers skipped.

`stranger` is a closed run (swarm/admission.py) of 4 admitted peers that two strangers try to join:
one with no admission, one admitted by a run CA of its own; reported are their exit codes, their
last lines, and whether either was ever in an honest peer's average.

`--baseline` also runs every attack against peers that take the plain mean with no checks
(`--aggregate mean --mean-check-ratio 0`): what the attack does to an undefended swarm.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from .swarm.adversary import KINDS
from .swarm.local import PeerProcess, finish, start_peers

# The setting: the micro model, 240 steps, H = 20, P = 2 (a calm run of a few minutes here).
TRAINING = ["--model", "micro", "--steps", "240", "--H", "20", "--fragments", "2", "--batch-size", "8",
            "--seq-len", "64", "--eval-batches", "8", "--inner-lr", "6e-3", "--warmup-steps", "20",
            "--outer-momentum", "0.5", "--threads", "1", "--workers", "4"]
UNDEFENDED = ["--aggregate", "mean", "--mean-check-ratio", "0"]
SCENARIOS = ("calm", "calm-mean") + KINDS + ("stranger",)


def run_scenario(name: str, workdir: Path, peer_args: list[str], adversary: str = "", peers: int = 4,
                 timeout_s: float = 900, echo=print, admissions: list[str] | None = None,
                 strangers: list[list[str]] = ()) -> dict:
    """One run of `peers` peer processes; the last is `adversary` if given. With `admissions`, a
    closed run (peer i admitted by admissions[i]); each of `strangers` (its own options) then tries
    to join it once the first peer is up. Returns each peer's summary and the strangers' exit codes."""
    start = time.monotonic()
    quiet = lambda line: None  # noqa: E731 -- peers' logs are in their folders

    def argv(i: int) -> list[str]:
        args = [*peer_args, "--shard", str(i), "--wait-for-peers", str(peers), "--json", "summary.json",
                "--run-id", f"attack-{name}"]
        if adversary and i == peers - 1:
            args += ["--adversary", adversary]
        return args + (["--admission", admissions[i]] if admissions else [])

    def knock(address: str) -> list[PeerProcess]:
        return [PeerProcess(f"stranger{j}", [*peer_args, *extra, "--run-id", f"attack-{name}", "--initial-peers",
                                             address, "--join-timeout", "20"], workdir / name / f"stranger{j}", quiet)
                for j, extra in enumerate(strangers)]

    procs, others = start_peers(peers, argv, lambda i: workdir / name / f"peer{i}", quiet, then=knock)
    summaries = finish(procs, start + timeout_s, also=others)
    echo(f"[bench attack] {name}: eval loss " + " ".join(f"{s['eval_loss']:.4f}" for s in summaries)
         + f" ({time.monotonic() - start:.0f}s)")
    return {"peers": summaries, "wall_s": time.monotonic() - start,
            "strangers": [{"exit_code": p.proc.returncode, "last_line": p.tail(1)} for p in others]}


def closed_run(root: Path, peers: int) -> tuple[list[str], list[list[str]], list[str]]:
    """A closed run's admissions for `peers` peers, and two strangers: one with no admission (its own
    identity), one admitted by a CA of its own. Returns (admission dirs, strangers' options, their peer ids)."""
    from .swarm.admission import admit, make_peer_request, make_run_ca
    make_run_ca(root / "run-ca")
    dirs = []
    for i in range(peers):
        make_peer_request(root / f"admission{i}")
        admit(root / "run-ca", root / f"admission{i}" / "peer.csr", root / f"admission{i}" / "peer.pem", days=1)
        dirs.append(str((root / f"admission{i}").resolve()))
    open_id = make_peer_request(root / "stranger-open")  # its keys, never admitted
    make_run_ca(root / "stranger-ca")
    foreign_id = make_peer_request(root / "stranger-foreign")
    admit(root / "stranger-ca", root / "stranger-foreign" / "peer.csr", root / "stranger-foreign" / "peer.pem", days=1)
    strangers = [["--identity", str((root / "stranger-open" / "identity.key").resolve())],
                 ["--admission", str((root / "stranger-foreign").resolve())]]
    return dirs, strangers, [open_id, foreign_id]


def summarize(run: dict, adversary: bool, calm: float | None, stranger_ids: list[str] = ()) -> dict:
    peers = run["peers"]
    honest = peers[:-1] if adversary else peers
    bad_id = peers[-1]["peer_id"] if adversary else None
    losses = [s["eval_loss"] for s in honest]
    worst = max(losses) if all(math.isfinite(x) for x in losses) else float("nan")
    return {"honest_eval_loss": losses, "worst_honest_eval_loss": worst,
            "ratio_to_calm": worst / calm if calm and math.isfinite(worst) else None,
            "finite": all(math.isfinite(x) for x in losses),
            "adversary_in_honest_averages": bool(bad_id) and any(bad_id in s.get("averaged_with", []) for s in honest),
            "honest_skipped_rounds": [s["skipped_rounds"] for s in honest], "wall_s": round(run["wall_s"], 1),
            **({"strangers": run["strangers"],
                "stranger_in_honest_averages": any(i in s.get("averaged_with", []) for s in honest for i in stranger_ids)}
               if stranger_ids else {})}


def run_attack_bench(json_path: str, workdir: str, scenarios=SCENARIOS, extra_args: tuple = (), baseline: bool = False,
                     echo=print) -> dict:
    root = Path(workdir)
    args = [*TRAINING, *extra_args]
    result: dict = {"training": args, "scenarios": {}, "undefended": {}}
    calm = None
    names = ("calm",) + tuple(s for s in scenarios if s != "calm")
    # A bar over the scenarios on a terminal (disable=None: none in logs); echo lines go above it (cli.py).
    for name in tqdm(names, desc="bench attack", unit="scenario", disable=None, leave=False):
        adversary = name if name in KINDS else ""
        closed, ids = {}, []
        if name == "stranger":  # a closed run, and two strangers knocking
            dirs, strangers, ids = closed_run(root / name / "keys", 4)
            closed = {"admissions": dirs, "strangers": strangers}
        run = run_scenario(name, root, args + (UNDEFENDED if name == "calm-mean" else []), adversary, echo=echo,
                           **closed)
        if name == "calm":
            calm = summarize(run, False, None)["worst_honest_eval_loss"]
            result["calm_eval_loss"] = calm
            result["eval_loss_initial"] = run["peers"][0]["eval_loss_initial"]
        result["scenarios"][name] = summarize(run, bool(adversary), calm, ids)
        if baseline and adversary:
            run = run_scenario(f"{name}-undefended", root, args + UNDEFENDED, adversary, echo=echo)
            result["undefended"][name] = summarize(run, True, calm)
        _write(json_path, result)
    return result


def _write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def print_table(result: dict, out=print) -> None:
    out(f"calm run: eval loss {result['calm_eval_loss']:.4f} (initial {result['eval_loss_initial']:.4f})")
    out(f"{'scenario':16s} {'worst honest':>12s} {'÷ calm':>7s} {'bad peer averaged':>19s} {'undefended ÷ calm':>18s}")
    for name, s in result["scenarios"].items():
        undefended = result["undefended"].get(name)
        u = "-" if undefended is None else (f"{undefended['ratio_to_calm']:.3f}" if undefended["ratio_to_calm"]
                                            else "NaN")
        ratio = f"{s['ratio_to_calm']:.3f}" if s["ratio_to_calm"] else "NaN"
        averaged = s.get("stranger_in_honest_averages", s["adversary_in_honest_averages"])
        out(f"{name:16s} {s['worst_honest_eval_loss']:12.4f} {ratio:>7s} {'yes' if averaged else 'no':>19s} {u:>18s}")
        for i, st in enumerate(s.get("strangers", [])):
            out(f"  stranger {i}: exit {st['exit_code']}: {st['last_line'][:120]}")
