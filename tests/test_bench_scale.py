"""`bench swarm` and `bench soak` (p2pdiloco/bench_swarm.py, bench_soak.py): short real runs.

Every peer process the benches start is stopped by them (their process groups killed) whatever
happens; these tests check the JSON they write and what it says about the swarm.
"""
import json

import pytest

from p2pdiloco.bench_soak import SoakConfig, run_soak_bench
from p2pdiloco.bench_swarm import SwarmBenchConfig, check_groups, run_swarm_bench
from p2pdiloco.proc_sampler import Sample, growth


def _summary(applied, fingerprint="g"):
    return {"applied": applied, "global_fingerprint": fingerprint}


def test_check_groups_finds_a_member_that_applied_another_mean_or_none():
    a = _summary([[0, 1, "gA", 2, "m1"], [1, 1, "gB", 2, "m2"]])
    b = _summary([[0, 1, "gA", 2, "m1"], [1, 1, "gB", 2, "m2"]])
    assert check_groups([a, b])["consistent"] and check_groups([a, b])["checked"] == 2
    liar = _summary([[0, 1, "gA", 2, "mX"], [1, 1, "gB", 2, "m2"]], "h")
    got = check_groups([a, liar])
    assert (got["mismatched"], got["incomplete"], got["consistent"], got["global_models"]) == (1, 0, False, 2)
    skipper = _summary([[0, 1, "gA", 2, "m1"]])  # it skipped fragment 1's round that its group applied
    got = check_groups([a, skipper])
    assert (got["mismatched"], got["incomplete"], got["consistent"]) == (0, 1, False)


def test_growth_is_from_the_first_sample_to_the_last():
    samples = [Sample(t, rss, rss, 10, 10, 0) for t, rss in ((0, 100), (1, 130), (2, 104))]
    assert growth(samples) == {"start": 100, "end": 104, "max": 130, "growth_pct": 4.0, "samples": 3}
    assert growth([])["growth_pct"] is None


def test_configs_are_checked_up_front():
    with pytest.raises(ValueError, match="--peers"):
        SwarmBenchConfig(peers=(1,)).validate()
    with pytest.raises(ValueError, match="--group-size"):
        SwarmBenchConfig(group_sizes=(1,)).validate()
    with pytest.raises(ValueError, match="--freeze-seconds"):
        SoakConfig(freeze_s=60, every_s=60).validate()


def test_bench_swarm_of_8_peers_in_groups_of_4(tmp_path, text_file):
    """8 real peers in groups of 4 (two groups per round, regrouped every round): rounds are
    applied, every group's members applied the same mean, the figures are all there."""
    out = tmp_path / "swarm.json"
    cfg = SwarmBenchConfig(peers=(8,), group_sizes=(4,), steps=30, sample_s=1.0, timeout_s=300,
                           join_timeout_s=180, workdir=str(tmp_path / "runs"))
    run_swarm_bench(cfg, ["--data", str(text_file)], str(out), echo=print)
    run = json.loads(out.read_text())["runs"][0]
    assert (run["peers"], run["group_size"], run["hung"], run["failed"], run["completed"]) == (8, 4, [], [], True)
    rounds = run["rounds"]
    assert rounds["applied"] > 0 and rounds["applied_fraction"] >= 0.5, rounds
    groups = run["groups"]
    assert groups["consistent"] and groups["checked"] > 0, groups
    assert 2 <= groups["mean_group_size"] <= 4  # groups of at most 4, not one group of 8
    assert run["matchmaking_s"]["averages"] == rounds["applied"]
    assert run["dht"]["calls_per_peer_per_s"] > 0 and {"publish", "peers", "declare"} <= set(run["dht"]["calls_by_kind"])
    assert run["dht"]["p2pd_io_bytes_per_peer_per_s"] > 0
    for name, peer in run["per_peer"].items():
        assert peer["exit_code"] == 0, name
        assert peer["rss"]["samples"] >= 2 and peer["rss"]["start"] > 10 << 20, (name, peer["rss"])
        assert peer["fds"]["start"] > 0


def test_bench_soak_survives_a_kill_and_a_freeze(tmp_path, text_file):
    """4 peers, one killed and restarted with --resume auto, one frozen and thawed: every peer
    finishes its steps, nobody stalls, and the survivors' memory and descriptors are reported."""
    out = tmp_path / "soak.json"
    # Two faults, 12 s apart, once all four train; 900 steps outlast them on a quiet machine too
    # (~11 steps/s there: 400 steps ended before a fault planned at 50 s).
    cfg = SoakConfig(minutes=0.4, every_s=12.0, freeze_s=5.0, steps=900, checkpoint_every=20, sample_s=1.0,
                     stall_s=90.0, workdir=str(tmp_path / "runs"))
    run_soak_bench(cfg, ["--data", str(text_file), "--eval-batches", "2"], str(out), echo=print)
    result = json.loads(out.read_text())
    soak = result["soak"]
    assert [e["kind"] for e in soak["events"]] == ["kill", "freeze"], soak["events"]
    assert soak["completed"] and soak["exit_codes"] == [0, 0, 0, 0], soak
    assert soak["stalls"] == [] and soak["hung"] == []
    assert soak["steps"] == [900] * 4
    # Freezes hit the first half, kills the second: peer2 was killed, the others lived through the run.
    assert set(soak["survivors"]) == {"peer0", "peer1", "peer3"}
    for s in soak["survivors"].values():
        assert s["rss"]["samples"] >= 5 and s["fds"]["start"] > 0
    assert result["verdict"]["no_hang"] is True and result["verdict"]["loss_within_2_percent"] is None
