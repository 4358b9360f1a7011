"""Checkpoints and `--resume`: the round trip of everything a peer holds, atomic writes that a kill -9
cannot tear, the config check, and a real 2-peer swarm killed outright and resumed."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from p2pdiloco.config import build
from p2pdiloco.simulate import SimConfig, Simulation
from p2pdiloco.swarm import checkpoint as ckpts
from p2pdiloco.swarm.config import SwarmConfig
from peers import TINY

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent


def sim_config(text_file, **streaming) -> SimConfig:
    return build(SimConfig, {"model": "tiny", "workers": 2, "steps": 40, "batch_size": 4, "seed": 1, "eval_batches": 2,
                             "data": {"paths": (str(text_file),), "seq_len": 32},
                             "inner": {"lr": 3e-3, "warmup_steps": 2},
                             "streaming": {"H": 6, "fragments": 2, "tau": 1, "codec": "e3m0", **streaming}})


def trained(cfg: SimConfig, steps: int, corpus) -> Simulation:
    """At least `steps` steps, then on to the first step with no mean in flight (as a peer checkpoints)."""
    sim = Simulation(cfg, corpus)
    for _ in range(steps):
        sim.train_step()
    while sim.workers[0].in_flight:
        sim.train_step()
    return sim


def save(sim: Simulation, cfg: SimConfig, swarm: SwarmConfig, path: Path) -> dict:
    data = ckpts.capture(sim.workers[0], sim.samplers[0], cfg, swarm, "peerA", None)
    ckpts.write_atomic(path, ckpts.serialize(data))
    return data


def test_a_checkpoint_restores_everything(tmp_path, text_file, small_corpus):
    cfg, swarm = sim_config(text_file), SwarmConfig(checkpoint_dir=str(tmp_path))
    sim = trained(cfg, 14, small_corpus)  # past two rounds of each fragment: momentum, residuals, counters
    w = sim.workers[0]
    assert w.applied_rounds and w.residuals is not None and any(r.abs().sum() > 0 for r in w.residuals)
    path = tmp_path / "p2pdiloco" / "peerA.pt"
    save(sim, cfg, swarm, path)
    # Loads with weights_only=True (no code runs), and holds the global model for plain tools.
    raw = torch.load(path, weights_only=True)
    assert set(raw["model"]) == set(sim.global_model().state_dict())
    for name, t in sim.global_model().state_dict().items():
        torch.testing.assert_close(raw["model"][name], t, rtol=0, atol=0)

    fresh = Simulation(cfg, small_corpus)
    v, sampler = fresh.workers[0], fresh.samplers[0]
    ckpts.apply(ckpts.read(path), v, sampler)
    assert (v.step, v.tokens, v.applied_rounds, v.skipped_rounds, v.bytes_sent, v.tokens_since, v.sync_bytes) == \
           (w.step, w.tokens, w.applied_rounds, w.skipped_rounds, w.bytes_sent, w.tokens_since, w.sync_bytes)
    for a, b in zip(w.global_params, v.global_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(w.outer, v.outer):
        torch.testing.assert_close(a.buf, b.buf, rtol=0, atol=0)
        assert a.buf.abs().sum() > 0
    for a, b in zip(w.residuals, v.residuals):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(w.model.state_dict().values(), v.model.state_dict().values()):  # the replica
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    sa, sb = w.inner.opt.state_dict(), v.inner.opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sa["state"][k][name], sb["state"][k][name], rtol=0, atol=0)
    # The data position: the next batch is the one the saved walk would have drawn.
    for _ in range(3):
        xa, xb = sim.samplers[0].next()[0], sampler.next()[0]
        assert torch.equal(xa, xb)


def test_a_mean_in_flight_is_saved_as_a_failed_round(tmp_path, text_file, small_corpus):
    cfg = sim_config(text_file)
    sim = Simulation(cfg, small_corpus)
    while not sim.workers[0].in_flight:  # stop right after a send: its mean is owed one step later
        ws = sim.workers
        for w, s in zip(ws, sim.samplers):
            w.forward_backward(*s.next())
        for w in ws:
            w.optimizer_step()
            w.send_due()
    w = sim.workers[0]
    (f, sync), = w.in_flight.items()
    data = ckpts.capture(w, sim.samplers[0], cfg, SwarmConfig(), "peerA", None)
    assert f in data["worker"]["missed"]
    assert data["worker"]["counters"]["tokens_since"][f] == w.tokens_since[f] + int(sync.weight)
    torch.testing.assert_close(data["worker"]["residuals"][f], sync.residual_before, rtol=0, atol=0)


def test_a_checkpoint_of_another_config_is_refused(tmp_path, text_file, small_corpus):
    cfg, swarm = sim_config(text_file), SwarmConfig(checkpoint_dir=str(tmp_path))
    path = tmp_path / "p2pdiloco" / "peerA.pt"
    save(trained(cfg, 2, small_corpus), cfg, swarm, path)
    other = sim_config(text_file, H=8)
    with pytest.raises(ckpts.CheckpointError, match=r"another config .*H=6.*H=8"):
        ckpts.check_config(ckpts.read(path), other, swarm, path)
    with pytest.raises(ckpts.CheckpointError, match=r"data.seq_len: 32 there, 16 here"):
        ckpts.check_config(ckpts.read(path), replace(cfg, data=replace(cfg.data, seq_len=16)), swarm, path)
    with pytest.raises(ckpts.CheckpointError, match="run id"):
        ckpts.check_config(ckpts.read(path), cfg, replace(swarm, run_id="other"), path)
    ckpts.check_config(ckpts.read(path), replace(cfg, batch_size=8), swarm, path)  # a local choice may change
    # What --resume PATH says through the peer's validation.
    with pytest.raises(ValueError, match="not a file"):
        replace(swarm, resume=str(tmp_path / "nope.pt")).validate(2)


def test_auto_takes_the_newest_checkpoint_no_live_peer_holds(tmp_path, text_file, small_corpus):
    cfg = sim_config(text_file)
    swarm = SwarmConfig(checkpoint_dir=str(tmp_path), resume="auto")
    assert ckpts.open_for_resume(cfg, swarm) is None  # nothing there: start as a new peer
    sim = trained(cfg, 2, small_corpus)
    old, new = tmp_path / "p2pdiloco" / "old.pt", tmp_path / "p2pdiloco" / "new.pt"
    save(sim, cfg, swarm, old)
    save(sim, cfg, swarm, new)
    os.utime(old, (time.time() - 60, time.time() - 60))
    first = ckpts.open_for_resume(cfg, swarm)
    second = ckpts.open_for_resume(cfg, swarm)  # the newest is held (the first's flock): the next one
    assert (first.path, second.path) == (new, old)
    assert ckpts.open_for_resume(cfg, swarm) is None
    with pytest.raises(ckpts.CheckpointError, match="a live peer holds"):
        ckpts.open_for_resume(cfg, replace(swarm, resume=str(new)))
    first.slot.release()
    assert ckpts.open_for_resume(cfg, swarm).path == new


def test_a_torn_temporary_file_never_replaces_a_good_checkpoint(tmp_path, text_file, small_corpus):
    cfg, swarm = sim_config(text_file), SwarmConfig(checkpoint_dir=str(tmp_path), resume="auto")
    path = tmp_path / "p2pdiloco" / "peerA.pt"
    save(trained(cfg, 2, small_corpus), cfg, swarm, path)
    good = path.read_bytes()
    tmp = path.with_name(f".{path.name}.12345.tmp")  # what a writer killed mid-write leaves
    tmp.write_bytes(good[: len(good) // 2])
    resumed = ckpts.open_for_resume(cfg, swarm)
    assert resumed.path == path and resumed.data["worker"]["step"] >= 2
    ckpts.remove_stale_temporaries(path)
    assert not tmp.exists() and path.read_bytes() == good


WRITER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from p2pdiloco.swarm.checkpoint import write_atomic
    path, i = Path(sys.argv[1]), 0
    while True:  # large enough that a kill lands mid-write now and then
        i += 1
        blob = __import__("io").BytesIO()
        torch.save({"i": i, "x": torch.full((3_000_000,), float(i))}, blob)
        write_atomic(path, blob.getvalue())
        print(i, flush=True)
""")


