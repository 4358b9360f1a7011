"""Overlap sized to the link (overlap.py, `--tau auto`): the policy as pure functions, and the
engine sending each round with the τ the policy gives for what it measured."""
import math
import time
from concurrent.futures import Future

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdiloco.averaging import AverageResult, Averager
from p2pdiloco.config import add_options, sim_config
from p2pdiloco.overlap import OverlapPolicy, StepClock, choose_tau, declare_ahead_steps, quantile, tau_max

latency = st.floats(0.0, 60.0, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(st.lists(latency, max_size=20), st.floats(0.01, 5.0), st.integers(1, 400), st.integers(1, 9))
def test_tau_stays_within_the_engines_bound_and_covers_the_latency_when_it_can(lats, step_s, H, syncs):
    top = tau_max(H, syncs)
    if top < 1:
        return
    policy = OverlapPolicy()
    tau = choose_tau(lats, step_s, H, syncs, policy)
    assert 1 <= tau <= top and tau * syncs < H  # the engine's invariant: one sync in flight at a time
    if not lats:
        assert tau == top  # nothing measured: the safe side
        assert choose_tau(lats, step_s, H, syncs, policy, limit_s=3 * step_s) == min(top, 3)
        return
    q = quantile(lats[-policy.window:], policy.quantile)
    if tau < top:  # not capped: τ steps cover the quantile with the margin, and τ − 1 would not
        assert tau * step_s >= policy.margin * q - 1e-9
        assert tau == 1 or (tau - 1) * step_s < policy.margin * q + 1e-9


@settings(max_examples=60, deadline=None)
@given(st.lists(latency, min_size=1, max_size=20), st.floats(0.01, 5.0), st.floats(1.0, 10.0))
def test_a_slower_link_never_gets_a_smaller_tau(lats, step_s, factor):
    slower = [x * factor for x in lats]
    assert choose_tau(slower, step_s, 300, 3) >= choose_tau(lats, step_s, 300, 3)
    assert choose_tau(lats, step_s / factor, 300, 3) >= choose_tau(lats, step_s, 300, 3)  # faster steps: more of them


def test_the_policy_in_figures():
    # 1.0 s rounds at 0.2 s per step, margin 1.5: 1.5 s = 7.5 steps -> 8; H = 30 with 3 syncs allows 9.
    assert choose_tau([1.0] * 5, 0.2, 30, 3) == 8
    assert choose_tau([5.0] * 5, 0.2, 30, 3) == 9  # the link needs more than H allows: capped
    assert choose_tau([0.01] * 5, 0.2, 30, 3) == 1
    # Only the window's latest rounds count: a slow start is forgotten.
    assert choose_tau([9.0] * 10 + [0.1] * 8, 0.2, 30, 3) == 1
    assert quantile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.9) == 9 and quantile([3.0], 0.9) == 3.0
    assert declare_ahead_steps([0.5, 0.6], 0.2, 30, 3) == math.ceil(1.5 * 0.6 / 0.2)
    assert tau_max(30, 3) == 9 and tau_max(3, 3) == 0
    # A peer may not run further ahead than the averager allows: 2.5 s at 0.5 s a step is 5 steps.
    assert choose_tau([5.0] * 5, 0.5, 30, 3, limit_s=2.5) == 5
    assert choose_tau([], 0.5, 30, 3, limit_s=2.5) == 5 and choose_tau([], 5.0, 30, 3, limit_s=2.5) == 1


def test_policy_and_options_are_checked_with_the_field_named():
    for kwargs, field in [({"margin": 0.5}, "overlap.margin"), ({"quantile": 0}, "overlap.quantile"),
                          ({"window": 0}, "overlap.window")]:
        with pytest.raises(ValueError, match=field):
            OverlapPolicy(**kwargs).validate()
    import argparse
    parser = argparse.ArgumentParser()
    add_options(parser)
    cfg = sim_config(parser.parse_args(["--tau", "auto", "--H", "30", "--fragments", "2"]))
    assert cfg.streaming.tau_auto
    with pytest.raises(SystemExit):
        parser.parse_args(["--tau", "soon"])
    with pytest.raises(ValueError, match="streaming.tau_auto"):
        sim_config(parser.parse_args(["--tau", "auto", "--H", "3", "--fragments", "2"]))
    with pytest.raises(ValueError, match="streaming.tau_auto"):
        sim_config(parser.parse_args(["--tau", "auto", "--mode", "data_parallel"]))


def test_the_step_clock_is_a_median_robust_to_one_slow_step():
    clock = StepClock(keep=5)
    assert clock.step_s == 0.0
    for x in (0.2, 0.2, 5.0, 0.21, 0.19):
        clock.add(x)
    assert clock.step_s == 0.2


class _LinkAverager(Averager):
    """Every average lands `delay_s` after it is handed in: the mean is the member's own Δ."""

    def __init__(self, delay_s: float):
        self.delay_s, self.ahead_calls = delay_s, []

    def submit(self, key, encoded, weight):
        import threading
        future: Future = Future()
        mean = encoded.decode()
        threading.Timer(self.delay_s, future.set_result, [AverageResult(mean, ("me",), weight)]).start()
        return future

    def ahead(self, key, steps, step_s, ceiling):
        self.ahead_calls.append((key, steps, ceiling))


def test_the_engine_sends_with_the_tau_the_measurements_call_for(text_file, small_corpus):
    """A worker on a link whose rounds take 0.3 s: the first round goes with τ_max, the later
    ones with the policy's τ for 0.3 s at the measured step time; rounds due soon are announced."""
    from p2pdiloco.data import ShardSampler
    from p2pdiloco.inner import InnerConfig, InnerOptimizer
    from p2pdiloco.outer import OuterConfig
    from p2pdiloco.streaming import StreamingConfig, Worker
    from p2pdiloco.models import build_model

    model = build_model("micro", seed=0, vocab_size=256)
    cfg = StreamingConfig(H=16, fragments=1, tau_auto=True, codec="e3m0", alpha=0.5)
    link = _LinkAverager(0.3)
    w = Worker("w", model, InnerOptimizer(model, InnerConfig(lr=1e-3, warmup_steps=1), 64), cfg, OuterConfig(), link)
    sampler = ShardSampler(small_corpus, 0, 1, 2)
    assert w.tau == tau_max(16, 1) == 15
    for _ in range(64):
        w.forward_backward(*sampler.next())
        w.optimizer_step()
        time.sleep(0.05)  # a step of at least 0.05 s: τ for 0.3 s rounds is then ≤ 9
        w.send_due()
        w.apply_due()
    w.flush()
    sent = [r for r in w.round_log if not r["final"]]
    assert len(sent) == 4 and all(r["ok"] for r in sent)
    assert sent[0]["tau"] == 15
    assert all(0.3 <= r["latency_s"] < 1.5 for r in sent)
    for r in sent[1:]:  # chosen from what was measured before it: τ steps cover 1.5 × the ≥ 0.3 s latency
        assert r["tau"] < 15 and r["tau"] * r["step_s"] >= 1.5 * 0.3, r
    announced = {(k.index, k.round) for k, steps, ceiling in link.ahead_calls}
    assert {(0, r["round"]) for r in sent[1:]} <= announced  # each round was announced before it came due
    assert all(1 <= steps <= ceiling == 15 for _, steps, ceiling in link.ahead_calls)
