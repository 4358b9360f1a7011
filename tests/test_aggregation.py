"""Robust aggregation (aggregation.py): what a minority of arbitrary parts can do to a span's mean."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdiloco.aggregation import (METHODS, AggregateConfig, aggregate, bound_weights, check_mean, clip_norms,
                                   lower_median, norm)
from p2pdiloco.averaging import InProcessAverager, SyncKey, reduce_parts
from p2pdiloco.codecs import get_codec

ROBUST = [m for m in METHODS if m != "mean"]


def _honest(seed: int, n: int, numel: int) -> list[torch.Tensor]:
    """Parts that agree: a shared direction plus per-member noise of the same size, like replicas' Δ."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(numel, generator=g)
    return [signal + torch.randn(numel, generator=g) for _ in range(n)]


attack = st.sampled_from(["scaled", "huge", "random", "negated", "tiny", "constant"])


def _bad(kind: str, honest: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return {"scaled": honest * 1000, "huge": torch.full_like(honest, 2.0 ** 127) * torch.sign(torch.randn(honest.numel(), generator=g)),
            "random": torch.randn(honest.numel(), generator=g) * 1e6, "negated": -honest * 50,
            "tiny": torch.zeros_like(honest), "constant": torch.full_like(honest, 3e38)}[kind]


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(ROBUST), n_honest=st.integers(2, 7), data=st.data(), seed=st.integers(0, 10_000),
       numel=st.integers(1, 300))
def test_a_minority_of_arbitrary_parts_moves_the_result_a_bounded_amount(method, n_honest, data, seed, numel):
    n_bad = data.draw(st.integers(1, max(1, (n_honest - 1) // 2 + (n_honest == 2))), label="n_bad")
    if n_bad >= n_honest:
        n_bad = n_honest - 1
    honest = _honest(seed, n_honest, numel)
    bad = [_bad(data.draw(attack, label=f"attack{i}"), honest[0], seed + i) for i in range(n_bad)]
    weights = [1000.0] * n_honest + [data.draw(st.sampled_from([0.0, 1.0, 1e3, 1e12]), label=f"w{i}") for i in range(n_bad)]
    cfg = AggregateConfig(method=method)
    out = aggregate(honest + bad, weights, cfg)
    assert all(math.isfinite(v) for v in out.tolist())
    honest_mean = torch.stack(honest).mean(0)
    worst = max(norm(x) for x in honest)
    # Whatever the minority sends, the result stays within a few honest norms of the honest mean.
    assert norm(out - honest_mean) <= 3 * cfg.max_norm_ratio * worst


def test_the_plain_mean_is_moved_without_bound_by_one_part():
    """The property above is not trivially true: the unbounded mean fails it."""
    honest = _honest(0, 3, 100)
    out = aggregate(honest + [honest[0] * 1e6], [1.0] * 4, AggregateConfig(method="mean"))
    assert norm(out - torch.stack(honest).mean(0)) > 1e4 * max(norm(x) for x in honest)


@given(method=st.sampled_from(METHODS), n=st.integers(1, 6), seed=st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_parts_that_all_agree_average_to_themselves(method, n, seed):
    x = torch.randn(64, generator=torch.Generator().manual_seed(seed))
    out = aggregate([x.clone() for _ in range(n)], [float(i + 1) for i in range(n)], AggregateConfig(method=method))
    assert torch.allclose(out, x, atol=1e-6)


def test_robust_methods_stay_close_to_the_mean_of_agreeing_honest_parts():
    """A calm round: every method lands near the plain mean (the cost of robustness when nobody lies)."""
    honest = _honest(1, 4, 10_000)
    mean = torch.stack(honest).mean(0)
    spread = max(norm(x - mean) for x in honest)
    for method in ROBUST:
        out = aggregate(honest, [1.0] * 4, AggregateConfig(method=method))
        assert norm(out - mean) < 0.5 * spread, method


def test_weights_are_bounded_by_the_median():
    assert bound_weights([10.0, 10.0, 10.0, 1e12], 2.0) == [10.0, 10.0, 10.0, 20.0]
    assert bound_weights([0.0, 0.0], 2.0) == [1.0, 1.0]  # nobody trained: a plain mean
    assert bound_weights([0.0, 0.0, 5.0], 2.0) == [0.0, 0.0, 1.0]
    assert lower_median([1.0, 100.0]) == 1.0  # of two, the smaller: in a pair the honest owner's own part bounds


def test_norms_are_clipped_in_fp64_even_for_extreme_values():
    parts = [torch.ones(4), torch.ones(4) * 2, torch.full((4,), 2.0 ** 127)]
    clipped = clip_norms(parts, 2.0)
    assert clipped[0] is parts[0] and clipped[1] is parts[1]
    assert norm(clipped[2]) == pytest.approx(2 * norm(parts[1]), rel=1e-5)


def test_a_member_refuses_a_mean_that_is_not_finite_or_too_large():
    own = torch.ones(10)
    assert check_mean(torch.ones(10) * 3, own, 4.0) is None
    assert "over 4" in check_mean(torch.ones(10) * 5, own, 4.0)
    assert "non-finite" in check_mean(torch.tensor([1.0, float("nan")]), torch.ones(2), 4.0)
    assert "non-finite" in check_mean(torch.tensor([1.0, float("inf")]), torch.ones(2), 0.0)
    assert check_mean(torch.ones(10) * 100, torch.zeros(10), 4.0) is None  # no Δ of its own: finiteness only
    assert check_mean(torch.ones(10) * 100, own, 0.0) is None  # check off


def test_e3m0_parts_with_extreme_scales_reduce_to_finite_values():
    """A payload whose every block exponent is the largest: decoded, clipped, never inf/NaN in the sum."""
    e3m0 = get_codec("e3m0")
    honest = [e3m0.encode(x) for x in _honest(2, 3, 4096)]
    evil = e3m0.encode(torch.randn(4096))
    evil.scales.fill_(254)  # 2^127 per block
    for method in METHODS:
        out = reduce_parts([(p, 100.0) for p in honest] + [(evil, 1e12)], AggregateConfig(method=method))
        assert math.isfinite(norm(out)), method
        if method != "mean":
            assert norm(out) <= 2 * max(norm(p.decode()) for p in honest)


def test_the_in_process_averager_uses_the_configured_method():
    fp32 = get_codec("fp32")
    for method, bounded in (("mean", False), ("centered-clip", True)):
        avg = InProcessAverager(["a", "b", "c", "d"], AggregateConfig(method=method))
        futures = [avg.member(n).submit(SyncKey("fragment", 0, 0), fp32.encode(x), 1.0)
                   for n, x in zip("abc", [torch.ones(8)] * 3)]
        futures.append(avg.member("d").submit(SyncKey("fragment", 0, 0), fp32.encode(torch.ones(8) * 1e6), 1.0))
        mean = futures[0].result(timeout=1).mean
        assert (norm(mean) < 2 * norm(torch.ones(8))) == bounded, method


@pytest.mark.parametrize("field,value", [("method", "median"), ("max_weight_ratio", 0.5), ("max_norm_ratio", 0.0),
                                         ("trim", 0.5), ("iterations", 0), ("check_ratio", 0.5)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"aggregate.{field}"):
        AggregateConfig(**{field: value}).validate()
