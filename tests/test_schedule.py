"""Fragments (placement rule) and the sync schedule."""
import pytest
import torch

from p2pdiloco.fragments import FlatView, build_fragments, due_fragments, next_round, sync_offsets, sync_round
from p2pdiloco.model import Transformer, model_config


@pytest.fixture(scope="module")
def model():
    return Transformer(model_config("tiny", n_layers=6))


def _blocks_of(fragment):
    return sorted({int(n.split(".")[1]) for n in fragment.param_names if n.startswith("blocks.")})


def test_strided_and_sequential(model):
    strided = build_fragments(model, 6, 3, "strided")
    assert [_blocks_of(f) for f in strided[:3]] == [[0, 3], [1, 4], [2, 5]]
    sequential = build_fragments(model, 6, 3, "sequential")
    assert [_blocks_of(f) for f in sequential[:3]] == [[0, 1], [2, 3], [4, 5]]


def test_every_parameter_in_exactly_one_fragment(model):
    names = [n for n, _ in model.named_parameters()]
    for p in (1, 2, 3, 6):
        fragments = build_fragments(model, 6, p)
        placed = [n for f in fragments for n in f.param_names]
        assert sorted(placed) == sorted(names)
        assert sum(f.numel for f in fragments) == model.num_parameters()


def test_shared_fragment_rule(model):
    # P = 1: one fragment with everything (plain DiLoCo). P > 1: embeddings and norm on their own.
    assert len(build_fragments(model, 6, 1)) == 1
    fragments = build_fragments(model, 6, 3)
    assert [f.name for f in fragments] == ["blocks0", "blocks1", "blocks2", "shared"]
    assert set(fragments[-1].param_names) == {"embed.weight", "norm.weight"}
    total = model.num_parameters()
    assert max(f.numel for f in fragments) <= total / 3


def test_too_many_fragments(model):
    with pytest.raises(ValueError, match="streaming.fragments .7. must be between 1 and the model's 6 blocks"):
        build_fragments(model, 6, 7)


