"""Metrics: the Prometheus endpoint and JSONL file of real peers, `status --watch`, `plot`.

The swarm test starts real peer processes (the `swarm` fixture kills every process group it made);
every wait is bounded. The rest are the pure parts: byte counters, config checks, the JSONL format
as `plot` reads it, the watch table.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from rich.console import Console

from p2pdiloco.plot import plot_run, read_runs
from p2pdiloco.swarm.config import SwarmConfig
from p2pdiloco.swarm.metrics import Metrics
from p2pdiloco.swarm.records import PROTOCOL_VERSION, PeerRecord
from p2pdiloco.swarm.status_view import table
from p2pdiloco.swarm.traffic import PLANES, Traffic, nbytes
from peers import TINY

FAMILIES = ("p2pdiloco_peer_info", "p2pdiloco_step", "p2pdiloco_tokens_total", "p2pdiloco_tokens_per_second",
            "p2pdiloco_loss", "p2pdiloco_eval_loss", "p2pdiloco_compute_fraction", "p2pdiloco_group_peers",
            "p2pdiloco_bytes_total", "p2pdiloco_rounds_total", "p2pdiloco_round_seconds_bucket",
            "p2pdiloco_matchmaking_seconds_count")


def scrape(url: str) -> dict[str, float]:
    """{sample name with labels: value} of a Prometheus text page."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def family(sample: str) -> str:
    return sample.split("{", 1)[0]


# ---- pure parts
def test_traffic_counts_per_plane_and_direction():
    t = Traffic()
    t.add("bulk", sent=10, received=3)
    t.add("bulk", sent=5)
    t.add("state", received=nbytes([b"abc", memoryview(bytearray(7))]))
    snap = t.snapshot()
    assert set(snap) == set(PLANES)
    assert snap["bulk"] == {"sent": 15, "received": 3} and snap["state"] == {"sent": 0, "received": 10}
    assert snap["grpc"] == {"sent": 0, "received": 0}


def test_metrics_options_are_checked_naming_the_field():
    with pytest.raises(ValueError, match="swarm.metrics_port"):
        SwarmConfig(metrics_port=70000).validate(1)
    with pytest.raises(ValueError, match="swarm.metrics_interval_s"):
        SwarmConfig(metrics_interval_s=0).validate(1)
    SwarmConfig(metrics_port=0, metrics_jsonl="m.jsonl").validate(1)


def test_two_peers_metrics_in_one_process_do_not_clash():
    """Each Metrics has its own registry: two endpoints in one process, each with its own figures."""
    a, b = Metrics("run"), Metrics("run")
    try:
        a.start("peerA", "127.0.0.1:1", "127.0.0.1", 0, "", 1.0)
        b.start("peerB", "127.0.0.1:2", "127.0.0.1", 0, "", 1.0)
        a.round_done(0.3, 0.1, 3)
        b.round_refused()
        pa, pb = scrape(a.url), scrape(b.url)
        assert pa["p2pdiloco_group_peers"] == 3 and pb["p2pdiloco_group_peers"] == 0
        assert pa["p2pdiloco_round_seconds_count"] == 1 and pb["p2pdiloco_round_seconds_count"] == 0
        assert pb['p2pdiloco_rounds_total{outcome="refused"}'] == 1
        assert any('peer_id="peerA"' in k for k in pa) and not any('peer_id="peerA"' in k for k in pb)
        assert math.isnan(pa["p2pdiloco_eval_loss"])  # nothing evaluated yet: NaN, not a made-up 0
    finally:
        a.close()
        b.close()


def test_a_taken_metrics_port_is_an_error_naming_the_option():
    from p2pdiloco.swarm.control import SwarmStartError
    a, b = Metrics("run"), Metrics("run")
    try:
        a.start("p", "x", "127.0.0.1", 0, "", 1.0)
        port = int(a.url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(SwarmStartError, match="--metrics-port"):
            b.start("p", "x", "127.0.0.1", port, "", 1.0)
    finally:
        a.close()
        b.close()


def _line(peer: str, t: float, wall: float, tokens: int, loss: float, eval_loss, sent: int) -> dict:
    m = Metrics("run")
    m.peer_id = peer
    line = m.line()
    line.update(time=t, wall_s=wall, tokens=tokens, loss=loss, eval_loss=eval_loss, compute_fraction=0.9)
    line["bytes"]["bulk"]["sent"] = sent
    return line


def test_plot_reads_every_jsonl_under_the_run_and_writes_a_png(tmp_path):
    for i, peer in enumerate(("peerAAAAAAAA", "peerBBBBBBBB")):
        folder = tmp_path / f"peer{i}"
        folder.mkdir()
        lines = [_line(peer, 1000 + i + s, s, 100 * s, 5 - 0.1 * s, 5.0 if s < 5 else 4.0, 1000 * s) for s in range(10)]
        text = "".join(json.dumps(x) + "\n" for x in lines)
        (folder / "metrics.jsonl").write_text(text + '{"cut mid-li')  # a killed writer's last line: skipped
    peers, files = read_runs(tmp_path)
    assert len(files) == 2 and sorted(peers) == ["peerAAAAAAAA", "peerBBBBBBBB"]
    assert all(len(v) == 10 for v in peers.values())
    path, n, _ = plot_run(tmp_path)
    assert n == 2 and path == tmp_path / "metrics.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--metrics-jsonl"):
        plot_run(tmp_path / "empty")


