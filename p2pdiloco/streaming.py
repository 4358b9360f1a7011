"""The Streaming DiLoCo engine: one worker's replica, its fragments' global copies and outer state.

Algorithm (Streaming DiLoCo, arXiv 2501.18512; DiLoCo, arXiv 2311.08105): every worker runs inner
AdamW steps on its own shard. Right after inner step t, each fragment f due at t (fragments.py)
sends its pseudo-gradient Δ_f = θ_f,global − θ_f,local, encoded by the codec, to the averager, and
training goes on. At step t + τ the weighted mean Δ̄_f is applied to the global copy by the outer
optimizer and merged into the replica: θ_f,local ← α·θ_f,local + (1 − α)·θ_f,global.
τ = 0 and α = 0 is plain DiLoCo's "restart from the new global parameters".

Eager updates (arXiv 2502.12996), adapted to a τ-step delay: while the mean is in flight the worker
trains from the outer step it would take if everyone's Δ equalled its own, θ̂ = Outer(θ_global, Δ_own);
when the mean arrives it swaps that proxy base for the true one, keeping the τ steps of progress:
θ_local ← θ_global,new + (θ_local − θ̂).

Data-parallel is the same worker with `mode="data_parallel"`: gradients go through the same averager
every step and every replica takes the same AdamW step. `dp_warmup_steps` runs the first steps that
way before switching to streaming (DiLoCo's own experiments start from a data-parallel warm start).

The engine knows nothing of sockets. A driver calls, for every step, in order:
`forward_backward(batch)`, `optimizer_step()`, `send_due()`, `apply_due()`. In the simulator the
driver runs phase by phase across workers, so every average is complete when it is awaited; a peer
runs them in a loop and waits at most `timeout_s` for a late average, then keeps its local fragment.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from .averaging import Averager, SyncKey
from .codecs import get_codec
from .fragments import FlatView, build_fragments, find_blocks, sync_offsets
from .inner import InnerOptimizer
from .outer import OuterConfig, OuterSGD
from .overlap import OverlapPolicy, StepClock, choose_tau, tau_max
from .schedule import StepSchedule

log = logging.getLogger("p2pdiloco.streaming")


@dataclass(frozen=True)
class StreamingConfig:
    mode: str = "streaming"  # or "data_parallel"
    H: int = 100  # inner steps between two syncs of the same fragment
    fragments: int = 4  # P: fragments of the model's repeated blocks
    strategy: str = "strided"
    tau: int = 1  # steps between sending Δ_f and applying its mean
    # τ chosen for each send from the measured round latency and step time (overlap.py; `--tau auto`,
    # real peers only): `tau` is then unused, and τ stays within the bound τ·F < H.
    tau_auto: bool = False
    alpha: float = 0.5  # weight of the local replica when merging
    eager: bool = False
    codec: str = "e3m0"
    dp_warmup_steps: int = 0
    error_feedback: bool = True  # carry what the codec dropped into the fragment's next Δ
    timeout_s: float = 60.0  # the longest a worker waits for a late average before skipping it
    # Time-budget mode (schedule.py, real peers only): each fragment syncs every round_s seconds of
    # wall clock instead of every H steps, and training ends after duration_s seconds. 0: fixed H.
    round_s: float = 0.0
    duration_s: float = 0.0

    def validate(self, n_blocks: int) -> "StreamingConfig":
        if self.mode not in ("streaming", "data_parallel"):
            raise ValueError(f"streaming.mode '{self.mode}' is unknown; use 'streaming' or 'data_parallel'")
        get_codec(self.codec)
        if self.H < 1:
            raise ValueError(f"streaming.H must be at least 1, got {self.H}")
        if not 1 <= self.fragments <= n_blocks:
            raise ValueError(f"streaming.fragments ({self.fragments}) must be between 1 and the model's "
                             f"{n_blocks} blocks; use fewer fragments or a deeper model")
        syncs = self.fragments + (self.fragments > 1)  # the `shared` fragment (fragments.py)
        if not self.tau_auto and (self.tau < 0 or (self.tau > 0 and self.tau * syncs >= self.H)):
            raise ValueError(f"streaming.tau ({self.tau}) must be ≥ 0 and below H / fragment syncs = "
                             f"{self.H} / {syncs}, so that a fragment's mean lands before the next "
                             f"fragment sends; lower tau or raise H")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"streaming.alpha must be in [0, 1], got {self.alpha}")
        if self.tau_auto and (self.mode != "streaming" or tau_max(self.H, syncs) < 1):
            raise ValueError(f"streaming.tau_auto needs mode 'streaming' and room for τ ≥ 1 (τ·F < H): H = {self.H} "
                             f"with {syncs} fragment syncs leaves none; raise H")
        if self.eager and self.tau == 0 and not self.tau_auto:
            raise ValueError("streaming.eager needs streaming.tau ≥ 1: with no delay there is nothing to be eager about")
        if self.dp_warmup_steps < 0 or self.timeout_s <= 0:
            raise ValueError("streaming.dp_warmup_steps must be ≥ 0 and streaming.timeout_s positive")
        if self.round_s < 0 or self.duration_s < 0:
            raise ValueError("streaming.round_s and streaming.duration_s must be ≥ 0 (0: fixed-H rounds)")
        if self.round_s > 0:
            if self.duration_s < self.round_s:
                raise ValueError(f"streaming.duration_s ({self.duration_s}) must be at least one round "
                                 f"(streaming.round_s = {self.round_s}): time-budget rounds end by the clock")
            if self.mode != "streaming" or self.dp_warmup_steps:
                raise ValueError("streaming.round_s (time-budget rounds) needs mode 'streaming' and no "
                                 "dp_warmup_steps: data-parallel steps are paced by every peer at once")
        elif self.duration_s:
            raise ValueError("streaming.duration_s is for time-budget rounds; set streaming.round_s too")
        return self


@dataclass
class _InFlight:
    round: int
    future: Future
    apply_at: int
    weight: float
    proxy: torch.Tensor | None  # θ̂ for eager updates
    residual_before: torch.Tensor | None  # error-feedback residual to restore if the round fails
    alpha: float  # merge weight of the local replica when this mean lands
    tau: int = 0  # the τ it was sent with
    final: bool = False
    sent_at: float = 0.0  # perf_counter at submit
    landed_at: list = None  # [perf_counter] once the future is done (set on the averager's thread)
    step_s: float = 0.0  # the step time measured when it was sent (what τ was sized with)


class Worker:
    def __init__(self, name: str, model: nn.Module, inner: InnerOptimizer, cfg: StreamingConfig,
                 outer: OuterConfig, averager: Averager):
        self.name, self.model, self.inner, self.averager = name, model, inner, averager
        n_blocks = len(find_blocks(model)[1])  # the repeated layers: blocks, transformer.h, model.layers...
        self.cfg = cfg.validate(n_blocks)
        self.codec = get_codec(cfg.codec)
        self.grad_codec = get_codec("bf16")  # data-parallel's gradients travel as in a bf16 all-reduce
        self.fragments = build_fragments(model, n_blocks, cfg.fragments, cfg.strategy)
        self.views = [FlatView(model, f) for f in self.fragments]
        # The global copies, outer momentum and error-feedback residuals live on the training device,
        # and the codec encodes and decodes there: only encoded bytes cross to the host and back.
        self.device = next(model.parameters()).device
        self.global_params = [v.read() for v in self.views]
        self.outer = [OuterSGD(outer, f.numel, self.device) for f in self.fragments]
        self.residuals = ([torch.zeros(f.numel, device=self.device) for f in self.fragments]
                          if cfg.error_feedback else None)
        self.offsets = sync_offsets(len(self.fragments), cfg.H)
        # A swarm peer in time-budget mode swaps in a ClockSchedule once it knows the run's epoch.
        self.schedule = StepSchedule(self.offsets, cfg.H, inner.total_steps)
        self._due_now: tuple[int, dict[int, int]] = (-1, {})  # (step, fragment → round it began after it)
        self.in_flight: dict[int, _InFlight] = {}
        self.tokens_since = [0] * len(self.fragments)
        self.step = 0  # inner steps taken
        self.tokens = 0
        self.bytes_sent = 0
        self.peak_sync_bytes = 0
        self.peak_fragment_sync_bytes = 0  # the same without gradient all-reduces (a warm start's are whole-model)
        # What each kind of sync cost this worker: fragment index, or "grad" for a gradient
        # all-reduce, -> [bytes, syncs]. A sync's size depends on the values with an entropy-coded codec.
        self.sync_bytes: dict[int | str, list[int]] = {}
        self.skipped_rounds = 0
        self.rounds_applied = 0  # fragment rounds whose mean was applied (the swarm's metrics count them)
        self.applied_rounds: dict[int, int] = {}  # fragment -> the last round whose mean was applied
        self.missed: set[int] = set()  # fragments whose last round failed here (a swarm peer catches up)
        self.wait_s = 0.0  # time spent blocked on averages that were late
        # Called as on_apply(fragment, round, result) once a mean is applied: a swarm peer's record
        # of which group's mean it applied (bench swarm checks that a group's members agree).
        self.on_apply = None
        # Overlap sized to the link (overlap.py): the τ of the next send, the compute time of a step,
        # the latency (submit to mean) of each round that landed, and one entry per settled round
        # (the peer's summary: per-round latency, wait and τ).
        # --tau auto starts at τ_max: nothing is measured yet, and the first rounds pay cold connections.
        self.tau = tau_max(cfg.H, len(self.fragments)) if cfg.tau_auto else cfg.tau
        self.overlap = OverlapPolicy()
        self.step_clock = StepClock()
        self._last_step: tuple[float, float] | None = None  # (perf_counter, wait_s) at the last step's end
        self.latencies: list[float] = []
        self.round_log: list[dict] = []
        # Held while the global copies change, so another thread (a swarm peer serving its state to
        # a newcomer) can read a consistent copy at any time.
        self.lock = threading.RLock()
        self._grad_future: Future | None = None

    @property
    def data_parallel_now(self) -> bool:
        return self.cfg.mode == "data_parallel" or self.step < self.cfg.dp_warmup_steps

    @property
    def just_switched(self) -> bool:
        """Right after the data-parallel warm start's last step every replica is the global copy:
        a fragment due now has no Δ and no tokens to average (a round of zero weight)."""
        return 0 < self.cfg.dp_warmup_steps == self.step

    # ---- phase 1: local gradient (and, data-parallel, hand it to the averager)
    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, micro_batch: int = 0) -> float:
        """One step's gradient, accumulated over micro-batches of `micro_batch` sequences (0: all
        at once) so a small device takes the same step as a large one."""
        inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        size = len(inputs)
        chunk = micro_batch or size
        loss_sum = 0.0
        for i in range(0, size, chunk):
            loss = self.model(inputs[i: i + chunk], targets[i: i + chunk]) * (len(inputs[i: i + chunk]) / size)
            loss.backward()
            loss_sum += loss.item()
        n = targets.numel()
        self.tokens += n
        self.tokens_since = [t + n for t in self.tokens_since]
        if self.data_parallel_now:
            grads = torch.cat([p.grad.reshape(-1) for p in self.model.parameters()]).float()
            key = SyncKey("grad", 0, self.step)
            self._grad_future = self.averager.submit(key, self.grad_codec.encode(grads).to("cpu"), float(n))
        return loss_sum

    # ---- phase 2: the inner step (data-parallel: on the averaged gradient)
    def optimizer_step(self) -> None:
        if self._grad_future is not None:
            result = self._await(self._grad_future)
            self._grad_future = None
            self._count_bytes(result.bytes_sent, "grad")
            mean, offset = self._mean_here(result), 0
            for p in self.model.parameters():
                p.grad.copy_(mean[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
        self.inner.step(self.schedule.lr_step(self.step))
        self.step += 1
        now = time.perf_counter()
        if self._last_step is not None:  # compute only: what the loop waited on averages is not a step's cost
            self.step_clock.add(now - self._last_step[0] - (self.wait_s - self._last_step[1]))
        self._last_step = (now, self.wait_s)
        if self.step == self.cfg.dp_warmup_steps and self.cfg.mode == "streaming":
            # Switch to streaming: every replica is identical here, so this is the shared start.
            self.global_params = [v.read() for v in self.views]
            self.tokens_since = [0] * len(self.fragments)

    # ---- phase 3: begin the syncs due after this step
    def send_due(self) -> None:
        if self.data_parallel_now or self.just_switched:
            return
        due = self.schedule.due(self.step)
        earlier = self._due_now[1] if self._due_now[0] == self.step else {}
        self._due_now = (self.step, {**earlier, **dict(due)})
        for f, rnd in due:
            self._send(f, rnd, final=False)
        self._announce_upcoming()

    def _announce_upcoming(self) -> None:
        """Tell the averager which rounds come due within τ_max steps, and how far ahead each is,
        so a swarm can form their groups before the Δ is ready (network.py `ahead`; the simulator
        ignores it). Step-scheduled rounds only: a wall-clock round's step is not known ahead."""
        ceiling = tau_max(self.cfg.H, len(self.fragments))
        due_at = getattr(self.schedule, "due_at", None)
        if due_at is None or ceiling < 1:
            return
        for ahead in range(1, ceiling + 1):
            step = self.step + ahead
            if step > self.schedule.total_steps or step <= self.cfg.dp_warmup_steps:
                continue
            for f, rnd in due_at(step):
                self.averager.ahead(SyncKey("fragment", f, rnd), ahead, self.step_clock.step_s, ceiling)

    def send_final(self) -> None:
        """End of training: every fragment not synced at this very step syncs once more, so the
        global parameters hold every replica's last steps (no lost work) and every method is
        evaluated on a fully synced model. The replicas then restart from it (α = 0)."""
        if self.data_parallel_now or self.just_switched:
            return
        # Rounds that came due since this step's send_due(): on the wall clock the end may be
        # noticed later (after an evaluation), and the others will have sent those rounds.
        self.send_due()
        due = self._due_now[1] if self._due_now[0] == self.step else {}
        for f in range(len(self.fragments)):
            last = self.schedule.final_round(f, self.step)
            if due.get(f) == last:  # sent at this step already: only its landing changes, no more training follows
                if f in self.in_flight:
                    self.in_flight[f].alpha = 0.0
                    self.in_flight[f].final = True  # it lands in the final sync's wait, as the others do
            else:
                self._send(f, last, final=True)

    def _send(self, f: int, rnd: int, final: bool) -> None:
        if f in self.in_flight:  # its previous mean is still owed: settle it first
            self._finish(f, self.in_flight.pop(f))
        delta = self.global_params[f] - self.views[f].read()
        if not torch.isfinite(delta).all():
            # A diverged replica must not poison the average (a 4-bit code cannot even show a NaN):
            # restart this fragment from the global copy and sit this round out.
            log.error("%s: fragment %d has non-finite values; restarting it from the global copy", self.name, f)
            self.views[f].write(self.global_params[f])
            future: Future = Future()
            future.set_exception(FloatingPointError(f"fragment {f} diverged"))
            self.in_flight[f] = _InFlight(rnd, future, self.step, float(self.tokens_since[f]), None, None, 0.0)
            self.tokens_since[f] = 0
            return
        encoded, residual_before = self._encode_delta(f, delta)
        weight = float(self.tokens_since[f])
        if self.cfg.tau_auto and not final:
            self.tau = choose_tau(self.latencies, self.step_clock.step_s, self.cfg.H, len(self.fragments), self.overlap,
                                  self.averager.overlap_limit_s)
        sent_at, landed_at = time.perf_counter(), []
        # The one copy to the host of a sync: the encoded bytes (a no-op on the CPU).
        future = self.averager.submit(SyncKey("fragment", f, rnd), encoded.to("cpu"), weight)
        future.add_done_callback(lambda _: landed_at.append(time.perf_counter()))
        proxy = None
        if self.cfg.eager and not final:
            proxy = self.outer[f].preview(self.global_params[f], delta)
            self.views[f].write(proxy)
        tau = 0 if final else self.tau
        self.in_flight[f] = _InFlight(rnd, future, self.step + tau, weight, proxy, residual_before,
                                      0.0 if final else self.cfg.alpha, tau, final, sent_at, landed_at,
                                      self.step_clock.step_s)
        self.tokens_since[f] = 0

    def _encode_delta(self, f: int, delta: torch.Tensor):
        """Encode Δ_f (on the training device); with error feedback, first add what the codec dropped
        last round (a lossy codec's error then cancels across rounds instead of accumulating: EF-SGD)."""
        if self.residuals is None or self.codec.name == "fp32":
            return self.codec.encode(delta), None
        before = self.residuals[f]
        target = delta + before
        encoded = self.codec.encode(target)
        self.residuals[f] = target - encoded.decode()
        return encoded, before

    # ---- phase 4: apply the means that are due
    def apply_due(self) -> None:
        for f in sorted(self.in_flight):
            if self.in_flight[f].apply_at <= self.step:
                self._finish(f, self.in_flight.pop(f))

    def flush(self) -> None:
        """Apply every mean still in flight (end of training), whatever its due step."""
        for f in sorted(self.in_flight):
            self._finish(f, self.in_flight.pop(f))

    def _finish(self, f: int, sync: _InFlight) -> None:
        waited0 = self.wait_s
        try:
            result = self._await(sync.future)
        except Exception as exc:  # a late or failed average: keep the local fragment, catch up next turn
            self._log_round(f, sync, self.wait_s - waited0, ok=False)
            self.skipped_rounds += 1
            self.missed.add(f)
            self.tokens_since[f] += int(sync.weight)
            if sync.residual_before is not None:  # the next Δ carries this round's drift in full
                self.residuals[f] = sync.residual_before
            log.warning("%s: fragment %d round %d not averaged (%s: %s); keeping the local fragment",
                        self.name, f, sync.round, type(exc).__name__, exc)
            return
        self._count_bytes(result.bytes_sent, f)
        self.rounds_applied += 1
        mean = self._mean_here(result)
        self._log_round(f, sync, self.wait_s - waited0, ok=True)
        with self.lock:
            self.applied_rounds[f] = sync.round
            self.outer[f].step(self.global_params[f], mean)
        local = self.views[f].read()
        if sync.proxy is not None:
            merged = self.global_params[f] + (local - sync.proxy)
        else:
            merged = sync.alpha * local + (1 - sync.alpha) * self.global_params[f]
        self.views[f].write(merged)
        if self.on_apply is not None:
            self.on_apply(f, sync.round, result)

    def _mean_here(self, result) -> torch.Tensor:
        """The mean on the training device. The averager decodes it on the host (the swarm checks it
        there); a device peer decodes the spans' encoded means again where it trains, so that 1/8 of
        the fp32 bytes cross (E3M0), the same values bit for bit (decoding is a table look-up)."""
        if result.mean.device == self.device:
            return result.mean
        if not result.encoded:
            return result.mean.to(self.device)
        mean, lo = torch.empty(result.mean.numel(), device=self.device), 0
        for span in result.encoded:
            span.codec.decode_into(span.to(self.device), mean[lo: lo + span.numel])
            lo += span.numel
        assert lo == mean.numel(), "the spans' means must cover the vector"
        return mean

    def _log_round(self, f: int, sync: _InFlight, waited_s: float, ok: bool) -> None:
        latency = (sync.landed_at[0] - sync.sent_at) if sync.landed_at else None
        if ok and latency is not None and not sync.final:  # the final sync is not a sample of the link under training
            self.latencies.append(latency)
            del self.latencies[:-64]
        self.round_log.append({"fragment": f, "round": sync.round, "tau": sync.tau, "final": sync.final, "ok": ok,
                               "latency_s": None if latency is None else round(latency, 4),
                               "wait_s": round(waited_s, 4), "step_s": round(sync.step_s, 4)})

    def _await(self, future: Future):
        start = time.perf_counter()
        try:
            return future.result(timeout=self.cfg.timeout_s)
        finally:
            self.wait_s += time.perf_counter() - start

    def _count_bytes(self, n: int, what: int | str) -> None:
        self.bytes_sent += n
        self.peak_sync_bytes = max(self.peak_sync_bytes, n)
        if what != "grad":
            self.peak_fragment_sync_bytes = max(self.peak_fragment_sync_bytes, n)
        total = self.sync_bytes.setdefault(what, [0, 0])
        total[0] += n
        total[1] += 1

    def bytes_per_sync(self, what: int | str) -> float | None:
        """The mean bytes one sync of `what` (fragment index, or "grad") cost this worker; None if none happened."""
        total, count = self.sync_bytes.get(what, (0, 0))
        return total / count if count else None

    # ---- the model to evaluate and to export: the global parameters
    @torch.no_grad()
    def load_global_into(self, model: nn.Module) -> nn.Module:
        if self.data_parallel_now:
            model.load_state_dict(self.model.state_dict())
            return model
        for fragment, flat in zip(self.fragments, self.global_params):
            FlatView(model, fragment).write(flat)
        return model
