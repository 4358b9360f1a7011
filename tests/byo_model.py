"""Models for `--model module:function` in the tests (tests/ is on sys.path under pytest)."""
from __future__ import annotations

import torch
from torch import nn


class Layer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TokenMLP(nn.Module):
    """No attention, just enough to learn bigram statistics: logits of the next token from this one."""

    def __init__(self, vocab_size: int, dim: int = 32, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(Layer(dim) for _ in range(layers))
        self.out = nn.Linear(dim, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def build(vocab_size: int = 256) -> nn.Module:
    return TokenMLP(vocab_size)


def no_blocks() -> nn.Module:
    return nn.Sequential(nn.Embedding(256, 16), nn.Linear(16, 256))


def not_a_module():
    return "a string"
