"""The plain codecs: fp32, bf16 and fp16 casts, and blockwise absmax int8."""
from __future__ import annotations

import torch

from .base import Codec, CodecError, Encoded, _blocks


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
        return Encoded(self, x.numel(), x.new_empty(0, dtype=torch.uint8), values)

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
        return Encoded(self, n, scale, q.reshape(-1)[:n].view(torch.uint8))

    def decode(self, enc: Encoded) -> torch.Tensor:
        if not torch.isfinite(enc.scales).all():
            raise CodecError("int8 payload has a non-finite scale")
        q = enc.values.view(torch.int8).float()
        return q * enc.scales.repeat_interleave(self.block)[: enc.numel]