def test_kill_9_while_writing_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip()  # one whole write done
        time.sleep(0.05 * attempt)
        proc.kill()
        proc.wait(10)
        data = torch.load(path, weights_only=True)
        assert torch.equal(data["x"], torch.full((3_000_000,), float(data["i"])))


# ---- a real swarm, killed outright and resumed

def steps_of_checkpoints(peer) -> list[int]:
    return [int(m.group(1)) for line in peer.lines for m in [re.search(r"checkpoint at step (\d+)", line)] if m]


def test_a_killed_swarm_resumes_from_its_checkpoints(swarm, text_file):
    args = [*TINY, "--data", str(text_file), "--steps", "150", "--wait-for-peers", "2", "--checkpoint-every", "12",
            "--json", "s.json"]
    first = swarm.start(*args, name="a")
    second = swarm.start(*args, "--initial-peers", first.join_address(), name="b")
    initial = float(first.wait_for(r"eval loss of the global model ([\d.]+)", 120).group(1))
    for p in (first, second):
        p.wait_for(r"checkpoint at step (2[4-9]|[3-9]\d)", 240)
    for p in (first, second):  # the whole swarm stops at once, nothing written on the way out
        p.kill_group()
    assert all("done:" not in p.output() for p in (first, second)), "the run ended before the kill"
    saved = {p.name: max(steps_of_checkpoints(p)) for p in (first, second)}
    assert min(saved.values()) >= 24

    # Restart both in the same folders: each finds its own checkpoint (a new peer id: the newest of the run).
    again = [swarm.start(*args, "--resume", "auto", name="a")]
    again.append(swarm.start(*args, "--resume", "auto", "--initial-peers", again[0].join_address(), name="b"))
    for p, name in zip(again, ("a", "b")):
        step = int(p.wait_for(r"resumed from \S+ at step (\d+)", 120).group(1))
        assert step == saved[name], p.output()
    for p in again:
        assert p.wait(300) == 0, p.output()
    # One restarts the run (the newest state leads), the other takes its shared state and keeps its own.
    assert sum("rejoining at step" in p.output() for p in again) == 1, [p.output() for p in again]
    sums = [json.loads((p.cwd / "s.json").read_text()) for p in again]
    for p, s in zip(again, sums):
        assert s["completed"] and s["steps"] == 150
        start = int(re.search(r"training from step (\d+)", p.output()).group(1))
        assert start >= min(saved.values())
        # The token counter went on from the checkpoint's (and the data position with it), not from 0.
        assert s["tokens"] == (saved[p.name] + 150 - start) * 4 * 32
        assert s["group_sizes"].get("2", 0) >= 2, (s["group_sizes"], p.output())  # they averaged again
        assert s["eval_loss"] < initial - 0.5, (initial, s["eval_loss"])
    models = []
    for p in again:  # the resumed peer wrote to the checkpoint it resumed: one file per peer
        (path,) = list((p.cwd / "checkpoints" / "p2pdiloco").glob("*.pt"))
        models.append(torch.load(path, weights_only=True)["model"])
    for name in models[0]:
        torch.testing.assert_close(models[0][name], models[1][name], rtol=0, atol=0)


