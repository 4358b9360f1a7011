"""The swarm with real peers: separate processes, real p2pd daemons, real gRPC on loopback.

Every test bounds every wait, and the `swarm` fixture kills every process group it started.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from p2pdiloco import procfs
from peers import TINY

pytestmark = pytest.mark.timeout(300)


def leftovers(peer) -> list[int]:
    """Processes still alive in a peer's session (its DHT process, its p2pd daemon)."""
    out = []
    for pid in procfs.pids():
        try:
            if os.getsid(pid) == peer.proc.pid and pid != peer.proc.pid and not procfs.is_zombie_or_gone(pid):
                out.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return out


def checkpoint_model(peer) -> dict:
    run_dir = peer.cwd / "checkpoints" / "p2pdiloco"
    (path,) = list(run_dir.glob("*.pt"))
    return torch.load(path, weights_only=False)["model"]


def summary(peer) -> dict:
    return json.loads((peer.cwd / "s.json").read_text())


def assert_same_models(a: dict, b: dict, atol: float = 0.0) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def finish_with_same_models(peers) -> None:
    """Every peer exits 0 and holds the same global parameters."""
    for p in peers:
        assert p.wait(180) == 0, p.output()
    models = [checkpoint_model(p) for p in peers]
    for m in models[1:]:
        assert_same_models(models[0], m)


def test_three_peers_train_and_end_with_the_same_global_parameters(swarm, text_file):
    args = [*TINY, "--data", str(text_file), "--steps", "24", "--wait-for-peers", "3", "--json", "s.json"]
    peers = swarm.start_run(3, *args)
    finish_with_same_models(peers)
    for p in peers:
        s = summary(p)
        assert s["completed"] and s["skipped_rounds"] == 0
        assert set(s["group_sizes"]) == {"3"}, s["group_sizes"]  # every average had all three
        assert len(s["matchmaking_s"]) == s["group_sizes"]["3"]  # a wait per average (bench wan reads them)
        assert s["eval_loss"] < s["eval_loss_initial"] - 0.5
        assert 0 < s["bytes_sent"] < s["data_parallel_bytes"] / 5
        assert not leftovers(p), "the peer left processes behind"


def test_networked_run_equals_simulate_with_fp32(swarm, text_file):
    """Lock-step: fp32, fixed shards, every round with all peers: the same numbers as the simulator,
    whether Reduce travels on the bulk port or over gRPC."""
    from p2pdiloco.config import build
    from p2pdiloco.simulate import SimConfig, Simulation

    common = ["--data", str(text_file), "--steps", "14", "--codec", "fp32", "--workers", "3", "--seed", "3"]
    args = [*TINY, *common, "--wait-for-peers", "3", "--json", "s.json"]
    first = swarm.start(*args, "--shard", "0")
    addr = first.join_address()
    # The third peer has no bulk port: the others call Reduce on it over gRPC, it calls theirs on bulk.
    peers = [first, swarm.start(*args, "--shard", "1", "--initial-peers", addr),
             swarm.start(*args, "--shard", "2", "--initial-peers", addr, "--bulk-port", "-1")]
    assert "+" not in peers[2].wait_for(r"serving on (\S+)", 60).group(1)
    for p in peers:
        assert p.wait(180) == 0, p.output()
    cfg = build(SimConfig, {"model": "tiny", "workers": 3, "steps": 14, "batch_size": 4, "seed": 3,
                            "eval_batches": 2,
                            "data": {"paths": (str(text_file),), "seq_len": 32, "seed": 3},
                            "inner": {"lr": 3e-3, "warmup_steps": 2},
                            "streaming": {"H": 6, "fragments": 2, "tau": 1, "codec": "fp32"}})
    sim = Simulation(cfg)
    while sim.step < cfg.steps:
        sim.train_step()
    expected = sim.global_model().state_dict()
    for p in peers:
        assert_same_models(expected, checkpoint_model(p), atol=1e-6)


