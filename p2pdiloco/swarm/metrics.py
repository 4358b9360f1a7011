"""A peer's metrics: a Prometheus endpoint (`--metrics-port`) and a JSONL file (`--metrics-jsonl`)
with the same figures, for `p2pdiloco plot` (plot.py) and anything else that reads lines of JSON.

Who feeds what:
- the training loop, after every step: `observe_step` (step, tokens, loss, tokens/s, compute
  fraction, rounds applied and skipped, read from the engine's Worker); after an evaluation of the
  global model, `observe_eval`;
- the network thread, after every average: `round_done` (latency, matchmaking wait, group size) or
  `round_refused` (a span's mean failed this member's check);
- the data plane counts bytes per plane in `traffic` (traffic.py), read when scraped or written.

Each peer has its own CollectorRegistry, not prometheus_client's global one, so that several peers
in one process (tests, benchmarks) do not clash. Every figure is read at scrape time from the last
step's snapshot: a scrape never waits for the training thread, and the training thread never waits
for a scrape (the snapshot is one dict, replaced whole).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .traffic import Traffic

log = logging.getLogger("p2pdiloco.metrics")

# Latency of one average, matchmaking included: from under a second on loopback to the bound that
# SwarmAverager puts on it (matchmaking + reduce timeout + 10 s, 30 s by default).
ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60)
MATCHMAKING_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)


class Metrics:
    def __init__(self, run_id: str, traffic: Traffic | None = None):
        self.run_id, self.peer_id, self.address = run_id, "", ""
        self.traffic = traffic if traffic is not None else Traffic()
        self.registry = CollectorRegistry(auto_describe=True)
        self.round_s = Histogram("p2pdiloco_round_seconds", "Seconds one completed average took, matchmaking "
                                 "included", buckets=ROUND_BUCKETS, registry=self.registry)
        self.matchmaking_s = Histogram("p2pdiloco_matchmaking_seconds", "Seconds a completed average waited "
                                       "for its group", buckets=MATCHMAKING_BUCKETS, registry=self.registry)
        self.refused = 0  # rounds whose mean failed this member's check (also counted as skipped)
        self.group_peers = 0  # peers in the last group this peer averaged in, itself included
        self.eval_loss = math.nan
        self.snapshot: dict = {"step": 0, "tokens": 0, "tokens_per_s": 0.0, "loss": math.nan,
                               "compute_fraction": math.nan, "applied": 0, "skipped": 0, "wall_s": 0.0}
        self.registry.register(self)
        self.url = ""
        self._http = None
        self._jsonl = None
        self._interval_s, self._next_line = 0.0, 0.0

    # ---- start and stop
    def start(self, peer_id: str, address: str, host: str, port: int, jsonl: str, interval_s: float) -> None:
        """Serve on host:port (0: any free port; -1: no endpoint) and append to `jsonl` ("": no file)."""
        self.peer_id, self.address, self._interval_s = peer_id, address, interval_s
        if port >= 0:
            from .control import SwarmStartError
            try:
                self._http, _ = start_http_server(port, addr=host, registry=self.registry)
            except OSError as exc:
                raise SwarmStartError(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); choose "
                                      f"another --metrics-port, or 0 for any free port") from None
            shown = f"[{host}]" if ":" in host else host
            self.url = f"http://{shown}:{self._http.server_port}/metrics"
        if jsonl:
            path = Path(jsonl)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = path.open("a", buffering=1)  # line-buffered: a reader sees whole lines

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None

    # ---- fed by the training loop
    def observe_step(self, worker, loss: float, tokens_per_s: float, wall_s: float, compute_fraction: float,
                     final: bool = False) -> None:
        """After a step: the figures of `worker` (streaming.Worker). Writes a JSONL line every
        `--metrics-interval` seconds of wall clock, and at the end (`final`)."""
        self.snapshot = {"step": worker.step, "tokens": worker.tokens, "tokens_per_s": tokens_per_s, "loss": loss,
                         "compute_fraction": compute_fraction, "applied": worker.rounds_applied,
                         "skipped": worker.skipped_rounds, "wall_s": wall_s}
        if self._jsonl is not None and (final or wall_s >= self._next_line):
            self._next_line = wall_s + self._interval_s
            self._jsonl.write(json.dumps(self.line()) + "\n")

    def observe_eval(self, loss: float) -> None:
        self.eval_loss = loss

    # ---- fed by the network thread
    def round_done(self, latency_s: float, matchmaking_s: float, group_size: int) -> None:
        self.round_s.observe(latency_s)
        self.matchmaking_s.observe(matchmaking_s)
        self.group_peers = group_size

    def round_refused(self) -> None:
        self.refused += 1

    # ---- read by the JSONL writer and by Prometheus
    def line(self) -> dict:
        """One JSONL record: the figures now (NaN written as null, which JSON has)."""
        s = self.snapshot

        def num(x: float):
            return None if isinstance(x, float) and not math.isfinite(x) else x

        return {"time": round(time.time(), 3), "wall_s": round(s["wall_s"], 3), "peer_id": self.peer_id,
                "run_id": self.run_id, "step": s["step"], "tokens": s["tokens"],
                "tokens_per_s": round(s["tokens_per_s"], 1), "loss": num(s["loss"]), "eval_loss": num(self.eval_loss),
                "compute_fraction": num(s["compute_fraction"]), "bytes": self.traffic.snapshot(),
                "rounds": {"applied": s["applied"], "skipped": s["skipped"], "refused": self.refused},
                "round_s": _sum_count(self.round_s), "matchmaking_s": _sum_count(self.matchmaking_s),
                "group_peers": self.group_peers}

    def collect(self):
        """prometheus_client's custom-collector hook: every figure but the two histograms."""
        s = self.snapshot
        info = GaugeMetricFamily("p2pdiloco_peer_info", "This peer: its id, run and data-plane address (value 1)",
                                 labels=["peer_id", "run_id", "address"])
        info.add_metric([self.peer_id, self.run_id, self.address], 1)
        yield info
        for name, doc, value in (
                ("p2pdiloco_step", "Inner steps taken", s["step"]),
                ("p2pdiloco_tokens_per_second", "Training tokens per second since this peer started training",
                 s["tokens_per_s"]),
                ("p2pdiloco_loss", "Training loss of the last step", s["loss"]),
                ("p2pdiloco_eval_loss", "Eval loss of the global model at its last evaluation (NaN before the first)",
                 self.eval_loss),
                ("p2pdiloco_compute_fraction", "Fraction of wall time spent computing, evaluations left out",
                 s["compute_fraction"]),
                ("p2pdiloco_group_peers", "Peers in the last group this peer averaged in, itself included",
                 self.group_peers)):
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("p2pdiloco_tokens", "Training tokens processed", value=s["tokens"])
        traffic = CounterMetricFamily("p2pdiloco_bytes", "Bytes on the data plane, by plane (grpc, bulk, libp2p, "
                                      "state) and direction (sent, received)", labels=["plane", "direction"])
        for plane, both in self.traffic.snapshot().items():
            for direction, n in both.items():
                traffic.add_metric([plane, direction], n)
        yield traffic
        rounds = CounterMetricFamily("p2pdiloco_rounds", "Fragment rounds by outcome: applied, skipped (not "
                                     "averaged in time), refused (its mean failed this peer's check; also skipped)",
                                     labels=["outcome"])
        for outcome, n in (("applied", s["applied"]), ("skipped", s["skipped"]), ("refused", self.refused)):
            rounds.add_metric([outcome], n)
        yield rounds


def _sum_count(histogram: Histogram) -> dict:
    """A histogram's count and sum (what a JSONL line keeps of it), from its own samples."""
    out = {"count": 0, "sum": 0.0}
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                out["count"] = int(sample.value)
            elif sample.name.endswith("_sum"):
                out["sum"] = round(sample.value, 4)
    return out
