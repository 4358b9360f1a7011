"""Spans, the owner's reduction, and the in-process reduce-scatter / all-gather."""
import pytest
import torch
from hypothesis import given, strategies as st

from p2pdiloco.averaging import InProcessAverager, SyncKey, member_bytes, span_bounds, weighted_mean
from p2pdiloco.codecs import get_codec


@given(st.integers(0, 100_000), st.integers(1, 16), st.sampled_from([1, 2, 256, 1024]))
def test_spans_cover_and_align(numel, parts, align):
    spans = span_bounds(numel, parts, align)
    assert len(spans) == parts
    assert spans[0][0] == 0 and spans[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(lo <= hi for lo, hi in spans)
    assert all(lo % align == 0 for lo, _ in spans)


def test_weighted_mean_is_token_weighted():
    fp32 = get_codec("fp32")
    parts = [(fp32.encode(torch.tensor([1.0, 0.0])), 3.0), (fp32.encode(torch.tensor([5.0, 4.0])), 1.0)]
    assert weighted_mean(parts).tolist() == [2.0, 1.0]
    with pytest.raises(ValueError):
        weighted_mean([(fp32.encode(torch.zeros(2)), 0.0)])


def _run(codec_name, vectors, weights):
    names = [f"w{i}" for i in range(len(vectors))]
    avg = InProcessAverager(names)
    codec = get_codec(codec_name)
    futures = [avg.member(n).submit(SyncKey("fragment", 0, 0), codec.encode(v), w)
               for n, v, w in zip(names, vectors, weights)]
    return [f.result(timeout=1) for f in futures]


def test_fp32_average_is_exact_and_identical():
    g = torch.Generator().manual_seed(1)
    vectors = [torch.randn(3001, generator=g) for _ in range(4)]
    results = _run("fp32", vectors, [1.0, 1.0, 2.0, 4.0])
    expected = (vectors[0] + vectors[1] + 2 * vectors[2] + 4 * vectors[3]) / 8
    for r in results:
        assert torch.allclose(r.mean, expected, atol=1e-6)
        assert torch.equal(r.mean, results[0].mean)
        assert r.participants == ("w0", "w1", "w2", "w3") and r.total_weight == 8.0


def test_e3m0_average_within_codec_error_and_bytes_exact():
    g = torch.Generator().manual_seed(2)
    vectors = [torch.randn(8192, generator=g) for _ in range(4)]
    results = _run("e3m0", vectors, [1.0] * 4)
    exact = torch.stack(vectors).mean(0)
    assert all(torch.equal(r.mean, results[0].mean) for r in results)
    rel = (results[0].mean - exact).norm() / exact.norm()
    assert rel < 0.35  # two 4-bit quantizations (parts, then the mean)
    codec = get_codec("e3m0")
    span = 8192 // 4  # 2 blocks of 1024 per owner: each member sends 3 parts and 3 copies of its mean
    for i, r in enumerate(results):
        assert r.bytes_sent == 6 * codec.nbytes(span) == member_bytes(codec, 8192, 4, i)


def test_member_bytes_matches_the_averager_for_uneven_spans():
    vectors = [torch.randn(5000) for _ in range(3)]
    for name in ("e3m0", "int8", "bf16"):
        results = _run(name, vectors, [1.0] * 3)
        assert [r.bytes_sent for r in results] == [member_bytes(get_codec(name), 5000, 3, i) for i in range(3)]


def test_dropped_member_completes_round_without_it():
    names = ["a", "b", "c"]
    avg = InProcessAverager(names)
    fp32 = get_codec("fp32")
    fa = avg.member("a").submit(SyncKey("fragment", 1, 0), fp32.encode(torch.ones(4)), 1.0)
    fb = avg.member("b").submit(SyncKey("fragment", 1, 0), fp32.encode(torch.zeros(4)), 1.0)
    assert not fa.done()
    avg.drop("c")
    assert fa.result(timeout=1).participants == ("a", "b")
    assert fb.result(timeout=1).mean.tolist() == [0.5] * 4


def test_double_submit_is_an_error():
    avg = InProcessAverager(["a", "b"])
    fp32 = get_codec("fp32")
    avg.member("a").submit(SyncKey("grad", 0, 0), fp32.encode(torch.ones(2)), 1.0)
    with pytest.raises(RuntimeError, match="twice"):
        avg.member("a").submit(SyncKey("grad", 0, 0), fp32.encode(torch.ones(2)), 1.0)


def test_a_round_that_cannot_be_averaged_fails_for_every_member_and_the_next_one_works():
    avg = InProcessAverager(["a", "b"])
    fp32 = get_codec("fp32")
    fa = avg.member("a").submit(SyncKey("fragment", 0, 0), fp32.encode(torch.ones(2)), 0.0)
    fb = avg.member("b").submit(SyncKey("fragment", 0, 0), fp32.encode(torch.ones(2)), 0.0)  # no raise here
    for fut in (fa, fb):
        with pytest.raises(ValueError, match="positive total weight"):
            fut.result(timeout=1)
    fa = avg.member("a").submit(SyncKey("fragment", 0, 1), fp32.encode(torch.ones(2)), 1.0)
    avg.member("b").submit(SyncKey("fragment", 0, 1), fp32.encode(torch.zeros(2)), 1.0)
    assert fa.result(timeout=1).mean.tolist() == [0.5, 0.5]
