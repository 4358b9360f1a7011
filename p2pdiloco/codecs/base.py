"""What every codec shares: the `Encoded` payload (an 8-byte header, per-block scales, the packed
values), the `Codec` interface with slicing and parsing, and `CodecError` for malformed payloads.

`len(enc.to_bytes())` is exactly what travels, so byte accounting is exact by construction. For
most codecs that size follows from the number of values (`Codec.nbytes`); an entropy-coded codec's
depends on the values too (`Codec.variable_size`), and `Codec.nbytes` is then its upper bound.
Blocks never straddle a span boundary when spans are cut at multiples of `align` (averaging.span_bounds), so a
span of an encoded tensor is sliced out without re-encoding.
"""
from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass, field

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
    # The values as the codec puts them on the wire, where that differs from the packed bytes (an
    # entropy-coded codec): computed once, by whichever thread first needs it.
    wire_cache: list = field(default_factory=list, compare=False, repr=False)

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, device: torch.device | str) -> Encoded:
        """The same payload with its tensors on `device`: only the encoded bytes move (a codec encodes
        and decodes on the training device; the wire needs them on the host). Itself if already there."""
        device = torch.device(device)
        if self.values.device == device and self.scales.device == device:
            return self
        return Encoded(self.codec, self.numel, self.scales.to(device), self.values.to(device))

    @property
    def nbytes(self) -> int:
        return HEADER_BYTES + self.scales.numel() * self.scales.element_size() + self.codec.wire_values_nbytes(self)

    def header(self) -> bytes:
        return HEADER.pack(self.codec.codec_id, self.codec.block.bit_length() - 1, 0, self.numel)

    def pieces(self) -> list:
        """`to_bytes()` as buffers to join or to write one after the other, without copying the
        tensors: the header, then views of the scales and of the values as they travel."""
        body = [memoryview(self.scales.contiguous().view(torch.uint8).numpy()), self.codec.wire_values(self)]
        return [self.header()] + [b for b in body if len(b)]

    def to_bytes(self) -> bytes:
        return b"".join(self.pieces())

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

    def decode_into(self, enc: Encoded, out: torch.Tensor) -> torch.Tensor:
        """decode(enc) written into out (fp32, enc.numel values)."""
        return out.copy_(self.decode(enc))

    # True where no payload of the right length decodes to NaN or ±inf, so there is nothing to check.
    decodes_finite = False
    # True where a payload's size depends on the values (entropy coding): nbytes(numel) is then an
    # upper bound, and only Encoded.nbytes says what one payload costs.
    variable_size = False

    def wire_values(self, enc: Encoded):
        """enc's packed values as they travel (a buffer)."""
        return memoryview(enc.values.contiguous().numpy())

    def wire_values_nbytes(self, enc: Encoded) -> int:
        return enc.values.numel()

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

    def from_bytes(self, payload: bytes | memoryview, numel: int, copy: bool = True) -> Encoded:
        """The payload after its header, as an Encoded of numel values. copy=False: the tensors view
        `payload`, which must then never be written to while they live (a received message)."""
        expected = self.nbytes(numel) - HEADER_BYTES
        if len(payload) != expected:
            raise CodecError(f"{self.name} payload of {numel} values must be {expected} bytes, got {len(payload)}")
        if not expected:
            raw = torch.empty(0, dtype=torch.uint8)
        elif copy:
            raw = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        else:
            with warnings.catch_warnings():  # a read-only buffer: torch warns, and nothing writes to it
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.frombuffer(payload, dtype=torch.uint8)
        nscale = (expected - -(-numel * self.bits // 8))
        scales = raw[:nscale].view(self.scale_dtype) if nscale else torch.empty(0, dtype=self.scale_dtype)
        return Encoded(self, numel, scales, raw[nscale:])

    scale_dtype = torch.uint8


def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    x = x.detach().float().reshape(-1)
    n = x.numel()
    pad = -n % block
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, block), n
