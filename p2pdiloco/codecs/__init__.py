"""Codecs for everything that crosses the wire: fp32, bf16, fp16, int8 (blockwise absmax), E3M0 4-bit,
and E3M0 with its codes Huffman-coded (lossless, about 3.5 bits a value).

An encoded tensor is an `Encoded` (base.py): an 8-byte header, per-block scales and the packed values.
Decoding always produces fp32 and accumulation happens in fp32 (Streaming DiLoCo, arXiv 2501.18512 §2.3).
Codecs are plain torch and work on any device: `encode` leaves the payload on its input's device and
`decode` decodes on the payload's, so a GPU peer encodes and decodes where it trains and only the
encoded bytes cross to the host (`Encoded.to`); the wire (`Encoded.pieces`) takes host payloads.
base.py holds what all share, simple.py the casts and int8, e3m0.py the 4-bit codec, entropy.py its
Huffman-coded form.
"""
from __future__ import annotations

import torch

from .base import HEADER, HEADER_BYTES, Codec, CodecError, Encoded
from .e3m0 import E3M0Codec
from .entropy import E3M0HuffmanCodec
from .simple import CastCodec, Int8Codec

__all__ = ["HEADER", "HEADER_BYTES", "CODECS", "Codec", "CodecError", "Encoded", "CastCodec", "Int8Codec",
           "E3M0Codec", "E3M0HuffmanCodec", "get_codec", "from_bytes", "parse_header"]

CODECS: dict[str, Codec] = {
    "fp32": CastCodec("fp32", 1, torch.float32),
    "bf16": CastCodec("bf16", 2, torch.bfloat16),
    "fp16": CastCodec("fp16", 3, torch.float16),
    "int8": Int8Codec(),
    "e3m0": E3M0Codec(),
    "e3m0-huffman": E3M0HuffmanCodec(),
}
_BY_ID = {c.codec_id: c for c in CODECS.values()}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"codec '{name}' is unknown; choose one of {', '.join(CODECS)}")
    return CODECS[name]


def parse_header(payload) -> tuple[Codec, int, memoryview]:
    """(codec, numel, the bytes after the header) of a wire payload; CodecError if it is malformed."""
    if len(payload) < HEADER_BYTES:
        raise CodecError(f"payload of {len(payload)} bytes is shorter than the {HEADER_BYTES}-byte header")
    codec_id, block_log2, _, numel = HEADER.unpack_from(payload)
    codec = _BY_ID.get(codec_id)
    if codec is None:
        raise CodecError(f"payload names unknown codec id {codec_id}")
    if codec.block != 1 << block_log2:
        raise CodecError(f"{codec.name} payload uses block {1 << block_log2}, this peer uses {codec.block}")
    return codec, numel, memoryview(payload)[HEADER_BYTES:]


def from_bytes(payload: bytes) -> Encoded:
    """Parse a wire payload (header included); raises CodecError on anything malformed."""
    codec, numel, body = parse_header(payload)
    return codec.from_bytes(body, numel)
