"""Codec round-trip error bounds, exact packing and malformed payloads."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from p2pdiloco.codecs import CODECS, HEADER_BYTES, CodecError, E3M0Codec, Encoded, from_bytes, get_codec

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
    assert len(payload) == enc.nbytes
    assert (enc.nbytes <= codec.nbytes(x.numel())) if codec.variable_size else (enc.nbytes == codec.nbytes(x.numel()))
    back = from_bytes(payload)
    assert back.numel == x.numel()
    assert torch.equal(back.decode(), enc.decode())
    assert back.decode().dtype == torch.float32


@settings(max_examples=60, deadline=None)
@given(vectors)
def test_e3m0_error_bound(x):
    codec = get_codec("e3m0")
    q = codec.encode(x).decode()
    # S stops at −127, so a block with absmax below 2^-127 has the bound of absmax 2^-127 (subnormals).
    amax = _blockwise_absmax(x, codec.block).clamp_min(2.0 ** -127)
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
    assert len(part.to_bytes()) == part.nbytes
    assert (part.nbytes <= codec.nbytes(hi - lo)) if codec.variable_size else (part.nbytes == codec.nbytes(hi - lo))
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


# --- E3M0 against the original float formulation, bit for bit ------------------------------------

def _reference_e3m0_encode(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The E3M0 encoder as first written (frexp/ldexp per value): (scales, packed values)."""
    x = x.detach().float().reshape(-1)
    n = x.numel()
    pad = -n % block
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    blocks = x.view(-1, block)
    amax = blocks.abs().amax(dim=1)
    _, exp = torch.frexp(amax)
    exact = amax == torch.ldexp(torch.full_like(amax, 0.5), exp)
    shared = torch.where(exact, exp - 1, exp).clamp(-127, 127)
    shared = torch.where(amax > 0, shared, torch.full_like(shared, -127))
    y = torch.ldexp(blocks.abs(), -shared[:, None])
    mant, e = torch.frexp(y)
    level = e - 1 + (mant >= 0.75).to(e.dtype)
    code = torch.where(y >= 2.0 ** -7, (level + 7).clamp(1, 7), torch.zeros_like(level))
    code = code.to(torch.uint8) | (blocks < 0).to(torch.uint8) << 3
    code = code.reshape(-1)[:n]
    if n % 2:
        code = torch.cat([code, code.new_zeros(1)])
    packed = code[0::2] | code[1::2] << 4
    return (shared + 127).to(torch.uint8), packed


def _reference_e3m0_decode(scales: torch.Tensor, values: torch.Tensor, numel: int, block: int) -> torch.Tensor:
    codes = torch.stack([values & 0xF, values >> 4], dim=1).reshape(-1)[:numel]
    e = (codes & 7).to(torch.int32)
    shared = (scales.to(torch.int32) - 127).clamp(max=127)
    shared = shared.repeat_interleave(block)[:numel]
    mag = torch.ldexp(torch.ones(numel), shared + e - 7)
    mag = torch.where(e == 0, torch.zeros_like(mag), mag)
    return torch.where(codes >= 8, -mag, mag)


def _same_floats(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))  # −0.0 ≠ +0.0, NaN == NaN


def _assert_matches_reference(codec: E3M0Codec, x: torch.Tensor) -> None:
    enc = codec.encode(x)
    scales, values = _reference_e3m0_encode(x, codec.block)
    assert enc.numel == x.numel()
    assert enc.scales.dtype == enc.values.dtype == torch.uint8
    assert torch.equal(enc.scales, scales), (enc.scales, scales)
    assert torch.equal(enc.values, values), (enc.values, values)
    assert _same_floats(enc.decode(), _reference_e3m0_decode(scales, values, x.numel(), codec.block))


def _from_bits(bits: list[int]) -> torch.Tensor:
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)


def _codec(block: int, chunk: int) -> E3M0Codec:
    codec = E3M0Codec(block=block)
    codec.CHUNK = chunk  # small chunks put chunk boundaries and the padded tail inside small tensors
    return codec


# Mantissas at and around the rounding points: 0 (a power of two), 0x400000 (1.5·2^k, halfway
# between levels), their neighbours, the largest one, or anything.
_mantissas = st.one_of(st.sampled_from([0, 1, 0x3FFFFF, 0x400000, 0x400001, 0x7FFFFF]),
                       st.integers(0, 0x7FFFFF))


@st.composite
def _edgy_tensors(draw, max_size=300):
    """fp32 values built from bits: a base exponent per tensor (anywhere from subnormal to huge) and
    per value an exponent a little below it (so values straddle 2^-7 of the block scale), or zero,
    −0.0, a subnormal, the largest float; mantissas at the rounding points."""
    base = draw(st.one_of(st.integers(0, 254), st.sampled_from([0, 1, 7, 8, 9, 10, 126, 127, 253, 254])))
    below = st.one_of(st.integers(0, 10), st.integers(0, 40))
    value = st.one_of(
        st.tuples(st.booleans(), below.map(lambda d: max(base - d, 0)), _mantissas),
        st.tuples(st.booleans(), st.just(0), _mantissas),  # zero and subnormals
        st.tuples(st.booleans(), st.integers(0, 254), _mantissas),
        st.sampled_from([(True, 0, 0), (False, 254, 0x7FFFFF), (True, 254, 0x7FFFFF)]),
    )
    vals = draw(st.lists(value, max_size=max_size))
    return _from_bits([sign << 31 | exp << 23 | mant for sign, exp, mant in vals])


