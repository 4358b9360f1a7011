"""Codec round-trip error bounds, exact packing and malformed payloads."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from p2pdiloco.codecs import CODECS, HEADER_BYTES, CodecError, E3M0Codec, from_bytes, get_codec

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)
vectors = st.lists(finite, min_size=0, max_size=3000).map(lambda v: torch.tensor(v, dtype=torch.float32))


def _blockwise_absmax(x: torch.Tensor, block: int) -> torch.Tensor:
    pad = -x.numel() % block
    b = torch.cat([x, x.new_zeros(pad)]).view(-1, block).abs().amax(1)
    return b.repeat_interleave(block)[: x.numel()]


@settings(max_examples=60, deadline=None)
@given(vectors, st.sampled_from(sorted(CODECS)))
def test_exact_size_and_wire_roundtrip(x, name):
    codec = get_codec(name)
    enc = codec.encode(x)
    payload = enc.to_bytes()
    assert len(payload) == enc.nbytes == codec.nbytes(x.numel())
    back = from_bytes(payload)
    assert back.numel == x.numel()
    assert torch.equal(back.decode(), enc.decode())
    assert back.decode().dtype == torch.float32


@settings(max_examples=60, deadline=None)
@given(vectors)
def test_e3m0_error_bound(x):
    codec = get_codec("e3m0")
    q = codec.encode(x).decode()
    amax = _blockwise_absmax(x, codec.block)
    bound = torch.maximum(x.abs() / 3, amax / 64)
    assert (torch.abs(x - q) <= bound * (1 + 1e-6)).all()
    assert (torch.sign(q) * torch.sign(x) >= 0).all()  # never flips a sign


@settings(max_examples=60, deadline=None)
@given(vectors)
def test_int8_error_bound(x):
    codec = get_codec("int8")
    q = codec.encode(x).decode()
    amax = _blockwise_absmax(x, codec.block)
    assert (torch.abs(x - q) <= amax / 254 * (1 + 1e-5) + 1e-30).all()


@settings(max_examples=40, deadline=None)
@given(vectors)
def test_float_casts(x):
    assert torch.equal(get_codec("fp32").encode(x).decode(), x)
    for name, rel in (("bf16", 2 ** -8), ("fp16", 2 ** -11)):
        q = get_codec(name).encode(x).decode()
        assert (torch.abs(x - q) <= x.abs() * rel + 1e-7).all()


def test_e3m0_levels_and_packing():
    codec = E3M0Codec(block=8)
    x = torch.tensor([1.0, 0.75, 0.74, -0.5, 0.0, 2 ** -6, 2 ** -7, 2 ** -7 * 0.99])
    assert codec.encode(x).decode().tolist() == [1.0, 1.0, 0.5, -0.5, 0.0, 2 ** -6, 2 ** -6, 0.0]
    enc = codec.encode(torch.randn(1001))
    assert enc.values.numel() == 501 and enc.scales.numel() == math.ceil(1001 / 8)
    assert codec.nbytes(1001) == HEADER_BYTES + 126 + 501


def test_e3m0_zero_and_huge_blocks():
    codec = get_codec("e3m0")
    assert torch.equal(codec.encode(torch.zeros(5000)).decode(), torch.zeros(5000))
    big = torch.tensor([3e38, -1e38, 1.0])
    assert torch.isfinite(codec.encode(big).decode()).all()


@pytest.mark.parametrize("name", sorted(CODECS))
def test_slice_needs_no_reencoding(name):
    codec = get_codec(name)
    x = torch.randn(5000)
    enc = codec.encode(x)
    lo, hi = codec.align * 2, 4999
    part = enc.slice(lo, hi)
    assert torch.equal(part.decode(), enc.decode()[lo:hi])
    assert len(part.to_bytes()) == codec.nbytes(hi - lo)
    with pytest.raises(ValueError):
        enc.slice(codec.align + 1, hi) if codec.align > 1 else enc.slice(10, 5)


def test_malformed_payloads_are_refused():
    good = get_codec("e3m0").encode(torch.randn(100)).to_bytes()
    with pytest.raises(CodecError, match="shorter than"):
        from_bytes(good[:3])
    with pytest.raises(CodecError, match="must be"):
        from_bytes(good[:-1])
    with pytest.raises(CodecError, match="must be"):
        from_bytes(good + b"\0")
    with pytest.raises(CodecError, match="unknown codec"):
        from_bytes(bytes([99]) + good[1:])
    with pytest.raises(CodecError, match="block"):
        from_bytes(good[:1] + bytes([3]) + good[2:])
    bad_scale = get_codec("int8").encode(torch.randn(10))
    payload = bytearray(bad_scale.to_bytes())
    payload[HEADER_BYTES:HEADER_BYTES + 4] = b"\x00\x00\xc0\x7f"  # NaN scale
    with pytest.raises(CodecError, match="non-finite"):
        from_bytes(bytes(payload)).decode()


def test_unknown_codec_names_the_choices():
    with pytest.raises(ValueError, match="codec 'fp8' is unknown; choose one of"):
        get_codec("fp8")
