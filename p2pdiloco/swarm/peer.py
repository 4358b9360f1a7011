"""`p2pdiloco peer`: one peer of a swarm. It joins (or starts) a run, trains its replica with the
Streaming DiLoCo engine, averages fragments with the other live peers, and leaves cleanly.

The engine is the simulator's (streaming.py); only its `Averager` differs (network.py). A peer never
waits for another longer than the swarm's timeouts: a late or failed average is skipped for that
round (the engine keeps its local fragment) and training goes on.
"""
from __future__ import annotations

import copy
import logging
import os
import signal
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
from ..simulate import SimConfig, _check_vocab, evaluate, write_json
from ..schedule import ClockSchedule
from ..streaming import Worker
from . import joindir
from .config import SwarmConfig
from .control import SwarmStartError
from .network import Network
from .records import config_hash, describe_config
from .state import StateError, catch_up, restore, snapshot

log = logging.getLogger("p2pdiloco.peer")


class ConfigMismatch(ValueError):
    pass


class Peer:
    def __init__(self, cfg: SimConfig, swarm: SwarmConfig, hardware: HardwareConfig = HardwareConfig(), out=print):
        if swarm.join_dir and not swarm.initial_peers:  # join through the live peers listed there
            swarm = replace(swarm, initial_peers=joindir.read(swarm.join_dir))
            out(f"[peer] --join-dir {swarm.join_dir}: " + (f"joining through {len(swarm.initial_peers)} address(es)"
                                                           if swarm.initial_peers else "no peers listed; starting a new swarm"))
        self.cfg, self.swarm, self.out = cfg.validate(), swarm.validate(cfg.workers), out
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
        self.stopping = threading.Event()
        self._next_catch_up, self._missed_since = 0.0, {}
        try:
            self.net = Network(swarm, config_hash(cfg), describe_config(cfg), cfg.streaming.codec,
                               self._state_for_newcomer)
        except SwarmStartError as exc:
            if swarm.join_dir and swarm.initial_peers:
                raise SwarmStartError(f"{exc}. The addresses came from --join-dir {swarm.join_dir}: files of "
                                      f"peers that crashed stay there; delete them if no peer of the run is alive") from None
            raise
        try:
            self.worker = Worker(self.net.peer_id[-8:], model, InnerOptimizer(model, cfg.inner, cfg.steps),
                                 cfg.streaming, cfg.outer, self.net.averager())
            shard = swarm.shard if swarm.shard >= 0 else 0
            workers = cfg.workers if swarm.shard >= 0 else 1
            stream = None if swarm.shard >= 0 else int.from_bytes(self.net.peer_id.encode()[-8:], "little")
            self.sampler = ShardSampler(self.corpus, shard, workers, cfg.batch_size, stream=stream)
            self._check_message_size()
        except BaseException:
            self.net.close()
            raise

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
        """Refuse a run that trains something else; download the state if the run has averaged
        anything; otherwise start from the seeded model with the other first peers."""
        deadline = time.monotonic() + self.swarm.join_timeout_s
        while not self.stopping.is_set():
            same = self._same_config_peers()
            # Before its first round a run's global parameters are the seeded initial model, which
            # every peer builds itself: only a run that has averaged something has state to download.
            donors = [r for r in same if r.state == "training" and r.rounds]
            if donors:
                t0 = time.perf_counter()
                blob = self.net.download(donors)
                restore(self.worker, blob)
                self._start_clock(donors)
                w = self.worker
                # A fragment whose average was in flight at the donor is a round behind in the copy.
                w.missed = {f for f in range(len(w.offsets))
                            if w.applied_rounds.get(f, -1) < w.schedule.next_round(f, w.step) - 1}
                self.out(f"[peer] downloaded the run's state ({len(blob):,} bytes, verified) in "
                         f"{time.perf_counter() - t0:.1f}s; joining at step {self.worker.step}")
                break
            if len(same) + 1 >= self.swarm.wait_for_peers:
                break
            self._check_deadline(deadline, len(same) + 1, "came")
            self.stopping.wait(0.2)
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
            self.stopping.wait(0.1)

    def _start_clock(self, records) -> bool:
        """Time-budget rounds: adopt the run's end time from any peer that has one, or start the
        run's clock here (the first peers, leaving the start barrier together, differ by a poll)."""
        s, w = self.cfg.streaming, self.worker
        if not s.round_s or isinstance(w.schedule, ClockSchedule):
            return False
        ends = max((r.ends_at for r in records if r.ends_at > 0), default=0.0) or time.time() + s.duration_s
        w.schedule = ClockSchedule(w.offsets, s.H, w.inner.total_steps, ends - s.duration_s, s.round_s, s.duration_s)
        self.net.status["ends_at"] = ends
        self.out(f"[peer] time-budget rounds: every fragment syncs each {s.round_s:g}s; the run ends in "
                 f"{ends - time.time():.0f}s", flush=True)
        return True

    def _same_config_peers(self):
        peers = [r for r in self.net.peers() if r.peer_id != self.net.peer_id]
        others = [r for r in peers if r.config_hash != self.net.config_hash]
        if others and len(others) == len(peers):
            raise ConfigMismatch(
                f"run '{self.swarm.run_id}' trains {others[0].config}, this peer {describe_config(self.cfg)}; "
                f"start this peer with the same model and streaming options, or use another --run-id")
        for r in others:
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
            donors = [r for r in self._same_config_peers() if r.state == "training"]
            try:
                updated = catch_up(w, self.net.download(donors, set(w.missed)), set(w.missed)) if donors else []
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

    # ---- training
    def run(self) -> dict:
        self._install_signals()
        try:
            line = self.net.join_line()
            self.out(f"[peer] {self.net.peer_id} serving on {self.net.address}", flush=True)
            if self.net.transport_note:
                self.out(f"[peer] {self.net.transport_note}", flush=True)
            self.out(f"[peer] join with: {line}", flush=True)
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
                eval_s += time.perf_counter() - t1
                next_eval = elapsed + self.swarm.eval_every_s
            status.update(step=w.step, tokens=w.tokens, tokens_per_s=(w.tokens - tokens0) / max(elapsed, 1e-9),
                          rounds=dict(w.applied_rounds))
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
        return {"peer_id": self.net.peer_id, "eval_loss_initial": before, "eval_loss": after,
                "steps": w.step, "completed": w.schedule.finished(w.step), "tokens": w.tokens,
                "bytes_sent": w.bytes_sent, "peak_sync_bytes": w.peak_sync_bytes,
                "data_parallel_bytes": self._data_parallel_bytes(w.step - step0),
                "skipped_rounds": w.skipped_rounds, "group_sizes": dict(self.net.group_sizes),
                "matchmaking_s": list(self.net.matchmaking_s), "wall_s": wall,
                "compute_fraction": compute_s / max(wall - eval_s, 1e-9), "wait_s": w.wait_s, "eval_s": eval_s,
                "device": str(self.device), "batch_size": cfg.batch_size, "micro_batch": hw.micro_batch,
                "slowdown": hw.slowdown,
                "eval_curve": [{"wall_s": t, "tokens": n, "eval_loss": v} for t, n, v in curve]}

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
            self.out(f"[peer] {signal.Signals(signum).name}: finishing this step, then leaving", flush=True)
            self.stopping.set()

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)

    def checkpoint(self) -> Path:
        path = Path(self.swarm.checkpoint_dir) / self.swarm.run_id / f"{self.net.peer_id}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"model": self.worker.load_global_into(self.eval_model).state_dict(),
                    "state": snapshot(self.worker), "config": describe_config(self.cfg)}, tmp)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        try:
            if self.worker.step > 0:
                self.out(f"[peer] checkpoint: {self.checkpoint()}")
        except Exception as exc:  # leaving must not lose the exit: say what failed
            log.error("could not write the checkpoint: %s", exc)
        if self.swarm.join_dir:
            joindir.withdraw(self.swarm.join_dir, self.net.peer_id)
        self.net.close()


def run_peer(cfg: SimConfig, swarm: SwarmConfig, hardware: HardwareConfig = HardwareConfig()) -> int:
    def out(msg, flush=True):
        print(msg, flush=flush)

    peer = Peer(cfg, swarm, hardware, out)
    summary = peer.run()
    if swarm.summary_json:
        write_json(swarm.summary_json, summary)
    out(f"[peer] done: eval loss {summary['eval_loss_initial']:.4f} -> {summary['eval_loss']:.4f}; "
        f"{summary['steps']} steps; sent {summary['bytes_sent']:,} B (data-parallel: "
        f"{summary['data_parallel_bytes']:,} B); compute {summary['compute_fraction']:.0%} of wall time")
    return 0