@settings(max_examples=300, deadline=None)
@given(_edgy_tensors(), st.sampled_from([1, 2, 4, 8, 32]), st.sampled_from([1, 8, 64, 1 << 16]))
def test_e3m0_matches_reference_on_edge_values(x, block, chunk):
    _assert_matches_reference(_codec(block, chunk), x)


@settings(max_examples=40, deadline=None)
@given(_edgy_tensors(max_size=3000), st.sampled_from([256, 1024]))
def test_e3m0_matches_reference_default_block(x, chunk):
    _assert_matches_reference(_codec(1024, chunk), x)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), max_size=200),
       st.sampled_from([1, 4, 16]))
def test_e3m0_matches_reference_on_any_finite_floats(v, block):
    _assert_matches_reference(_codec(block, 32), torch.tensor(v, dtype=torch.float32))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20), _mantissas, st.lists(st.tuples(st.booleans(), st.integers(0, 0x7FFFFF)), min_size=1, max_size=7),
       st.booleans(), st.sampled_from([2, 4, 8]))
def test_e3m0_matches_reference_near_the_subnormal_cutoff(exp, mant, subnormals, negative, block):
    # A block absmax around 2^-120 puts subnormal values right at the code-0/code-1 boundary (2^-7 of the scale).
    head = [negative << 31 | exp << 23 | mant]
    _assert_matches_reference(_codec(block, 8), _from_bits(head + [s << 31 | m for s, m in subnormals]))


@pytest.mark.parametrize("block,chunk", [(1, 4), (2, 4), (8, 16), (1024, 1 << 16)])
def test_e3m0_matches_reference_explicit_edges(block, chunk):
    codec = _codec(block, chunk)
    tiny = 2.0 ** -149
    edges = [
        [0.0] * 9,                                          # all zero, odd length
        [-0.0, 0.0, -0.0, 1.0, -0.0],                        # negative zero codes as +0
        [2.0 ** k for k in range(-10, 11)],                  # exact powers of two
        [0.75 * 2.0 ** k for k in range(-12, 3)],            # halfway between levels: rounds up
        [1.0, 2.0 ** -7, -(2.0 ** -7), 2.0 ** -7 * 0.99, -(2.0 ** -7 * 0.99), 1.5 * 2.0 ** -7, 2.0 ** -8, -1e-20],
        [1.0, tiny, -tiny, 1e-39, -1e-39, 2.0 ** -126],      # subnormal inputs in a normal block
        [tiny, -tiny, 3 * tiny, 1e-40, -5e-39, 0.0],          # blocks whose absmax is subnormal
        [2.0 ** -119, 2.0 ** -126, 2.0 ** -127, 2.0 ** -125 * 1.5, 2.0 ** -120 * 1.1, 1e-38],
        [2.0 ** -120, 2.0 ** -126, 2.0 ** -127, 2.0 ** -126 * 1.5, 1e-39],
        [3.4e38, -3.4028235e38, 2.0 ** 127, 1.0, 1e30],      # S clamps at 127
        [2.0 ** 127, -(2.0 ** 126), 1.7e38, 2.0 ** 120],
        [1.5 * 2.0 ** 127, 2.0 ** 121, 1.5 * 2.0 ** 120, 2.0 ** 119],
    ]
    for vals in edges:
        for x in (torch.tensor(vals), -torch.tensor(vals), torch.tensor(vals[::-1])):
            _assert_matches_reference(codec, x)
    _assert_matches_reference(codec, torch.empty(0))
    _assert_matches_reference(codec, torch.tensor(sum(edges, [])))


@pytest.mark.parametrize("block", [1, 8, 1024])
def test_e3m0_non_finite_input_as_before(block):
    # Meaningless but deterministic: the same codes as the float formulation (see E3M0Codec).
    x = torch.tensor([float("nan"), 1.0, -2.0, 3e38, 1e-30, float("inf"), -float("inf"), 0.25, -1e-3])
    for perm in (x, x.flip(0), x[1:], x[5:]):
        _assert_matches_reference(_codec(block, 4), perm)


def test_e3m0_large_tensor_with_odd_blocks_matches_reference():
    torch.manual_seed(0)
    codec = get_codec("e3m0")
    x = torch.randn(3 * codec.CHUNK + 5 * codec.block + 333)
    x[: codec.block] = 0  # an all-zero block
    x[codec.block: 2 * codec.block] *= 1e-38  # subnormal-sized absmax
    x[codec.CHUNK + 7 * codec.block: codec.CHUNK + 8 * codec.block] *= 1e38  # S clamps
    x[2 * codec.CHUNK - 1] = 0.75  # halfway, on a chunk's last value
    x[-100:] *= 1e-30
    _assert_matches_reference(codec, x)
    _assert_matches_reference(codec, x[:-1])
    _assert_matches_reference(codec, x[: codec.CHUNK])


