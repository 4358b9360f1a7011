"""The built-in decoder-only transformer: RMSNorm, rotary positions, SwiGLU, tied or untied head.

Named sizes run from `micro` (0.2M, for smoke runs) and `tiny` (about 1M parameters, for CPU tests) to `1b`. Blocks live in
`model.blocks` so that fragments (see fragments.py) can be cut along block boundaries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 352
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    init_std: float = 0.02

    def validate(self) -> "ModelConfig":
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, field) < 1:
                raise ValueError(f"model.{field} must be at least 1, got {getattr(self, field)}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"model.dim / model.n_heads must be even for rotary positions, "
                             f"got head dim {self.dim // self.n_heads}")
        return self


# Sizes: roughly 12·dim² parameters per block (4·dim² attention, 8·dim² SwiGLU) plus embeddings.
MODEL_SIZES: dict[str, ModelConfig] = {
    "micro": ModelConfig(dim=64, n_layers=4, n_heads=4, ffn_dim=176),              # 0.22M, smoke runs
    "tiny": ModelConfig(dim=128, n_layers=4, n_heads=4, ffn_dim=352),            # 0.82M
    "mini": ModelConfig(dim=256, n_layers=6, n_heads=4, ffn_dim=688),            # 4.8M
    "small": ModelConfig(dim=512, n_layers=8, n_heads=8, ffn_dim=1376),          # 25M
    "base": ModelConfig(dim=768, n_layers=12, n_heads=12, ffn_dim=2048),         # 85M
    "large": ModelConfig(dim=1024, n_layers=24, n_heads=16, ffn_dim=2752),       # 304M
    "1b": ModelConfig(dim=2048, n_layers=20, n_heads=16, ffn_dim=5504),          # 1.0B
}


def model_config(size: str, **overrides) -> ModelConfig:
    if size not in MODEL_SIZES:
        raise ValueError(f"model.size '{size}' is unknown; choose one of {', '.join(MODEL_SIZES)}")
    return replace(MODEL_SIZES[size], **overrides).validate()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.float().pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt()
        return (x.float() * norm).type_as(x) * self.weight


def rotary_tables(head_dim: int, seq_len: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (batch, heads, seq, head_dim); rotate consecutive pairs (x0, x1) by the position's angle.
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.ffn = SwiGLU(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2 style: residual projections scaled down by depth so the residual stream stays O(1).
        out_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            elif name.endswith(("attn.out.weight", "ffn.down.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=self.cfg.init_std)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds model.max_seq_len "
                             f"({self.cfg.max_seq_len})")
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        x = self.norm(x)
        logits = x @ self.embed.weight.t() if self.head is None else self.head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
