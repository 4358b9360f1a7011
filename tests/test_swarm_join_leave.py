"""Joining with the printed line and leaving on a signal to the process group, with real peers.

The join line alone joins a run started with any options (the run's config travels in the peer
records: runconfig.py); a newcomer that finds nobody of its run says so instead of training alone;
SIGTERM or SIGINT to a peer's whole process group ends it with status 0 and a checkpoint, even when
its DHT process is already dead (control.py, network.py). The `swarm` fixture reaps every group.
"""
from __future__ import annotations

import os
import shlex
import signal
import time

import pytest

from p2pdiloco.swarm.shutdown_check import DHT_DEAD, PEER_ARGS, dht_process, run_checks, session_processes
from test_swarm import assert_same_models, checkpoint_model, summary

pytestmark = pytest.mark.timeout(400)

# Options local to each peer (records.LOCAL_FIELDS, and swarm/hardware options): the only ones a
# test adds to a join line.
LOCAL = ["--batch-size", "4", "--eval-batches", "2", "--tau", "1", "--threads", "1", "--inner-lr", "3e-3",
         "--warmup-steps", "2", "--heartbeat", "0.5", "--record-ttl", "3", "--matchmaking-timeout", "8",
         "--reduce-timeout", "8", "--timeout", "30"]


def join_line(peer) -> list[str]:
    """The words of the peer's printed join line after `p2pdiloco peer`."""
    words = shlex.split(peer.wait_for(r"join with: (.*)$", 120).group(1))
    assert words[:2] == ["p2pdiloco", "peer"], words
    return words[2:]


def test_the_printed_join_line_joins_a_run_started_with_non_default_options(swarm, text_file):
    local = [*LOCAL, "--data", str(text_file), "--json", "s.json"]
    first = swarm.start("--model", "micro", "--H", "20", "--fragments", "2", "--steps", "60", "--seq-len", "32",
                        "--outer-lr", "0.5", "--wait-for-peers", "2", *local)
    line = join_line(first)
    # A newcomer given a conflicting option is refused before it publishes anything, so the first
    # peer, still waiting for a second, neither leaves nor counts it (the user's report: it did).
    other = swarm.start(*line, *local, "--fragments", "1", name="other")
    assert other.wait(120) == 2, other.output()
    assert "trains model=micro" in other.output() and "streaming.fragments: run 2, here 1" in other.output()
    assert first.proc.poll() is None and "trains another config" not in first.output()
    joiner = swarm.start(*line, *local)
    adopted = joiner.wait_for(r"trains (.*) \(1 live peer\(s\)\); adopted its config", 120).group(1)
    for shown in ("model=micro", "H=20", "fragments=2", "steps=60", "seq_len=32", "outer.lr=0.5"):
        assert shown in adopted.split(), adopted
    for p in (first, joiner):
        assert p.wait(240) == 0, p.output()
        s = summary(p)
        assert s["completed"] and s["steps"] == 60, s
        assert s["bytes_sent"] > 0 and s["group_sizes"].get("2", 0) > 0, s  # they averaged together
        assert "first average applied" in p.output()
    assert_same_models(checkpoint_model(first), checkpoint_model(joiner))


def test_a_newcomer_that_finds_nobody_of_its_run_says_so_instead_of_training_alone(swarm, text_file):
    first = swarm.start(*PEER_ARGS, "--data", str(text_file), "--run-id", "alpha")
    words = join_line(first)
    words[words.index("--run-id") + 1] = "beta"  # the DHT answers, but no peer of run beta is there
    args = [*words, *LOCAL, "--data", str(text_file), "--join-timeout", "3"]
    alone = swarm.start(*args, name="alone")
    waiting = swarm.start(*args, "--wait-for-peers", "2", name="waiting")
    assert alone.wait(120) == 2, alone.output()
    assert "no live peer of run 'beta'" in alone.output() and "would train alone" in alone.output()
    assert "--wait-for-peers" in alone.output() and "training from" not in alone.output()
    assert waiting.wait(120) == 2, waiting.output()
    assert "no peer of run 'beta' is listed yet; waiting for --wait-for-peers 2" in waiting.output()
    assert "only 1 of --wait-for-peers 2 peers came" in waiting.output()
    assert first.proc.poll() is None  # the run itself goes on


def wait_until_gone(peer, timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s  # a p2pd signalled with its group may take a moment
    while session_processes(peer.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return session_processes(peer.proc.pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_group_leaves_cleanly_even_with_the_dht_process_dead(swarm, text_file, sig):
    peer = swarm.start(*PEER_ARGS, "--data", str(text_file))
    peer.wait_for(r"first average applied", 120)
    dht = dht_process(peer.proc.pid)
    assert dht is not None, "the peer's DHT process (the child that runs p2pd) was not found"
    os.kill(dht, signal.SIGKILL)
    peer.wait_for(DHT_DEAD, 60)  # noticed and said (the heartbeat, or the next DHT call)
    peer.signal_group(sig)
    assert peer.wait(20) == 0, peer.output()
    assert list((peer.cwd / "checkpoints" / "p2pdiloco").glob("*.pt")), peer.output()
    assert "checkpoint:" in peer.output()
    assert not wait_until_gone(peer), "the peer left processes behind"


def test_sigterm_to_the_process_group_of_a_training_peer_is_a_clean_exit_every_time(tmp_path, text_file):
    """A few runs of the 20-run check (`python -m p2pdiloco.swarm.shutdown_check --runs 20`):
    exit 0 within 20 s, a checkpoint, nothing of the group left. Each run reaps its group."""
    result = run_checks(3, tmp_path, [*PEER_ARGS, "--data", str(text_file)])
    bad = [r for r in result["results"] if not r["clean"]]
    assert not bad, bad