def test_a_killed_and_a_frozen_peer_do_not_stop_the_others(swarm, text_file):
    args = [*TINY, "--data", str(text_file), "--steps", "60", "--wait-for-peers", "4", "--json", "s.json",
            "--matchmaking-timeout", "3", "--reduce-timeout", "3"]
    peers = swarm.start_run(4, *args)
    for p in peers:
        p.wait_for(r"first average applied", 120)  # mid-run: the swarm has averaged
    os.kill(peers[2].proc.pid, signal.SIGKILL)  # the peer process only, as the OOM killer would
    os.kill(peers[3].proc.pid, signal.SIGSTOP)
    try:
        for p in peers[:2]:
            assert p.wait(150) == 0, p.output()
            s = summary(p)
            assert s["completed"], p.output()
            assert s["eval_loss"] < s["eval_loss_initial"]
    finally:
        os.kill(peers[3].proc.pid, signal.SIGCONT)
    models = [checkpoint_model(p) for p in peers[:2]]
    assert_same_models(models[0], models[1])
    # The killed peer's DHT process and p2pd notice and end (swarm/watchdog.py): long since, as a rule.
    from p2pdiloco.swarm.watchdog import GRACE_S, POLL_S
    deadline = time.monotonic() + POLL_S + GRACE_S + 5
    while leftovers(peers[2]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leftovers(peers[2]), "a killed peer left its DHT process or p2pd running"


def test_a_newcomer_downloads_the_state_and_then_matches_the_others(swarm, text_file):
    args = [*TINY, "--data", str(text_file), "--steps", "500", "--wait-for-peers", "2", "--json", "s.json"]
    first = swarm.start(*args)
    addr = first.join_address()
    second = swarm.start(*args, "--initial-peers", addr)
    second.wait_for(r"training from step 0", 120)
    newcomer = swarm.start(*args, "--initial-peers", second.join_address())
    m = newcomer.wait_for(r"downloaded the run's state \(([\d,]+) bytes, verified: 2 donors agree\).*joining at step (\d+)", 120)
    assert int(m.group(2)) > 0
    for p in (first, second, newcomer):
        assert p.wait(180) == 0, p.output()
    models = [checkpoint_model(p) for p in (first, second, newcomer)]
    assert_same_models(models[0], models[2])
    assert_same_models(models[0], models[1])


def test_status_lists_peers_and_sigterm_leaves_cleanly(swarm, text_file):
    peer = swarm.start(*TINY, "--data", str(text_file), "--steps", "100000", "--json", "s.json")
    addr = peer.join_address()
    peer.wait_for(r"training from step 0", 120)
    out = subprocess.run([sys.executable, "-m", "p2pdiloco.cli", "status", "--initial-peers", addr],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "1 live peer(s)" in out.stdout and "training" in out.stdout
    assert addr.rsplit("/", 1)[1] in out.stdout
    start = time.monotonic()
    peer.signal(signal.SIGTERM)
    assert peer.wait(20) == 0, peer.output()
    assert time.monotonic() - start < 15
    assert "checkpoint:" in peer.output()
    assert not leftovers(peer), "the peer left processes behind"


def test_local_swarm_runs_peers_and_prints_the_summary(tmp_path, text_file):
    """The README's main command, small: 2 peers, a few steps, the summary table at the end."""
    argv = [sys.executable, "-m", "p2pdiloco.cli", "local-swarm", "--peers", "2", "--workdir", str(tmp_path / "run"),
            "--timeout", "200", *TINY, "--data", str(text_file), "--steps", "12"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "eval before" in out.stdout and "data-parallel" in out.stdout and "compute" in out.stdout
    result = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(result["peers"]) == 2
    assert len({round(p["eval_loss"], 6) for p in result["peers"]}) == 1  # one global model


def test_peers_on_the_libp2p_transport_average_with_grpc_peers(swarm, text_file):
    """Two peers reachable over libp2p streams only, one over gRPC: one swarm, one global model."""
    args = [*TINY, "--data", str(text_file), "--steps", "24", "--wait-for-peers", "3", "--json", "s.json"]
    first = swarm.start(*args, "--transport", "libp2p")
    addr = first.join_address()
    assert first.wait_for(r"serving on (\S+)", 30).group(1).startswith("p2p:")
    peers = [first, swarm.start(*args, "--transport", "libp2p", "--initial-peers", addr),
             swarm.start(*args, "--transport", "grpc", "--initial-peers", addr)]
    finish_with_same_models(peers)
    for p in peers:
        s = summary(p)
        assert s["skipped_rounds"] == 0 and s["bytes_sent"] > 0, p.output()


def test_the_libp2p_transport_carries_spans_larger_than_p2pds_message_limit(swarm, text_file):
    """p2pd carries a unary call in at most 4 MiB; Reduce goes over a libp2p stream instead. The mini
    model as one fp32 fragment: a span is 2.4M values, 9.6 MB, each way."""
    args = [*TINY, "--model", "mini", "--fragments", "1", "--codec", "fp32", "--H", "3", "--data", str(text_file),
            "--steps", "6", "--wait-for-peers", "2", "--json", "s.json"]
    first = swarm.start(*args, "--transport", "libp2p")
    peers = [first, swarm.start(*args, "--transport", "grpc", "--initial-peers", first.join_address())]
    finish_with_same_models(peers)
    for p in peers:
        s = summary(p)
        assert s["skipped_rounds"] == 0 and s["peak_sync_bytes"] > 2 * (4 << 20), (s, p.output())


def test_transport_auto_announces_libp2p_when_others_cannot_reach_its_grpc_address(swarm, text_file):
    """--transport auto (the default) asks a live peer to dial the gRPC address it would announce.
    A peer whose announced address does not reach it (here --announce-host 127.0.0.3 while it
    listens on 127.0.0.1 only, as a NATed or misconfigured host) announces libp2p instead; a
    reachable one announces gRPC; all three average together and end with one global model."""
    args = [*TINY, "--data", str(text_file), "--steps", "24", "--wait-for-peers", "3", "--json", "s.json"]
    first = swarm.start(*args)
    addr = first.join_address()
    hidden = swarm.start(*args, "--initial-peers", addr, "--announce-host", "127.0.0.3")
    reachable = swarm.start(*args, "--initial-peers", addr)
    assert hidden.wait_for(r"serving on (\S+)", 60).group(1).startswith("p2p:"), hidden.output()
    hidden.wait_for(r"transport auto: 127\.0\.0\.3:\d+ is NOT reachable .*averaging over libp2p instead", 5)
    assert reachable.wait_for(r"serving on (\S+)", 60).group(1).startswith("127.0.0.1:"), reachable.output()
    reachable.wait_for(r"transport auto: 127\.0\.0\.1:\d+ is reachable \(peer \w+ reached it\)", 5)
    peers = [first, hidden, reachable]
    finish_with_same_models(peers)
    for p in peers:
        s = summary(p)
        assert s["skipped_rounds"] == 0 and s["bytes_sent"] > 0, p.output()


def test_a_swarm_larger_than_a_group_averages_in_random_groups(swarm, text_file):
    """4 peers, groups of 2: every round splits the swarm into two groups, a different split each
    round (matchmaking.partition), and no round is skipped."""
    args = [*TINY, "--data", str(text_file), "--steps", "24", "--wait-for-peers", "4", "--group-size", "2",
            "--json", "s.json"]
    peers = swarm.start_run(4, *args)
    for p in peers:
        assert p.wait(180) == 0, p.output()
    for p in peers:
        s = summary(p)
        assert s["skipped_rounds"] == 0, p.output()
        assert s["eval_loss"] < s["eval_loss_initial"] - 0.5
        assert set(s["group_sizes"]) == {"2"}, s["group_sizes"]  # every average had 2 members


@pytest.mark.timeout(240)
def test_time_budget_rounds_keep_fast_peers_busy_beside_a_slow_one(swarm):
    """Mixed hardware: one peer 3x slower. With time-budget rounds every peer trains until the
    round's clock time, so the fast ones do more steps instead of waiting, all of them average
    in every round (weighted by tokens) and end with one global model."""
    args = [*TINY, "--steps", "60", "--round-seconds", "4", "--duration", "16", "--wait-for-peers", "3",
            "--json", "s.json"]
    first = swarm.start(*args)
    addr = first.join_address()
    fast = swarm.start(*args, "--initial-peers", addr)
    slow = swarm.start(*args, "--initial-peers", addr, "--slowdown", "3")
    peers = [first, fast, slow]
    for p in peers:
        p.wait_for("time-budget rounds: every fragment syncs each 4s", 90)
    finish_with_same_models(peers)
    s = [summary(p) for p in peers]
    assert all(x["completed"] and x["skipped_rounds"] == 0 for x in s), s
    assert s[2]["slowdown"] == 3.0
    assert min(s[0]["steps"], s[1]["steps"]) > 1.5 * s[2]["steps"], [x["steps"] for x in s]
    assert all(x["group_sizes"].get("3", 0) >= 6 for x in s), [x["group_sizes"] for x in s]
