"""`p2pdiloco peer`: one peer of a swarm. It joins (or starts) a run, trains its replica with the
Streaming DiLoCo engine, averages fragments with the other live peers, and leaves cleanly.

The engine is the simulator's (streaming.py); only its `Averager` differs (network.py). A peer never
waits for another longer than the swarm's timeouts: a late or failed average is skipped for that
round (the engine keeps its local fragment) and training goes on.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..averaging import span_bounds
from ..data import Corpus, ShardSampler
from ..hardware import HardwareConfig, resolve_device
from ..inner import InnerOptimizer
from ..models import model_vocab
from ..schedule import ClockSchedule
from ..simulate import SimConfig, _check_vocab, evaluate, write_json
from ..streaming import Worker
from . import checkpoint as ckpts
from . import joindir
from .config import SwarmConfig
from .control import SwarmStartError
from .matchmaking import poll_share_s
from .metrics import Metrics
from .network import Network, start_control
from .records import config_hash, describe_config, shared_config
from .runconfig import (
    ConfigMismatch,
    NoRunPeers,
    adopt,
    choose_run,
    find_run,
    given_names,
)
from .state import StateError, catch_up, rejoin, restore, snapshot

log = logging.getLogger("p2pdiloco.peer")


class Peer:
    def __init__(self, cfg: SimConfig, swarm: SwarmConfig, hardware: HardwareConfig = HardwareConfig(), out=print,
                 given: dict | None = None):
        """`given`: the training fields given by options, --config file or profile, before defaults
        (swarm/cli.py); a newcomer adopts the run's config for every shared field not given
        (runconfig.py). None: all of `cfg` counts as given."""
        if swarm.join_dir and not swarm.initial_peers:  # join through the live peers listed there
            swarm = replace(swarm, initial_peers=joindir.read(swarm.join_dir))
            out(f"[peer] --join-dir {swarm.join_dir}: " + (f"joining through {len(swarm.initial_peers)} address(es)"
                                                           if swarm.initial_peers else "no peers listed; starting a new swarm"))
        self.swarm, self.out = swarm.validate(cfg.workers), out
        self.stopping = threading.Event()
        self._install_signals()  # from here on, SIGINT/SIGTERM mean "leave cleanly", even while joining
        try:
            control = start_control(swarm)
        except SwarmStartError as exc:
            if swarm.join_dir and swarm.initial_peers:
                raise SwarmStartError(f"{exc}. The addresses came from --join-dir {swarm.join_dir}: files of "
                                      f"peers that crashed stay there; delete them if no peer of the run is alive") from None
            raise
        self.net = None
        self.metrics = Metrics(swarm.run_id)  # fed by the loop below and by the network (metrics.py)
        try:
            if swarm.initial_peers:  # the run's config, from its peers' records, before anything is built
                cfg = self._join_run(control, cfg, given)
                self.swarm = swarm.validate(cfg.workers)  # --shard against the run's --workers
            self.cfg = cfg.validate()
            self.hw = hardware.validate(cfg.batch_size)
            if self.hw.threads:
                torch.set_num_threads(self.hw.threads)
            self.device = resolve_device(self.hw.device)
            self.corpus = Corpus.load(cfg.data)
            model = cfg.build_model()  # every peer of a run starts from the same model, built on the CPU (seeded)
            _check_vocab(self.corpus, model_vocab(model))
            model = model.to(self.device)
            self.eval_model = copy.deepcopy(model)
            self.val = self.corpus.val_batches(cfg.batch_size, cfg.eval_batches)
            self._next_catch_up, self._missed_since, self._foreign = 0.0, {}, set()
            # --resume: read and check the checkpoint before going online, so the first record says where it is.
            self.resumed = ckpts.open_for_resume(self.cfg, self.swarm) if self.swarm.resume else None
            if self.swarm.resume and self.resumed is None:
                out(f"[peer] --resume auto: no checkpoint of run '{self.swarm.run_id}' under {ckpts.run_dir(self.swarm)} "
                    f"that no live peer holds; starting as a new peer")
            self.net = Network(swarm, config_hash(cfg), describe_config(cfg), cfg.streaming.codec,
                               self._state_for_newcomer, cfg.aggregate, status=self._resumed_status(),
                               run_config=shared_config(cfg), control=control, metrics=self.metrics)
        except BaseException:
            if self.net is None:  # (a Network that failed to start has stopped the DHT itself)
                control.shutdown()
            raise
        try:
            self.worker = Worker(self.net.peer_id[-8:], model, InnerOptimizer(model, cfg.inner, cfg.steps),
                                 cfg.streaming, cfg.outer, self.net.averager(self.device))
            self.applied: list[list] = []  # one entry per mean applied (_record_apply)
            self.worker.on_apply = self._record_apply
            shard = max(swarm.shard, 0)
            workers = cfg.workers if swarm.shard >= 0 else 1
            stream = None if swarm.shard >= 0 else int.from_bytes(self.net.peer_id.encode()[-8:], "little")
            self.sampler = ShardSampler(self.corpus, shard, workers, cfg.batch_size, stream=stream)
            self._check_message_size()
            self._setup_checkpoints()
            s = self.swarm
            self.metrics.start(self.net.peer_id, self.net.address, s.host, s.metrics_port, s.metrics_jsonl,
                               s.metrics_interval_s)
        except BaseException:
            self.metrics.close()
            self.net.close()
            raise

    def _join_run(self, control, cfg: SimConfig, given: dict | None) -> SimConfig:
        """This peer's config in the run it joins: the run's, with what was given here (runconfig.py).
        Nobody of the run listed within --join-timeout: an error, unless --wait-for-peers asks to wait."""
        s = self.swarm
        records = find_run(control, s.run_id, s.join_timeout_s, self.stopping)
        if self.stopping.is_set():
            return cfg
        run = choose_run(records)
        if run is None:
            if s.wait_for_peers > 1:
                self.out(f"[peer] no peer of run '{s.run_id}' is listed yet; waiting for --wait-for-peers "
                         f"{s.wait_for_peers} with this peer's config: {describe_config(cfg)}", flush=True)
                return cfg
            raise NoRunPeers(
                f"the DHT started through --initial-peers, but no live peer of run '{s.run_id}' was listed there within "
                f"{s.join_timeout_s:.0f}s (--join-timeout), so this peer would train alone. Check the run id "
                f"(`p2pdiloco status --initial-peers {s.initial_peers[0]} --run-id {s.run_id}` lists the run's peers), "
                f"start a new run without --initial-peers, or pass --wait-for-peers N to wait for N peers")
        mine = adopt(given, cfg, run, s.run_id)
        same = sum(r.config_hash == run.config_hash for r in records)
        names = given_names(given, mine)
        self.out(f"[peer] run '{s.run_id}' trains {describe_config(mine)} ({same} live peer(s)); "
                 + (f"adopted its config; given here and the same: {', '.join(names)}" if names else "adopted its config")
                 + "; batch size, inner optimizer, tau, alpha and timeouts are this peer's own", flush=True)
        return mine

    def _check_message_size(self) -> None:
        """Refuse at the start a run whose largest average cannot travel: a member sends an owner one
        span of a vector in one message, and in a group of 2 a span is half the vector. Better said now
        than found as a refused round (RESOURCE_EXHAUSTED) on every sync of that fragment."""
        w, s = self.worker, self.cfg.streaming
        limit, cap = self.swarm.max_message_bytes, f"--max-message-mb {self.swarm.max_message_mb}"
        fix = "raise --max-message-mb (on every peer of the run), or use more --fragments or a smaller --codec (e3m0)"
        vectors = [] if s.mode == "data_parallel" else [(f"fragment {f}", g.numel(), w.codec)
                                                        for f, g in enumerate(w.global_params)]
        if s.mode == "data_parallel" or s.dp_warmup_steps:
            vectors.append(("the gradient", sum(g.numel() for g in w.global_params), w.grad_codec))
        for what, numel, codec in vectors:
            span = max(hi - lo for lo, hi in span_bounds(numel, 2, codec.align))
            need = codec.nbytes(span) + 4096  # the message's other fields: far less than 4 KiB
            if need > limit:
                raise ValueError(f"{what} has {numel:,} values: half of it in {codec.name} is a {need / 2**20:,.1f} MiB "
                                 f"message, over {cap}; {fix}")

    # ---- joining
    def join(self) -> None:
        """Download the state if the run has averaged anything; otherwise start from the seeded model
        with the other first peers. A signal while joining (and a DHT that dies with it) just ends it."""
        try:
            self._join()
        except TimeoutError as exc:
            if not self.stopping.is_set():
                raise
            log.info("stopped while joining (%s)", exc)

    def _join(self) -> None:
        deadline = time.monotonic() + self.swarm.join_timeout_s
        while not self.stopping.is_set():
            same = self._same_config_peers()
            # Before its first round a run's global parameters are the seeded initial model, which
            # every peer builds itself: only a run that has averaged something has state to download.
            donors = [r for r in same if r.state == "training" and r.rounds]
            if donors:
                t0 = time.perf_counter()
                try:
                    blob, agree = self.net.download(donors)
                except StateError as exc:  # donors that disagree (or failed): ask again, until --join-timeout
                    if time.monotonic() > deadline:
                        raise
                    log.warning("state download: %s", exc)
                    self.stopping.wait(0.5)
                    continue
                (rejoin if self.resumed else restore)(self.worker, blob)  # a resumed peer keeps what is its own
                self._start_clock(donors)
                w = self.worker
                # A fragment whose average was in flight at the donor is a round behind in the copy.
                w.missed = {f for f in range(len(w.offsets))
                            if w.applied_rounds.get(f, -1) < w.schedule.next_round(f, w.step) - 1}
                self.out(f"[peer] downloaded the run's state ({len(blob):,} bytes, verified: "
                         f"{f'{agree} donors agree' if agree > 1 else 'one donor, nobody to compare with'}) in "
                         f"{time.perf_counter() - t0:.1f}s; {'re' if self.resumed else ''}joining at step {self.worker.step}")
                break
            if len(same) + 1 >= self.swarm.wait_for_peers and not self._defers_to(same):
                break
            self._check_deadline(deadline, len(same) + 1, "came")
            self.stopping.wait(self._poll_s(len(same)))
        if self.stopping.is_set():
            return
        self.net.status["state"] = "training"
        self.net.publish()
        # A start barrier for the first peers: nobody trains until all of them are listed as
        # training, so the first round already expects every one of them.
        while not self.stopping.is_set():
            ready = [r for r in self._same_config_peers() if r.state == "training"]
            if len(ready) + 1 >= self.swarm.wait_for_peers:
                if self._start_clock(ready):
                    self.net.publish()
                return
            self._check_deadline(deadline, len(ready) + 1, "were ready")
            self.stopping.wait(self._poll_s(len(ready)))

    def _poll_s(self, peers: int) -> float:
        """How long a joining peer waits between two reads of every record: each read returns every
        peer's record, so N peers polling at a fixed rate cost the DHT N² records a second. At 32
        peers on 2 cores, polls every 0.1-0.2 s starved the heartbeats: records expired, nobody
        ever saw all 32, and --wait-for-peers timed out. A wait that grows with the swarm (up to
        a heartbeat) keeps the reads to a few dozen a second in all."""
        return min(max(0.1, self.swarm.heartbeat_s), max(0.1, poll_share_s(peers)))

    def _start_clock(self, records) -> bool:
        """Time-budget rounds: adopt the run's end time from any peer that has one, or start the
        run's clock here (the first peers, leaving the start barrier together, differ by a poll)."""
        s, w = self.cfg.streaming, self.worker
        if not s.round_s or isinstance(w.schedule, ClockSchedule):
            return False
        left = s.duration_s if self._clock_left_s is None else self._clock_left_s  # a resumed run: what it had left
        ends = max((r.ends_at for r in records if r.ends_at > 0), default=0.0) or time.time() + left
        w.schedule = ClockSchedule(w.offsets, s.H, w.inner.total_steps, ends - s.duration_s, s.round_s, s.duration_s)
        self.net.status["ends_at"] = ends
        self.out(f"[peer] time-budget rounds: every fragment syncs each {s.round_s:g}s; the run ends in "
                 f"{ends - time.time():.0f}s", flush=True)
        return True

    def _same_config_peers(self):
        """The live peers that train this peer's config. Peers of another config are ignored (said
        once each): a newcomer refuses a conflicting run before it publishes anything (runconfig.py),
        so a running peer never leaves because of someone else's options. A peer that joined through
        --initial-peers and finds only other configs (they all changed since it joined) refuses."""
        peers = [r for r in self.net.peers() if r.peer_id != self.net.peer_id]
        others = [r for r in peers if r.config_hash != self.net.config_hash]
        if others and len(others) == len(peers) and self.swarm.initial_peers and self.net.status["state"] == "joining":
            raise ConfigMismatch(
                f"run '{self.swarm.run_id}' trains {others[0].config}, this peer {describe_config(self.cfg)}; "
                f"leave out the training options to adopt the run's, give the same ones, or use another --run-id")
        for r in others:
            if r.peer_id not in self._foreign:
                self._foreign.add(r.peer_id)
                log.warning("peer %s trains another config (%s); it is ignored", r.peer_id[-8:], r.config)
        return [r for r in peers if r.config_hash == self.net.config_hash]

    def _check_deadline(self, deadline: float, have: int, what: str) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {have} of --wait-for-peers {self.swarm.wait_for_peers} peers {what} "
                               f"within {self.swarm.join_timeout_s:.0f}s (--join-timeout)")

    def _catch_up(self, urgent: bool) -> None:
        """Fragments whose last round failed here may be behind the swarm's global copy: take the
        copy of a peer that applied a later round, keeping this replica's own progress. Urgent when
        such a fragment is due next step (averaging from a stale base would split the swarm): then
        retry until it is current. If for `record_ttl_s` no peer is ahead, the round failed for
        everyone (a dead owner, say) and every copy is still the same."""
        w, started = self.worker, time.perf_counter()
        while w.missed and not self.stopping.is_set():
            now = time.monotonic()
            for f in w.missed:
                self._missed_since.setdefault(f, now)
            try:
                donors = [r for r in self._same_config_peers() if r.state == "training"]
            except TimeoutError as exc:  # the DHT is slow or gone (network.py says which): no donors this time
                log.warning("catching up: could not list the peers: %s", exc)
                donors = []
            try:
                updated = catch_up(w, self.net.download(donors, set(w.missed))[0], set(w.missed)) if donors else []
            except StateError as exc:
                log.warning("catching up failed: %s", exc)
                updated = []
            if updated:
                self.out(f"[peer] caught up fragment(s) {updated} from the swarm after a missed round", flush=True)
            w.missed -= set(updated)
            for f in [f for f in w.missed if now - self._missed_since[f] > self.swarm.record_ttl_s]:
                w.missed.discard(f)  # nobody is ahead: the round failed everywhere
            self._missed_since = {f: t for f, t in self._missed_since.items() if f in w.missed}
            if not urgent:
                break
            time.sleep(0.1)
        self._next_catch_up = time.monotonic() + 0.5
        w.wait_s += time.perf_counter() - started  # time on the network, not computing

    async def _state_for_newcomer(self, fragments: set[int] | None) -> bytes:
        """Called on the network thread; the copy runs in its executor so the loop keeps serving."""
        import asyncio
        return await asyncio.get_running_loop().run_in_executor(None, snapshot, self.worker, fragments)

    # ---- checkpoints and resume (checkpoint.py)
    def _resumed_status(self) -> dict | None:
        if self.resumed is None:
            return None
        w = self.resumed.data["worker"]
        return {"step": int(w["step"]), "tokens": int(w["counters"]["tokens"]),
                "rounds": {int(k): int(v) for k, v in w["applied_rounds"].items()}}

    def _setup_checkpoints(self) -> None:
        """Load the checkpoint opened before the network started; claim the file this peer's
        checkpoints go to: the one it resumed (one file per peer in a folder they share), else its own."""
        r, folder, w = self.resumed, ckpts.run_dir(self.swarm), self.worker
        self._clock_left_s = None
        if r is not None:
            ckpts.apply(r.data, w, self.sampler)
            self._clock_left_s, r.data = r.data["clock_left_s"], None
            self.out(f"[peer] resumed from {r.path} at step {w.step} ({w.tokens:,} tokens, rounds "
                     f"{dict(sorted(w.applied_rounds.items()))})", flush=True)
        if r is not None and r.path.parent.resolve() == folder.resolve():
            self._slot = r.slot
        else:
            if r is not None:
                r.slot.release()
            path = folder / f"{self.net.peer_id}.pt"
            try:
                self._slot = ckpts.Slot.claim(path)
            except OSError as exc:  # as before resuming existed: the write at the end will say it failed
                log.warning("cannot lock the checkpoint %s (%s); writing it may fail too", path, exc)
                self._slot = ckpts.Slot(path, -1)
            if self._slot is None:
                raise ckpts.CheckpointError(f"the checkpoint {path} is held by another live peer: do two peers "
                                            f"share one --identity?")
        path = self._slot.path
        ckpts.remove_stale_temporaries(path)
        self._writer = ckpts.Writer(path, self.out)
        every = self.swarm.checkpoint_every
        self._next_checkpoint = (w.step // every + 1) * every if every else 0

    def _defers_to(self, same) -> bool:
        """Restarting a stopped run: the joining peer with the newest state (a resumed checkpoint's
        step, then peer id) restarts it, and the others wait until it trains to take its state
        (join's donors); a peer with no state waits for any peer that has some."""
        mine = (self.worker.step, self.net.peer_id) if self.resumed else None
        return any(r.rounds and (mine is None or (r.step, r.peer_id) > mine) for r in same if r.state == "joining")

    def _capture(self) -> dict:
        sched = self.worker.schedule
        left = max(0.0, sched.epoch + sched.duration_s - time.time()) if isinstance(sched, ClockSchedule) else None
        return ckpts.capture(self.worker, self.sampler, self.cfg, self.swarm, self.net.peer_id, left)

    def _maybe_checkpoint(self) -> None:
        """Every --checkpoint-every steps, at the first step with no mean in flight (nothing then
        needs catching up after a resume) and the previous write done. Only the copy happens here."""
        w = self.worker
        if not self._next_checkpoint or w.step < self._next_checkpoint or w.in_flight or self._writer.busy():
            return
        self._next_checkpoint = (w.step // self.swarm.checkpoint_every + 1) * self.swarm.checkpoint_every
        t0 = time.perf_counter()
        self._writer.start(self._capture())
        log.debug("checkpoint copy at step %d took %.3fs", w.step, time.perf_counter() - t0)

    # ---- training
    def run(self) -> dict:
        try:
            line = self.net.join_line()
            self.out(f"[peer] {self.net.peer_id} serving on {self.net.address}", flush=True)
            if self.net.transport_note:
                self.out(f"[peer] {self.net.transport_note}", flush=True)
            self.out(f"[peer] join with: {line}", flush=True)
            if self.metrics.url:
                self.out(f"[peer] metrics: {self.metrics.url}", flush=True)
            if self.swarm.join_dir:
                # With --announce-host, only that address: a loopback one would lead another
                # container to its own daemon.
                maddrs = self.net.maddrs()
                joindir.publish(self.swarm.join_dir, self.net.peer_id, maddrs[:1] if self.swarm.announce_host else maddrs)
            self.join()
            return self.train()  # a stop during join() trains zero steps and leaves
        finally:
            self.close()

    def train(self) -> dict:
        w, cfg, status, hw = self.worker, self.cfg, self.net.status, self.hw
        self._start_clock([])  # a peer that trains alone (wait-for-peers 1, nobody there) starts the clock
        before = evaluate(w.load_global_into(self.eval_model), self.val)
        self.metrics.observe_eval(before)
        accumulate = f" = {hw.accumulation(cfg.batch_size)} x {hw.micro_batch}" if hw.micro_batch else ""
        self.out(f"[peer] training from {w.schedule.progress(w.step)} on {self.device} ({torch.get_num_threads()} "
                 f"threads), batch {cfg.batch_size}{accumulate}; eval loss of the global model {before:.4f}", flush=True)
        start, last_report, tokens0, step0, compute_s = time.perf_counter(), 0.0, w.tokens, w.step, 0.0
        curve, eval_s, next_eval = [(0.0, w.tokens, before)], 0.0, self.swarm.eval_every_s or float("inf")
        first_average = bool(w.applied_rounds)  # a newcomer's download already holds averages
        loss = float("nan")
        while not w.schedule.finished(w.step) and not self.stopping.is_set():
            t0, wait0 = time.perf_counter(), w.wait_s
            loss = w.forward_backward(*self.sampler.next(), micro_batch=hw.micro_batch)
            w.optimizer_step()  # data-parallel: waits here for the averaged gradient
            if hw.slowdown > 1:  # emulated slower hardware: the step's compute, stretched
                time.sleep((hw.slowdown - 1) * (time.perf_counter() - t0 - (w.wait_s - wait0)))
            w.send_due()  # the due fragments' Δ go to the network thread; training goes on
            if w.schedule.finished(w.step):
                compute_s += time.perf_counter() - t0 - (w.wait_s - wait0)
                break  # the final sync below settles what is in flight
            w.apply_due()  # means sent τ steps ago: waits only if one is late
            if w.missed and not w.in_flight:  # a round others applied without us: take their global copy
                urgent = bool(w.missed & w.schedule.due_next(w.step))
                if urgent or time.monotonic() >= self._next_catch_up:
                    self._catch_up(urgent)
            if w.applied_rounds and not first_average:  # the swarm works: say so once
                first_average = True
                self.out(f"[peer] first average applied at step {w.step} "
                         f"(groups so far: {dict(self.net.group_sizes)})", flush=True)
            compute_s += time.perf_counter() - t0 - (w.wait_s - wait0)
            elapsed = time.perf_counter() - start
            if elapsed >= next_eval:  # the loss-against-wall-clock curve (bench wan); not counted as compute
                t1 = time.perf_counter()
                curve.append((elapsed, w.tokens, evaluate(w.load_global_into(self.eval_model), self.val)))
                self.metrics.observe_eval(curve[-1][2])
                eval_s += time.perf_counter() - t1
                next_eval = elapsed + self.swarm.eval_every_s
            status.update(step=w.step, tokens=w.tokens, tokens_per_s=(w.tokens - tokens0) / max(elapsed, 1e-9),
                          rounds=dict(w.applied_rounds))
            self.metrics.observe_step(w, loss, status["tokens_per_s"], elapsed, compute_s / max(elapsed - eval_s, 1e-9))
            self._maybe_checkpoint()
            if elapsed - last_report > 10:
                last_report = elapsed
                self._report(loss)
        # No lost work: a last sync of every fragment, and wait for it. After the loop, because on
        # the wall clock the end may come during an evaluation or a catch-up, not only after a step.
        if w.schedule.finished(w.step) and w.step > step0 and not self.stopping.is_set():
            w.send_final()
            w.flush()
            if w.missed:  # a final round failed here: take the swarm's copy if anyone has it
                self._catch_up(urgent=True)
        status.update(step=w.step, tokens=w.tokens, rounds=dict(w.applied_rounds))
        self._report(loss)
        wall = time.perf_counter() - start
        after = evaluate(w.load_global_into(self.eval_model), self.val)
        curve.append((wall, w.tokens, after))
        self.metrics.observe_eval(after)
        self.metrics.observe_step(w, loss, status["tokens_per_s"], wall, compute_s / max(wall - eval_s, 1e-9), final=True)
        return {"peer_id": self.net.peer_id, "eval_loss_initial": before, "eval_loss": after,
                "steps": w.step, "completed": w.schedule.finished(w.step), "tokens": w.tokens,
                "bytes_sent": w.bytes_sent, "peak_sync_bytes": w.peak_sync_bytes,
                "data_parallel_bytes": self._data_parallel_bytes(w.step - step0),
                "skipped_rounds": w.skipped_rounds, "group_sizes": dict(self.net.group_sizes),
                "averaged_with": sorted(self.net.averaged_with),
                "matchmaking_s": list(self.net.matchmaking_s), "wall_s": wall,
                "applied": self.applied, "global_fingerprint": self._global_fingerprint(),
                "dht_calls": dict(self.net.control.calls),
                # Per round (bench wan's timing columns): each completed average's transfer and the
                # matchmaking left once its Δ was handed in (network.py); each settled round's τ,
                # latency (submit to mean) and what the loop waited for it (streaming.py).
                "transfer_s": list(self.net.transfer_s), "matchmaking_left_s": list(self.net.matchmaking_left_s),
                "prepared_rounds": self.net.prepared_rounds, "round_log": list(w.round_log),
                "tau_auto": cfg.streaming.tau_auto, "step_s": w.step_clock.step_s,
                "compute_fraction": compute_s / max(wall - eval_s, 1e-9), "wait_s": w.wait_s, "eval_s": eval_s,
                "device": str(self.device), "batch_size": cfg.batch_size, "micro_batch": hw.micro_batch,
                "slowdown": hw.slowdown,
                "eval_curve": [{"wall_s": t, "tokens": n, "eval_loss": v} for t, n, v in curve]}

    def _record_apply(self, f: int, rnd: int, result) -> None:
        """[fragment, round, group, group size, mean]: the group as a hash of its members' ids, the
        mean as a hash of its bytes. Every member of a group decodes the same bytes, so members that
        applied one group's mean must show the same hash (bench swarm checks it across peers)."""
        group = hashlib.sha256(",".join(result.participants).encode()).hexdigest()[:12]
        mean = hashlib.sha256(result.mean.detach().contiguous().cpu().numpy().tobytes()).hexdigest()[:16]
        self.applied.append([f, rnd, group, len(result.participants), mean])

    def _global_fingerprint(self) -> str:
        """A hash of every fragment's global copy: equal on peers that applied the same means."""
        h = hashlib.sha256()
        for g in self.worker.global_params:
            h.update(g.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def _report(self, loss: float) -> None:
        w, status = self.worker, self.net.status
        self.out(f"[peer] {w.schedule.progress(w.step)}  loss {loss:.3f}  {status['tokens_per_s']:,.0f} tok/s  "
                 f"sent {w.bytes_sent:,} B  skipped rounds {w.skipped_rounds}", flush=True)

    def _data_parallel_bytes(self, steps: int) -> int:
        """What a bf16 ring all-reduce of the gradients, among as many peers as this one averaged
        with, would have sent per peer over these steps."""
        n = sum(p.numel() for p in self.worker.model.parameters())
        m = max(self.net.group_sizes, default=2)
        return int(steps * 2 * (m - 1) / m * n * 2)

    # ---- leaving
    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum, _frame):
            if self.stopping.is_set():  # a second signal: leave now
                raise KeyboardInterrupt
            self.stopping.set()
            # os.write, not print: a handler that prints while the main thread is printing raises
            # "reentrant call" at a random point of the peer.
            try:
                os.write(sys.stdout.fileno(), f"[peer] {signal.Signals(signum).name}: finishing this step, "
                                              f"then leaving\n".encode())
            except (OSError, ValueError):
                pass

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)

    def checkpoint(self) -> Path:
        """Write a checkpoint now (when leaving), after the periodic one being written, if any."""
        return self._writer.write_now(self._capture())

    def close(self) -> None:
        try:
            if self.worker.step > 0:
                self.out(f"[peer] checkpoint: {self.checkpoint()}")
        except Exception as exc:  # leaving must not lose the exit: say what failed
            log.error("could not write the checkpoint: %s", exc)
        if self.swarm.join_dir:
            joindir.withdraw(self.swarm.join_dir, self.net.peer_id)
        self.metrics.close()
        self.net.close()


def run_peer(cfg: SimConfig, swarm: SwarmConfig, hardware: HardwareConfig = HardwareConfig(),
             given: dict | None = None) -> int:
    def out(msg, flush=True):
        print(msg, flush=flush)

    peer = Peer(cfg, swarm, hardware, out, given=given)
    summary = peer.run()
    if swarm.summary_json:
        write_json(swarm.summary_json, summary)
    out(f"[peer] done: eval loss {summary['eval_loss_initial']:.4f} -> {summary['eval_loss']:.4f}; "
        f"{summary['steps']} steps; sent {summary['bytes_sent']:,} B (data-parallel: "
        f"{summary['data_parallel_bytes']:,} B); compute {summary['compute_fraction']:.0%} of wall time")
    return 0