def test_e3m0_decode_matches_reference_for_every_byte_and_scale():
    codec = _codec(512, 1024)
    values = torch.arange(256, dtype=torch.uint8).repeat(256)  # each block holds every byte once
    scales = torch.arange(256, dtype=torch.uint8)  # every scale byte, 255 (S clamps to 127) included
    want = _reference_e3m0_decode(scales, values, 256 * 512, 512)
    assert _same_floats(Encoded(codec, 256 * 512, scales, values).decode(), want)
    for numel in (1, 511, 512 * 3 + 1, 256 * 512 - 1):  # partial last block, odd numel
        enc = Encoded(codec, numel, scales[: -(-numel // 512)], values[: -(-numel // 2)])
        assert _same_floats(enc.decode(), want[:numel])


def test_e3m0_sign_and_rounding_codes():
    codec = E3M0Codec(block=8)
    x = torch.tensor([-0.0, -1e-9, 1.0, -0.75, 0.7499999, 2.0 ** -7, 2.0 ** -7 * 0.999, 1.5 * 2.0 ** -7])
    enc = codec.encode(x)
    codes = torch.stack([enc.values & 0xF, enc.values >> 4], 1).reshape(-1).tolist()
    assert codes == [0, 8, 7, 8 | 7, 6, 1, 0, 1]
    assert _same_floats(enc.decode(), torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, 2.0 ** -6, 0.0, 2.0 ** -6]))


# --- E3M0's fused accumulation (the owner's weighted mean) against decode-then-accumulate ---------

def _decode_then_accumulate(parts):
    """weighted_mean as first written: decode each part, acc.add_(x, alpha=w / total) in order."""
    total = sum(w for _, w in parts)
    acc = torch.zeros(parts[0][0].numel)
    for enc, w in parts:
        acc.add_(enc.decode(), alpha=w / total)
    return acc


@settings(max_examples=150, deadline=None)
@given(st.lists(_edgy_tensors(max_size=200), min_size=1, max_size=5),
       st.lists(st.one_of(st.integers(0, 10 ** 6).map(float), st.floats(0, 1e-30), st.just(0.0)),
                min_size=5, max_size=5),
       st.sampled_from([2, 8, 32]), st.sampled_from([8, 64, 1 << 16]))
def test_e3m0_fused_weighted_mean_is_bit_identical(tensors, weights, block, chunk):
    from p2pdiloco.averaging import weighted_mean
    codec = _codec(block, chunk)
    n = max(t.numel() for t in tensors)
    parts = [(codec.encode(torch.cat([t, t.new_zeros(n - t.numel())])), w) for t, w in zip(tensors, weights)]
    if sum(w for _, w in parts) <= 0:
        parts[0] = (parts[0][0], 1.0)
    want = _decode_then_accumulate(parts)
    assert _same_floats(weighted_mean(parts), want)
    # Into a reused buffer (the owner's pool), whatever it held before: the same sum.
    assert _same_floats(weighted_mean(parts, out=torch.full((n,), float("nan"))), want)


def test_e3m0_fused_path_is_taken_and_exact_on_large_parts():
    from p2pdiloco.averaging import weighted_mean
    torch.manual_seed(1)
    codec = get_codec("e3m0")
    n = 3 * codec.CHUNK + 5 * codec.block + 333  # chunk boundaries, a partial last block, odd numel
    xs = [torch.randn(n) * 10.0 ** k for k in (-3, 0, 2, -20)]
    xs[0][: codec.block] = 0  # an all-zero block (scale 2^-127) does not force the slow path
    xs[1][-5:] = -0.0
    parts = [(codec.encode(x), w) for x, w in zip(xs, (3.0, 1.0, 7.0, 0.0))]
    total = sum(w for _, w in parts)
    assert codec.weighted_sum([(e, w / total) for e, w in parts]) is not None
    assert _same_floats(weighted_mean(parts), _decode_then_accumulate(parts))
    # Values whose weighted products are subnormal: the fused path declines, the result is the same.
    tiny = [(codec.encode(torch.randn(n) * 1e-36), 1.0), (codec.encode(torch.randn(n)), 1e6)]
    assert codec.weighted_sum([(e, w / 1000001.0) for e, w in tiny]) is None
    assert _same_floats(weighted_mean(tiny), _decode_then_accumulate(tiny))


@pytest.mark.parametrize("block", [1, 8, 1024])
def test_e3m0_decode_into_a_slice(block):
    codec = _codec(block, 64)
    x = torch.randn(1001)
    enc = codec.encode(x)
    for lo in (0, 1, 2):  # odd offsets cannot take the int64 view: the copy path
        out = torch.full((1001 + lo + 3,), 7.0)
        codec.decode_into(enc, out[lo: lo + 1001])
        assert _same_floats(out[lo: lo + 1001], enc.decode())
        assert (out[:lo] == 7).all() and (out[lo + 1001:] == 7).all()
