"""e3m0-huffman: E3M0's values bit for bit in fewer bytes, and coded payloads that cannot be trusted refused."""
import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from p2pdiloco.averaging import weighted_mean
from p2pdiloco.codecs import HEADER_BYTES, CodecError, Encoded, from_bytes, get_codec

HUFF, E3M0 = get_codec("e3m0-huffman"), get_codec("e3m0")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 5000), st.integers(0, 2**31 - 1), st.sampled_from(["normal", "laplace", "sparse"]))
def test_same_values_as_e3m0_and_exact_byte_count(n, seed, kind):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if kind == "laplace":
        x = x.sign() * torch.empty(n).exponential_(generator=g)
    elif kind == "sparse":
        x = x * (torch.rand(n, generator=g) < 0.05)
    enc = HUFF.encode(x)
    payload = enc.to_bytes()
    assert len(payload) == enc.nbytes <= HUFF.nbytes(n)
    back = from_bytes(payload)
    assert back.codec is HUFF and torch.equal(back.decode(), E3M0.encode(x).decode())
    assert torch.equal(back.values, E3M0.encode(x).values)


def test_codes_take_about_their_entropy():
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    plain, coded = E3M0.encode(x), HUFF.encode(x)
    codes = torch.stack([plain.values & 15, plain.values >> 4], 1).reshape(-1).long()
    p = torch.bincount(codes, minlength=16).double() / codes.numel()
    entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())  # bits per value
    bits = 8 * HUFF.wire_values_nbytes(coded) / x.numel()
    assert 3.3 < entropy < 3.6  # a Gaussian's codes: far from the 4 bits E3M0 spends
    assert entropy <= bits <= entropy * 1.01
    assert coded.nbytes < 0.9 * plain.nbytes


def test_values_that_do_not_compress_stay_within_the_bound():
    n = 300_000
    noise = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    enc = Encoded(HUFF, n, torch.full((-(-n // HUFF.block),), 127, dtype=torch.uint8), noise)
    payload = enc.to_bytes()
    assert len(payload) <= HUFF.nbytes(n)
    assert torch.equal(from_bytes(payload).values, noise)


def test_slices_are_coded_on_their_own():
    x = torch.randn(10_000)
    enc = HUFF.encode(x)
    part = enc.slice(2048, 7000)
    assert torch.equal(from_bytes(part.to_bytes()).decode(), enc.decode()[2048:7000])
    assert part.nbytes < enc.nbytes


def test_fused_mean_is_e3m0s_bit_for_bit():
    xs = [torch.randn(5000) for _ in range(3)]
    ws = [1.0, 3.0, 2.0]
    ours = weighted_mean([(from_bytes(HUFF.encode(x).to_bytes()), w) for x, w in zip(xs, ws)])
    assert torch.equal(ours, weighted_mean([(E3M0.encode(x), w) for x, w in zip(xs, ws)]))


def _payload(numel: int, scales: bytes, coded: bytes) -> bytes:
    return HUFF.encode(torch.zeros(numel)).header() + scales + coded


def _deflate(data: bytes, strategy: int = zlib.Z_DEFAULT_STRATEGY) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9, strategy)
    return packer.compress(data) + packer.flush()


def _huffman(n: int) -> bytes:
    """A Huffman-only stream of n random bytes of 2 bits each, as an honest sender codes them."""
    return _deflate(bytes(torch.randint(0, 4, (n,), dtype=torch.uint8).tolist()), zlib.Z_HUFFMAN_ONLY)


def test_untrustworthy_payloads_are_refused():
    good = HUFF.encode(torch.randn(3000)).to_bytes()
    with pytest.raises(CodecError, match="corrupt|exactly"):
        from_bytes(good[:-3])  # the stream ends early
    with pytest.raises(CodecError, match="exactly"):
        from_bytes(good + b"\0")  # bytes after the stream's end
    corrupt = bytearray(good)
    corrupt[HEADER_BYTES + 3] ^= 0xFF  # the first byte of the coded values (3 scales before it)
    corrupt[HEADER_BYTES + 4] ^= 0xFF
    with pytest.raises(CodecError):
        from_bytes(bytes(corrupt))
    # A stream with LZ77 matches (which Huffman coding never writes) expands ~1000:1: refused before
    # decoding, whatever element count its header claims.
    bomb = _deflate(bytes(1_000_000))
    assert len(bomb) < 1500
    with pytest.raises(CodecError, match="at least"):
        from_bytes(_payload(2_000_000, bytes(-(-2_000_000 // 1024)), bomb))
    huge = HUFF.encode(torch.zeros(0)).header()[:4] + (2**32 - 1).to_bytes(4, "little")
    with pytest.raises(CodecError, match="at least"):
        from_bytes(huge + bytes(-(-(2**32 - 1) // 1024)) + _deflate(bytes(16 << 20)))
    with pytest.raises(CodecError, match="exactly"):
        from_bytes(_payload(3000, bytes(3), _huffman(2000)))  # 500 bytes too many
    with pytest.raises(CodecError, match="exactly"):
        from_bytes(_payload(3000, bytes(3), _huffman(1000)))  # 500 bytes too few
    with pytest.raises(CodecError, match="must be"):
        from_bytes(_payload(3000, bytes(2), b""))  # not even the scales
    with pytest.raises(CodecError, match="must be"):
        from_bytes(_payload(3000, bytes(3), bytes(HUFF.nbytes(3000))))  # longer than any coding of 3000 values
    with pytest.raises(CodecError, match="empty"):
        from_bytes(_payload(0, b"", b"\x03\x00"))
