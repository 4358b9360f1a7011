"""The WAN test bed (p2pdiloco/wan/): real peers in Linux network namespaces behind shaped links.

Where namespaces cannot be made (not root, no iproute2, no permission) the bed tests skip with the
harness's own reason; in CI (CI=true) as root they must run, so there a missing bed fails.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys

import pytest
import torch

from p2pdiloco import procfs
from p2pdiloco.wan import host
from p2pdiloco.wan.bench_wan import round_timings
from p2pdiloco.wan.links import BedConfig, LinkSpec, parse_delay_ms
from p2pdiloco.wan.netns import NetnsBed
from p2pdiloco.wan.peers import link_check, start_peers, wait_peers
from peers import TINY

pytestmark = pytest.mark.timeout(150)


def require_bed() -> None:
    reason = host.unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true" and os.geteuid() == 0:
        pytest.fail(f"CI runs as root, so the WAN test bed must work: {reason}")
    pytest.skip(reason)


def gone(bed: NetnsBed, pids: list[int]) -> list[str]:
    """Everything the bed made that still exists, checked from the system rather than the bed."""
    ours = set(bed.host_ifs + bed.ns_ifs + [bed.bridge])
    left = [f"namespace {ns}" for ns in host.namespaces() if ns in bed.namespaces]
    left += [f"link {name}" for name in host.links() if name in ours]
    left += [f"process {pid}" for pid in pids if not procfs.is_zombie_or_gone(pid)]
    return left + [f"process {pid} (group member)" for pid in host.live_members(set(pids))]


def test_three_peers_in_namespaces_train_over_a_shaped_link_and_end_with_one_global_model(tmp_path, text_file):
    require_bed()
    args = [*TINY, "--data", str(text_file), "--steps", "24", "--workers", "3", "--wait-for-peers", "3",
            "--json", "summary.json", "--join-timeout", "60"]
    with NetnsBed(BedConfig(3, LinkSpec("50mbit", 10))) as bed:
        check = link_check(bed, 0, 2, nbytes=1_000_000, timeout_s=30)
        assert 18 <= check["rtt_ms"] < 80, check  # one way 10 ms each way
        assert check["goodput_mbit_s"] < 50 * 1.05, check  # the rate holds
        peers = start_peers(bed, lambda i: [*args, "--host", bed.addresses[i], "--shard", str(i)], tmp_path,
                            echo=lambda line: None, join_timeout_s=60)
        assert wait_peers(peers, timeout_s=90) == [], "\n\n".join(p.tail() for p in peers)
        pids = [p.proc.pid for p in peers] + ([bed.wire.pid] if bed.wire else [])
        summaries = [p.summary() for p in peers]
        assert all(summaries), "\n\n".join(p.tail() for p in peers)
    for s in summaries:
        assert s["completed"] and s["skipped_rounds"] == 0, s
        assert set(s["group_sizes"]) == {"3"}, s["group_sizes"]  # every average had all three, over the links
        assert s["eval_loss"] < s["eval_loss_initial"] - 0.5
        assert 0 < s["bytes_sent"] < s["data_parallel_bytes"] / 5
    assert len({s["eval_loss"] for s in summaries}) == 1, [s["eval_loss"] for s in summaries]  # one global model
    # bench wan's per-round timing columns, from these summaries: every round measured, over a real link.
    rounds = round_timings(summaries)["per_round"]
    assert rounds["rounds"] == sum(len([r for r in s["round_log"] if not r["final"]]) for s in summaries) > 0
    assert rounds["failed"] == 0
    for name in ("matchmaking_s", "matchmaking_left_s", "transfer_s", "latency_s", "wait_s", "step_s"):
        assert rounds[name] is not None and rounds[name] >= 0, (name, rounds)
    assert rounds["transfer_s"] > 0.02 and rounds["latency_s"] > 0.02  # two 10 ms one-way trips at least
    assert rounds["prepared"] > 0, rounds  # later rounds' groups were formed before they came due
    models = [torch.load(next((p.workdir / "checkpoints").rglob("*.pt")), weights_only=False)["model"] for p in peers]
    for m in models[1:]:
        for name in m:
            assert torch.equal(models[0][name], m[name]), name
    assert gone(bed, pids) == [] and bed.leftovers() == []


def test_the_bed_is_torn_down_on_an_error_with_processes_still_running():
    """Even a process that left its process group (its own session) is found in its namespace."""
    require_bed()
    with pytest.raises(RuntimeError, match="boom"):
        with NetnsBed(BedConfig(2, LinkSpec("10mbit", 5, 1.0)), grace_s=1) as bed:
            sleeper = bed.spawn(0, ["sleep", "300"])
            escaped = bed.spawn(1, ["sh", "-c", "setsid sleep 300 > /dev/null & echo $!"], stdout=subprocess.PIPE,
                                text=True)
            assert select.select([escaped.stdout], [], [], 30)[0], "the escaped sleep's pid never came"
            runaway = int(escaped.stdout.readline())
            assert os.path.exists(f"/proc/{runaway}")
            raise RuntimeError("boom")
    assert gone(bed, [sleeper.pid, escaped.pid, runaway]) == []
    assert bed.leftovers() == []


def test_unavailable_reason_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    host._probe.cache_clear()
    try:
        assert "needs root" in host.unavailable_reason()
    finally:
        monkeypatch.undo()
        host._probe.cache_clear()


def test_link_options_are_checked_with_the_field_named():
    assert parse_delay_ms("25ms") == 25 and parse_delay_ms("0.1s") == 100 and parse_delay_ms("500us") == 0.5
    with pytest.raises(ValueError, match="--delay"):
        parse_delay_ms("soon", "--delay")
    with pytest.raises(ValueError, match="link.rate"):
        LinkSpec("fast").validate()
    with pytest.raises(ValueError, match="link.loss_pct"):
        LinkSpec(loss_pct=100).validate()
    with pytest.raises(ValueError, match="bed.subnet"):
        BedConfig(4, subnet="8.8.8.0/24").validate()
    assert abs((1 - LinkSpec(loss_pct=19).half_loss) ** 2 - 0.81) < 1e-12  # both ends together lose 19%


def test_bench_wan_refuses_bad_options_before_building_anything(tmp_path, capsys):
    from p2pdiloco.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "wan", "--help"])
    assert exit_.value.code == 0 and "--bandwidth" in capsys.readouterr().out
    out = str(tmp_path / "wan.json")
    assert main(["bench", "wan", "--peers", "4", "--slowdown", "1,2", "--json", out]) == 2
    assert "--slowdown needs one factor" in capsys.readouterr().err
    assert main(["bench", "wan", "--H", "6", "--tau", "2", "--json", out]) == 2  # τ·(P + 1) = 6 is not < H
    assert "streaming.tau" in capsys.readouterr().err
    assert main(["bench", "wan", "--bandwidth", "fast", "--json", out]) == 2
    assert "link.rate" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_a_harness_killed_with_sigkill_leaves_what_the_next_bed_sweeps():
    """SIGKILL allows no teardown: the next bed (sweep_stale) removes a dead owner's namespaces,
    the processes in them and its links."""
    require_bed()
    script = ("import time\n"
              "from p2pdiloco.wan.links import BedConfig, LinkSpec\n"
              "from p2pdiloco.wan.netns import NetnsBed\n"
              "bed = NetnsBed(BedConfig(2, LinkSpec('10mbit', 5))).__enter__()\n"
              "bed.spawn(1, ['sleep', '300'])\n"
              "print(' '.join(bed.namespaces), flush=True)\n"
              "time.sleep(300)\n")
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([owner.stdout], [], [], 30)
        names = owner.stdout.readline().split() if ready else []
        assert len(names) == 2 and set(names) <= host.namespaces()
        pids = [int(p) for p in host.run(["ip", "netns", "pids", names[1]]).split()]
        assert pids
    finally:
        owner.kill()
        owner.wait(10)
        removed = host.sweep_stale()  # here too when an assertion above failed: leave no bed behind
    assert set(names) <= set(removed)
    assert not set(names) & host.namespaces()
    assert not [p for p in pids if not procfs.is_zombie_or_gone(p)]