@pytest.mark.parametrize("F,H", [(1, 10), (3, 30), (5, 100), (4, 7)])
def test_each_fragment_syncs_once_per_H(F, H):
    offsets = sync_offsets(F, H)
    assert offsets[0] == 0 and all(0 <= o < H for o in offsets) and offsets == sorted(offsets)
    T = 5 * H
    seen = {f: [] for f in range(F)}
    for t in range(1, T + 1):
        for f in due_fragments(t, offsets, H):
            seen[f].append(t)
    for f, steps in seen.items():
        assert all((t - offsets[f]) % H == 0 for t in steps)
        assert all(b - a == H for a, b in zip(steps, steps[1:]))
        assert [sync_round(t, offsets[f], H) for t in steps] == list(range(len(steps)))
        assert len(steps) in (T // H, T // H + 1)
        for t in range(0, T):  # the round after any step is the next regular sync's round
            following = [s for s in steps if s > t]
            if following:
                assert next_round(t, offsets[f], H) == sync_round(following[0], offsets[f], H)


def test_flat_view_roundtrip(model):
    fragment = build_fragments(model, 6, 2)[1]
    view = FlatView(model, fragment)
    flat = view.read()
    assert flat.numel() == fragment.numel
    view.write(flat * 0 + 1.5)
    assert all(torch.all(p == 1.5) for p in view.params)
    view.write(flat)
    assert torch.equal(view.read(), flat)


# ---- time-budget rounds (schedule.py)
from p2pdiloco.schedule import ClockSchedule, StepSchedule  # noqa: E402


class FakeClock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("P,H", [(1, 10), (2, 30), (3, 30), (4, 100)])
def test_clock_schedule_names_the_same_rounds_as_the_step_schedule_at_a_steady_pace(P, H):
    """At exactly W/H seconds per step the clock reproduces the step schedule, round numbers included."""
    offsets = sync_offsets(P, H)
    W, epoch = 6.0, 1000.0
    clock = FakeClock(epoch)
    steps, timed = StepSchedule(offsets, H, 5 * H), ClockSchedule(offsets, H, 5 * H, epoch, W, 5 * W, clock)
    for step in range(1, 5 * H):  # the last step's rounds: test_the_final_round_at_a_steady_pace...
        clock.t = epoch + step * W / H
        assert timed.due(step) == steps.due(step), step
        assert timed.finished(step) == steps.finished(step)
        assert timed.lr_step(step) == steps.lr_step(step)
        for f in range(P):
            assert timed.next_round(f, step) == steps.next_round(f, step)


def test_a_fast_peer_takes_more_steps_per_round_and_a_slow_one_skips_to_the_latest_round():
    clock = FakeClock(0.0)
    s = ClockSchedule([0, 5], 10, 100, epoch=0.0, round_s=10.0, duration_s=100.0, clock=clock)
    seen = []
    for step in range(1, 2501):  # 10 ms steps: 1000 steps per 10 s round
        clock.t = step * 0.01
        seen += [(f, r, step) for f, r in s.due(step)]
    assert seen == [(1, 0, 500), (0, 0, 1000), (1, 1, 1500), (0, 1, 2000), (1, 2, 2500)]
    clock.t = 47.0  # one step that took 22 s: rounds went by; each fragment begins only the latest
    assert s.due(2501) == [(0, 3), (1, 4)]
    assert s.due(2502) == []


def test_a_newcomer_mid_run_begins_with_the_next_round_not_the_past_ones():
    clock = FakeClock(124.0)
    s = ClockSchedule([0, 5], 10, 100, epoch=100.0, round_s=10.0, duration_s=100.0, clock=clock)
    assert s.due(1) == []  # rounds already past belong to the peers that were there
    assert s.next_round(0, 1) == 2 and s.next_round(1, 1) == 2
    clock.t = 126.0
    assert s.due(2) == [(1, 2)]
    clock.t = 200.0
    assert s.finished(3) and s.lr_step(3) == 100


def _rounds_of_a_peer(schedule, clock, due_times, noticed_at):
    """The (fragment, round) syncs a peer begins, as streaming.py does: due() after each step, then
    at the end every fragment's final round unless it began that very round at its last step."""
    sent, due = [], {}
    for t in due_times:
        clock.t = t
        due = dict(schedule.due(0))
        sent += sorted(due.items())
    last_due = due if noticed_at == due_times[-1] else {}  # the end noticed right after a step, or later
    clock.t = noticed_at
    assert schedule.finished(0)
    late = dict(schedule.due(0))  # send_final asks once more: rounds due since the last step
    sent += sorted(late.items())
    last_due = {**last_due, **late}
    for f in range(len(schedule.frac)):
        last = schedule.final_round(f, 0)
        if last_due.get(f) != last:
            sent.append((f, last))
    return sent


@pytest.mark.parametrize("duration", [100.0, 103.0, 104.6])
@pytest.mark.parametrize("offsets,H", [([0], 10), ([0, 15], 30), ([0, 10, 20], 30), ([0, 7], 30)])
def test_peers_that_notice_the_end_at_different_moments_begin_the_same_rounds(offsets, H, duration):
    """Peers of different speeds call due() at different moments and notice the end after a step,
    or later (after an evaluation or a catch-up, with no due() in between). Every one of them must
    begin the same rounds near the end, the final ones included, or some average their last Δ
    alone and the run ends with more than one global model. (It did: a round due between a
    peer's last due() and the end was sent by the others and skipped by it.)"""
    W, epoch, end = 10.0, 0.0, duration
    n = int(end) + 5
    peers = {  # name: (due() times, when the end is noticed; None: right after the first step past it)
        "steady": ([t + 0.05 for t in range(n)], None),
        "just_before": (sorted([t - 0.0001 for t in range(1, n)] + [end - 0.0001, end + 0.2]), None),
        "slow": ([2.7 * t for t in range(1, n)], None),
        "evaluating": ([t + 0.5 for t in range(int(end) - 2)], end + 0.8),
    }
    seen = {}
    for name, (times, noticed) in peers.items():
        clock = FakeClock(epoch)
        s = ClockSchedule(offsets, H, 1000, epoch, W, duration, clock)
        times = [t for t in times if t < end] + [t for t in times if t >= end][:1]  # steps stop at the end
        noticed = noticed if noticed is not None else times[-1]
        seen[name] = {fr for fr in _rounds_of_a_peer(s, clock, times, noticed) if fr[1] >= duration / W - 3}
    assert all(v == seen["steady"] for v in seen.values()), seen


def test_the_final_round_at_a_steady_pace_is_the_step_schedules():
    """Both schedules end by beginning the same round of every fragment with the last step."""
    offsets, H, W = sync_offsets(3, 30), 30, 6.0
    clock = FakeClock(0.0)
    steps, timed = StepSchedule(offsets, H, 4 * H), ClockSchedule(offsets, H, 4 * H, 0.0, W, 4 * W, clock)
    for step in range(1, 4 * H + 1):
        clock.t = step * W / H
        timed_due = dict(timed.due(step))
    step_due = dict(steps.due(4 * H))
    for f in range(3):
        assert timed_due.get(f, timed.final_round(f, 4 * H)) == step_due.get(f, steps.final_round(f, 4 * H))
        assert steps.final_round(f, 4 * H) == step_due.get(f, steps.next_round(f, 4 * H))
