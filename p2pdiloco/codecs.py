"""Codecs for everything that crosses the wire: fp32, bf16, fp16, int8 (blockwise absmax), E3M0 4-bit.

An encoded tensor is an `Encoded`: an 8-byte header, per-block scales and the packed values.
`len(enc.to_bytes())` is exactly what travels, so byte accounting is exact by construction.
Decoding always produces fp32 and accumulation happens in fp32 (Streaming DiLoCo, arXiv 2501.18512 §2.3).

E3M0 is a sign bit and a 3-bit exponent with no mantissa: code e=0 is zero, e=1..7 is 2^(S+e-7),
where S is the block's shared power-of-two exponent (one byte, like MX formats' E8M0 scale), chosen
so that the block's absmax ≤ 2^S. Rounding is to the nearest level, so
|x − q(x)| ≤ max(|x|/3, 2^(S−7)) ≤ max(|x|/3, absmax/64). Two codes are packed per byte, low nibble first.

Blocks never straddle a span boundary when spans are cut at multiples of `align` (see spans.py), so a
span of an encoded tensor is sliced out without re-encoding.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

HEADER = struct.Struct("<BBHI")  # codec id, log2(block), reserved, numel
HEADER_BYTES = HEADER.size  # 8


class CodecError(ValueError):
    """A payload that cannot be decoded: wrong length, unknown codec, corrupt scale."""


@dataclass(frozen=True)
class Encoded:
    codec: "Codec"
    numel: int
    scales: torch.Tensor  # per-block scales (dtype per codec), empty for plain casts
    values: torch.Tensor  # uint8 bytes of the packed values

    @property
    def nbytes(self) -> int:
        return HEADER_BYTES + self.scales.numel() * self.scales.element_size() + self.values.numel()

    def to_bytes(self) -> bytes:
        head = HEADER.pack(self.codec.codec_id, self.codec.block.bit_length() - 1, 0, self.numel)
        return head + self.scales.numpy().tobytes() + self.values.numpy().tobytes()

    def decode(self) -> torch.Tensor:
        return self.codec.decode(self)

    def slice(self, start: int, end: int) -> "Encoded":
        """Elements [start, end) as their own payload; start must sit on a block boundary."""
        return self.codec.slice(self, start, end)


class Codec:
    name: str
    codec_id: int
    block: int = 1  # elements that share a scale (1: no scales)
    bits: int = 32

    def encode(self, x: torch.Tensor) -> Encoded:
        raise NotImplementedError

    def decode(self, enc: Encoded) -> torch.Tensor:
        raise NotImplementedError

    @property
    def align(self) -> int:
        """Span boundaries must be multiples of this so that slices need no re-encoding."""
        return max(self.block, 2 if self.bits == 4 else 1)

    def nbytes(self, numel: int) -> int:
        blocks = -(-numel // self.block) if self.block > 1 else 0
        return HEADER_BYTES + blocks * self.scale_bytes + -(-numel * self.bits // 8)

    scale_bytes = 0

    def slice(self, enc: Encoded, start: int, end: int) -> Encoded:
        if start % self.align or not 0 <= start <= end <= enc.numel:
            raise ValueError(f"slice [{start}, {end}) of {enc.numel} is not aligned to {self.align}")
        b0, b1 = (start // self.block, -(-end // self.block)) if self.block > 1 else (0, 0)
        v0, v1 = start * self.bits // 8, -(-end * self.bits // 8)
        return Encoded(self, end - start, enc.scales[b0:b1], enc.values[v0:v1])

    def from_bytes(self, payload: bytes | memoryview, numel: int) -> Encoded:
        expected = self.nbytes(numel) - HEADER_BYTES
        if len(payload) != expected:
            raise CodecError(f"{self.name} payload of {numel} values must be {expected} bytes, got {len(payload)}")
        raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if expected else torch.empty(0, dtype=torch.uint8)
        nscale = (expected - -(-numel * self.bits // 8))
        scales = raw[:nscale].view(self.scale_dtype) if nscale else torch.empty(0, dtype=self.scale_dtype)
        return Encoded(self, numel, scales, raw[nscale:])

    scale_dtype = torch.uint8


class CastCodec(Codec):
    """fp32 / bf16 / fp16: a plain cast (fp16 saturates at ±65504 rather than overflow to inf)."""

    def __init__(self, name: str, codec_id: int, dtype: torch.dtype):
        self.name, self.codec_id, self.dtype = name, codec_id, dtype
        self.bits = torch.finfo(dtype).bits

    def encode(self, x: torch.Tensor) -> Encoded:
        x = x.detach().float().reshape(-1)
        if self.dtype == torch.float16:
            x = x.clamp(-65504.0, 65504.0)
        values = x.to(self.dtype).contiguous().view(torch.uint8)
        return Encoded(self, x.numel(), torch.empty(0, dtype=torch.uint8), values.cpu())

    def decode(self, enc: Encoded) -> torch.Tensor:
        return enc.values.view(self.dtype).float()


class Int8Codec(Codec):
    """Blockwise absmax int8: q = round(x · 127 / absmax); |x − q| ≤ absmax / 254."""

    bits, scale_bytes, scale_dtype = 8, 4, torch.float32

    def __init__(self, block: int = 256):
        self.name, self.codec_id, self.block = "int8", 4, block

    def encode(self, x: torch.Tensor) -> Encoded:
        blocks, n = _blocks(x, self.block)
        scale = blocks.abs().amax(dim=1) / 127.0
        q = torch.round(blocks / scale.clamp_min(1e-38)[:, None]).clamp(-127, 127).to(torch.int8)
        return Encoded(self, n, scale.cpu(), q.reshape(-1)[:n].view(torch.uint8).cpu())

    def decode(self, enc: Encoded) -> torch.Tensor:
        if not torch.isfinite(enc.scales).all():
            raise CodecError("int8 payload has a non-finite scale")
        q = enc.values.view(torch.int8).float()
        return q * enc.scales.repeat_interleave(self.block)[: enc.numel]


class E3M0Codec(Codec):
    """4-bit E3M0 with a shared power-of-two (E8M0) exponent per block."""

    bits, scale_bytes, scale_dtype = 4, 1, torch.uint8
    BIAS = 127

    def __init__(self, block: int = 1024):
        self.name, self.codec_id, self.block = "e3m0", 5, block

    def encode(self, x: torch.Tensor) -> Encoded:
        blocks, n = _blocks(x, self.block)
        amax = blocks.abs().amax(dim=1)
        # Smallest S with absmax ≤ 2^S; all-zero blocks get the smallest exponent (their codes are 0).
        _, exp = torch.frexp(amax)
        exact = amax == torch.ldexp(torch.full_like(amax, 0.5), exp)
        shared = torch.where(exact, exp - 1, exp).clamp(-self.BIAS, self.BIAS)
        shared = torch.where(amax > 0, shared, torch.full_like(shared, -self.BIAS))
        y = torch.ldexp(blocks.abs(), -shared[:, None])  # in [0, 1]
        mant, e = torch.frexp(y)  # y = mant · 2^e, mant in [0.5, 1)
        level = e - 1 + (mant >= 0.75).to(e.dtype)  # nearest power of two, as an exponent ≤ 0
        code = torch.where(y >= 2.0 ** -7, (level + 7).clamp(1, 7), torch.zeros_like(level))
        code = code.to(torch.uint8) | (blocks < 0).to(torch.uint8) << 3
        code = code.reshape(-1)[:n]
        if n % 2:
            code = torch.cat([code, code.new_zeros(1)])
        packed = code[0::2] | code[1::2] << 4
        return Encoded(self, n, (shared + self.BIAS).to(torch.uint8).cpu(), packed.cpu())

    def decode(self, enc: Encoded) -> torch.Tensor:
        codes = torch.stack([enc.values & 0xF, enc.values >> 4], dim=1).reshape(-1)[: enc.numel]
        e = (codes & 7).to(torch.int32)
        shared = (enc.scales.to(torch.int32) - self.BIAS).clamp(max=self.BIAS)
        shared = shared.repeat_interleave(self.block)[: enc.numel]
        mag = torch.ldexp(torch.ones(enc.numel), shared + e - 7)
        mag = torch.where(e == 0, torch.zeros_like(mag), mag)
        return torch.where(codes >= 8, -mag, mag)


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    x = x.detach().float().reshape(-1)
    n = x.numel()
    pad = -n % block
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, block), n


CODECS: dict[str, Codec] = {
    "fp32": CastCodec("fp32", 1, torch.float32),
    "bf16": CastCodec("bf16", 2, torch.bfloat16),
    "fp16": CastCodec("fp16", 3, torch.float16),
    "int8": Int8Codec(),
    "e3m0": E3M0Codec(),
}
_BY_ID = {c.codec_id: c for c in CODECS.values()}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"codec '{name}' is unknown; choose one of {', '.join(CODECS)}")
    return CODECS[name]


def from_bytes(payload: bytes) -> Encoded:
    """Parse a wire payload (header included); raises CodecError on anything malformed."""
    if len(payload) < HEADER_BYTES:
        raise CodecError(f"payload of {len(payload)} bytes is shorter than the {HEADER_BYTES}-byte header")
    codec_id, block_log2, _, numel = HEADER.unpack_from(payload)
    codec = _BY_ID.get(codec_id)
    if codec is None:
        raise CodecError(f"payload names unknown codec id {codec_id}")
    if codec.block != 1 << block_log2:
        raise CodecError(f"{codec.name} payload uses block {1 << block_log2}, this peer uses {codec.block}")
    return codec.from_bytes(memoryview(payload)[HEADER_BYTES:], numel)