def test_a_rejoining_peer_takes_the_swarms_state_and_keeps_its_own(text_file, small_corpus):
    from p2pdiloco.swarm.state import load_worker_state, rejoin, snapshot, worker_state

    cfg = sim_config(text_file)
    sim = trained(cfg, 8, small_corpus)
    mine = worker_state(sim.workers[1])  # this peer's checkpoint, a few steps behind the swarm
    sim2 = trained(cfg, 20, small_corpus)
    donor = sim2.workers[0]
    peer = Simulation(cfg, small_corpus).workers[1]
    load_worker_state(peer, mine)
    drift = [v.read() - g for v, g in zip(peer.views, peer.global_params)]
    rejoin(peer, snapshot(donor))
    assert peer.step == donor.step and peer.applied_rounds == donor.applied_rounds  # the schedule's place
    for f, (g, d) in enumerate(zip(peer.global_params, donor.global_params)):
        torch.testing.assert_close(g, d, rtol=0, atol=0)
        torch.testing.assert_close(peer.outer[f].buf, donor.outer[f].buf, rtol=0, atol=0)
        torch.testing.assert_close(peer.views[f].read() - g, drift[f], rtol=0, atol=1e-5)  # its own progress
        torch.testing.assert_close(peer.residuals[f], mine["residuals"][f], rtol=0, atol=0)
    assert peer.tokens == mine["counters"]["tokens"] != donor.tokens
    exp_avg = next(iter(peer.inner.opt.state.values()))["exp_avg"]
    torch.testing.assert_close(exp_avg, next(iter(mine["inner"]["state"].values()))["exp_avg"], rtol=0, atol=0)


def test_the_options_reach_the_config_and_bench_resume_passes_peer_options_on():
    from p2pdiloco.cli import build_parser
    from p2pdiloco.swarm.cli import peer_configs

    args, rest = build_parser().parse_known_args(["peer", "--checkpoint-every", "25", "--resume", "auto"])
    _, swarm, _ = peer_configs(args)
    assert (swarm.checkpoint_every, swarm.resume) == (25, "auto")
    with pytest.raises(ValueError, match="checkpoint_every"):
        replace(swarm, checkpoint_every=-1).validate(4)
    args, rest = build_parser().parse_known_args(["bench", "resume", "--stop-at", "5", "--json", "r.json",
                                                  "--steps", "30", "--H", "6"])
    assert (args.stop_at, args.json, rest) == (5, "r.json", ["--steps", "30", "--H", "6"])


def test_a_time_budget_run_resumes_with_the_time_it_had_left(swarm, text_file):
    args = [*TINY, "--data", str(text_file), "--steps", "100000", "--round-seconds", "3", "--duration", "24",
            "--checkpoint-every", "10", "--json", "s.json"]
    peer = swarm.start(*args, name="a")
    peer.wait_for(r"checkpoint at step (1[1-9]|[2-9]\d)", 120)  # the second one at least: time has passed
    peer.kill_group()
    (path,) = list((peer.cwd / "checkpoints" / "p2pdiloco").glob("*.pt"))
    saved = torch.load(path, weights_only=True)
    left = saved["clock_left_s"]
    assert 0 < left < 24
    again = swarm.start(*args, "--resume", "auto", name="a")
    assert int(again.wait_for(r"resumed from \S+ at step (\d+)", 120).group(1)) == saved["worker"]["step"]
    ends_in = int(again.wait_for(r"the run ends in (\d+)s", 120).group(1))
    assert ends_in <= round(left) + 1, (ends_in, left)  # the clock goes on from the checkpoint, not from 24 s
    assert again.wait(120) == 0, again.output()
    assert json.loads((again.cwd / "s.json").read_text())["completed"]
