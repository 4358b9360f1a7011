"""E3M0 with its codes Huffman-coded on the wire: the same values in fewer bytes (codec "e3m0-huffman").

E3M0's 16 codes are far from equally likely: a pseudo-gradient's values cluster a few powers of two
below their block's maximum, so a code carries about 3.5 bits of information, not 4 (tests and
docs/benchmarks.md measure it). Deflate with Huffman coding only (no LZ77 match search: the codes
have no long repeats worth finding) over the packed bytes, two codes to a byte, takes the payload to
within about 1% of that entropy. It is lossless: decoding, the owner's fused weighted sum and every
result are E3M0's, bit for bit; only the bytes on the wire change, and a payload's size now depends
on its values (`variable_size`).

The price is CPU: zlib's pass over the packed codes (it releases the GIL) on top of E3M0's own
encode and decode. Fewer bytes win where the link, not the CPU, is the bottleneck: a WAN, not
loopback (docs/benchmarks.md measures both).

Received payloads are checked before anything is trusted, the element count in their header
included (it is the sender's word): the coded values must take at least an eighth of the packed
length (Huffman coding spends at least a bit per byte; deflate's LZ77 matches, which an honest
sender never uses, could expand 1000:1) and at most deflate's worst case for it, must decode to
exactly the packed length (decoding stops there) and must end where the payload ends. So a payload
decodes to at most 8× its own size, and messages are bounded by --max-message-mb.
"""
from __future__ import annotations

import warnings
import zlib

import torch

from .base import HEADER_BYTES, CodecError, Encoded
from .e3m0 import E3M0Codec

_RAW_DEFLATE = -15  # window bits: a bare deflate stream, no zlib header or checksum (the transport checks)


def _packed_bytes(numel: int) -> int:
    return -(-numel // 2)


def deflate_bound(n: int) -> int:
    """An upper bound on a Huffman-only deflate stream of n bytes: stored blocks cost 5 bytes per
    64 KiB and a dynamic block is chosen only when it is smaller, so this is generous."""
    return n + (n >> 5) + (n >> 7) + 64


def _huffman_code(values: torch.Tensor) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, _RAW_DEFLATE, 9, zlib.Z_HUFFMAN_ONLY)
    return packer.compress(memoryview(values.contiguous().numpy())) + packer.flush()


class E3M0HuffmanCodec(E3M0Codec):
    """Encodes as E3M0; the codes are Huffman-coded when a payload is first asked for its bytes
    (`Encoded.pieces()`, `nbytes`), so that only what is sent is coded: the spans of a vector,
    not the whole."""

    variable_size = True

    def __init__(self, block: int = 1024):
        super().__init__(block)
        self.name, self.codec_id = "e3m0-huffman", 6

    def wire_values(self, enc: Encoded):
        if not enc.wire_cache:
            enc.wire_cache.append(_huffman_code(enc.values) if enc.values.numel() else b"")
        return enc.wire_cache[0]

    def wire_values_nbytes(self, enc: Encoded) -> int:
        return len(self.wire_values(enc))

    def nbytes(self, numel: int) -> int:
        """The most a payload of numel values can take (values that do not compress at all)."""
        return HEADER_BYTES + -(-numel // self.block) * self.scale_bytes + deflate_bound(_packed_bytes(numel))

    def from_bytes(self, payload: bytes | memoryview, numel: int, copy: bool = True) -> Encoded:
        """As E3M0's; the tensors never view `payload` (the values are decoded into a buffer of their own)."""
        nscale, packed = -(-numel // self.block), _packed_bytes(numel)
        body = memoryview(payload)
        if not numel:
            if len(body):
                raise CodecError(f"{self.name} payload of 0 values must be empty, got {len(body)} bytes")
            return Encoded(self, 0, torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8))
        if not nscale <= len(body) <= self.nbytes(numel) - HEADER_BYTES:
            raise CodecError(f"{self.name} payload of {numel} values must be {nscale} to "
                             f"{self.nbytes(numel) - HEADER_BYTES} bytes, got {len(body)}")
        coded = body[nscale:]
        if 8 * len(coded) < packed:
            # Huffman coding spends at least a bit per byte, so no honest payload is shorter; a
            # stream with LZ77 matches could be (1000:1), and its header's numel is the sender's word.
            raise CodecError(f"{self.name} payload of {numel} values needs at least {packed // 8} bytes of "
                             f"coded values, got {len(coded)}")
        unpacker = zlib.decompressobj(_RAW_DEFLATE)
        try:
            raw = unpacker.decompress(coded, packed)
        except zlib.error as exc:
            raise CodecError(f"{self.name} payload's coded values are corrupt: {exc}") from None
        if len(raw) != packed or not unpacker.eof or unpacker.unconsumed_tail or unpacker.unused_data:
            raise CodecError(f"{self.name} payload's coded values do not decode to exactly {packed} bytes")
        scales = torch.frombuffer(bytearray(body[:nscale]), dtype=torch.uint8)
        with warnings.catch_warnings():  # `raw` is read-only, held by nothing else, and never written to
            warnings.simplefilter("ignore", UserWarning)
            return Encoded(self, numel, scales, torch.frombuffer(raw, dtype=torch.uint8))