def test_watch_table_shows_each_peer_and_its_progress_since_the_last_refresh():
    rec = PeerRecord("12D3KooWpeeraaaaaaaaaaaa", "127.0.0.1:5000+5001", [], PROTOCOL_VERSION, "h", "cfg", "training",
                     step=120, tokens=15360, tokens_per_s=900.0, rounds={"0": 3, "1": 4})
    console = Console(record=True, width=160)
    console.print(table("run", [rec], {rec.peer_id: 100}))
    text = console.export_text()
    assert "1 live peer(s)" in text and "…aaaaaaaaaaaa" in text
    assert "+20" in text and "15,360" in text and "f0:r3 f1:r4" in text and "127.0.0.1:5000+5001" in text


# ---- real peers
@pytest.mark.timeout(420)
def test_peers_serve_metrics_write_jsonl_and_status_watch_shows_them(swarm, text_file, tmp_path):
    args = [*TINY, "--data", str(text_file), "--steps", "100000", "--metrics-port", "0",
            "--metrics-jsonl", "metrics.jsonl", "--metrics-interval", "0.5"]
    first, second = swarm.start_run(2, *args)
    url = first.wait_for(r"\[peer\] metrics: (http://\S+)", 120).group(1)
    second.wait_for(r"\[peer\] metrics: http://", 120)
    second.wait_for(r"training from step", 180)
    # Every family is there, and the step advances between two scrapes.
    deadline = time.monotonic() + 120
    while True:
        before = scrape(url)
        bulk = before['p2pdiloco_bytes_total{direction="sent",plane="bulk"}']
        if (bulk > 0 and before['p2pdiloco_rounds_total{outcome="applied"}'] > 0) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert {family(k) for k in before} >= set(FAMILIES), sorted({family(k) for k in before})
    assert bulk > 0, "no bytes counted on the bulk port after the second peer joined"
    assert before['p2pdiloco_bytes_total{direction="received",plane="bulk"}'] > 0
    time.sleep(2)
    after = scrape(url)
    assert after["p2pdiloco_step"] > before["p2pdiloco_step"] > 0
    assert after["p2pdiloco_tokens_total"] > before["p2pdiloco_tokens_total"]
    assert not math.isnan(after["p2pdiloco_eval_loss"])

    address = first.join_address()
    cmd = [sys.executable, "-m", "p2pdiloco.cli", "status", "--initial-peers", address]
    env = dict(os.environ, COLUMNS="160")
    # A bounded watch: two refreshes, each printed after the other (the output is a pipe).
    out = subprocess.run([*cmd, "--watch", "0.5", "--watch-count", "2"], check=False, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("2 live peer(s)") == 2, out.stdout
    ids = [re.search(r"(12D3KooW\S+)", p.output()).group(1) for p in (first, second)]
    assert all(f"…{i[-12:]}" in out.stdout for i in ids), out.stdout
    # Ctrl-C (SIGINT to the command's whole process group, as a terminal sends it) ends it with 0.
    watch = subprocess.Popen([*cmd, "--watch", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while "live peer(s)" not in "".join(lines) and time.monotonic() < deadline:
            lines.append(watch.stdout.readline())
        assert "live peer(s)" in "".join(lines), "".join(lines)
        os.killpg(watch.pid, signal.SIGINT)
        assert watch.wait(30) == 0, "".join(lines) + watch.stdout.read()
    finally:
        try:
            os.killpg(watch.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        watch.wait(10)

    for p in (first, second):
        p.signal(signal.SIGTERM)
    for p in (first, second):
        assert p.wait(60) == 0, p.output()[-3000:]
    # The JSONL files: whole lines of JSON, the last one written when the peer left.
    for p in (first, second):
        lines = [json.loads(x) for x in (p.cwd / "metrics.jsonl").read_text().splitlines()]
        assert len(lines) >= 3
        assert lines[-1]["step"] >= lines[0]["step"] and lines[-1]["step"] > 0
        assert lines[-1]["bytes"]["bulk"]["sent"] > 0 and lines[-1]["rounds"]["applied"] > 0
        assert [x["time"] for x in lines] == sorted(x["time"] for x in lines)
    plot = subprocess.run([sys.executable, "-m", "p2pdiloco.cli", "plot", str(tmp_path), "--out", str(tmp_path / "m.png")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr
    assert "plot of 2 peer(s)" in plot.stdout and (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
