"""When each fragment syncs: after a fixed number of inner steps (H), or on the wall clock.

`StepSchedule` is Streaming DiLoCo's schedule (fragments.py): fragment f syncs after the steps t
with (t − t_f) mod H == 0. Every peer of a run is then paced by the slowest one: a fast peer
reaches round r first and waits for the others (up to the matchmaking window) or averages without
them.

`ClockSchedule` is the time-budget mode for mixed hardware: fragment f's round k is due at the
wall-clock time epoch + W·(k + t_f/H) (one more period for the fragment with t_f = 0, so no
fragment syncs at the very start, as in the step schedule), where W is the round length in
seconds. Every peer trains until that moment, so a fast peer simply does more steps in the same
round, and the average weighs each contribution by its tokens. Peers agree on the epoch through
their DHT records (the run's end time, swarm/peer.py); the round numbers come from the clock, so
peers that read the same epoch and whose clocks agree within the matchmaking window (NTP does far
better) name the same round. The inner learning rate follows the elapsed fraction of the run, so
peers of different speeds use the same rate at the same moment.
"""
from __future__ import annotations

import math
import time
from typing import Callable

from .fragments import due_fragments, next_round, sync_round


class StepSchedule:
    def __init__(self, offsets: list[int], H: int, total_steps: int):
        self.offsets, self.H, self.total_steps = offsets, H, total_steps
        self._asked = -1  # the last step due() answered: asked again, nothing new is due

    def due(self, step: int) -> list[tuple[int, int]]:
        """(fragment, round) of the syncs that begin right after inner step `step`, once per step."""
        if step <= self._asked:
            return []
        self._asked = step
        return self.due_at(step)

    def due_at(self, step: int) -> list[tuple[int, int]]:
        """(fragment, round) of the syncs due right after inner step `step` (asked any number of times)."""
        return [(f, sync_round(step, self.offsets[f], self.H)) for f in due_fragments(step, self.offsets, self.H)]

    def next_round(self, f: int, step: int) -> int:
        return next_round(step, self.offsets[f], self.H)

    def final_round(self, f: int, step: int) -> int:
        """The round of fragment f's last sync when training ends after `step`: the one it begins
        at that very step if it is due, else the next."""
        return dict(self.due_at(step)).get(f, self.next_round(f, step))

    def due_next(self, step: int) -> set[int]:
        return set(due_fragments(step + 1, self.offsets, self.H))

    def lr_step(self, step: int) -> int:
        return step

    def finished(self, step: int) -> bool:
        return step >= self.total_steps

    def progress(self, step: int) -> str:
        return f"step {step}/{self.total_steps}"


class ClockSchedule:
    def __init__(self, offsets: list[int], H: int, total_steps: int, epoch: float, round_s: float,
                 duration_s: float, clock: Callable[[], float] = time.time):
        self.frac = [off / H for off in offsets]
        self.total_steps, self.epoch, self.round_s, self.duration_s = total_steps, epoch, round_s, duration_s
        self.clock = clock
        # The last round each fragment began; a newcomer mid-run leaves the rounds already past to the others.
        self.sent = [self._passed(f, clock()) - 1 for f in range(len(offsets))]
        self._last_due_call: float | None = None
        self.step_s = 0.0  # a running estimate of one step's wall time

    def _first(self, f: int) -> float:
        return self.frac[f] + (1 if self.frac[f] == 0 else 0)

    def _passed(self, f: int, now: float) -> int:
        """How many of fragment f's due times are at or before `now`, counting only the regular
        rounds: those due before the run's end. The last round of every fragment is the one due
        at or after the end (`final_round`), sent by every peer when it stops."""
        passed = math.floor((now - self.epoch) / self.round_s - self._first(f) + 1e-9) + 1
        return max(0, min(passed, self._regular(f)))

    def _regular(self, f: int) -> int:
        """How many of fragment f's due times come before the end (the same number on every peer)."""
        return max(0, math.ceil(self.duration_s / self.round_s - self._first(f) - 1e-9))

    def due(self, step: int) -> list[tuple[int, int]]:
        now = self.clock()
        if self._last_due_call is not None:
            self.step_s = 0.8 * self.step_s + 0.2 * (now - self._last_due_call) if self.step_s else now - self._last_due_call
        self._last_due_call = now
        out = []
        for f in range(len(self.frac)):
            k = self._passed(f, now) - 1
            if k > self.sent[f]:  # a peer slower than a whole round skips to the latest one
                self.sent[f] = k
                out.append((f, k))
        return out

    def next_round(self, f: int, step: int) -> int:
        return max(self._passed(f, self.clock()), self.sent[f] + 1)

    def final_round(self, f: int, step: int) -> int:
        """Fragment f's last round: the first due at or after the run's end. It is named from the
        end time, which every peer shares, never from the moment a peer noticed the end (after a
        step, an evaluation or a catch-up): a peer that noticed late must not name a round the
        others have already sent as a regular one, or each side averages its last Δ alone."""
        return max(self._regular(f), self.sent[f] + 1)

    def due_next(self, step: int) -> set[int]:
        soon = self.clock() + max(2 * self.step_s, 0.05)
        return {f for f in range(len(self.frac)) if self._passed(f, soon) - 1 > self.sent[f]}

    def lr_step(self, step: int) -> int:
        elapsed = (self.clock() - self.epoch) / self.duration_s
        return int(min(max(elapsed, 0.0), 1.0) * self.total_steps + 1e-6)  # 1e-6: float error at whole steps

    def finished(self, step: int) -> bool:
        return self.clock() >= self.epoch + self.duration_s

    def progress(self, step: int) -> str:
        elapsed = min(self.clock() - self.epoch, self.duration_s)
        return f"step {step} at {elapsed:.0f}/{self.duration_s:.0f}s"
