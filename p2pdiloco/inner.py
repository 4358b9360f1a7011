"""The inner optimizer: AdamW with linear warmup, cosine decay and gradient clipping.

DiLoCo's inner defaults (arXiv 2311.08105): lr 4e-4, betas (0.9, 0.95), weight decay 0.1, warmup,
cosine decay, clip 1.0. `sgd` (plain, no momentum) exists for one reason: DiLoCo with H=1, outer lr 1
and no outer momentum is then exactly data-parallel SGD, which the tests pin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class InnerConfig:
    optimizer: str = "adamw"
    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def validate(self) -> "InnerConfig":
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"inner.optimizer '{self.optimizer}' is unknown; use 'adamw' or 'sgd'")
        if not self.lr > 0:
            raise ValueError(f"inner.lr must be positive, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"inner.betas must be in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("inner.warmup_steps must be ≥ 0 and inner.min_lr_ratio in [0, 1]")
        if self.grad_clip < 0:
            raise ValueError(f"inner.grad_clip must be ≥ 0 (0 disables it), got {self.grad_clip}")
        return self


def lr_at(cfg: InnerConfig, step: int, total_steps: int) -> float:
    """Learning rate for inner step `step` (0-based): linear warmup, then cosine to min_lr_ratio·lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


class InnerOptimizer:
    def __init__(self, model: nn.Module, cfg: InnerConfig, total_steps: int):
        self.cfg, self.total_steps, self.model = cfg.validate(), total_steps, model
        params = list(model.parameters())
        if cfg.optimizer == "adamw":
            # No weight decay on gains (norm weights): decaying them toward 0 only hurts.
            decay = [p for p in params if p.ndim >= 2]
            keep = [p for p in params if p.ndim < 2]
            groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                      {"params": keep, "weight_decay": 0.0}]
            self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)
        else:
            self.opt = torch.optim.SGD(params, lr=cfg.lr)

    def step(self, step: int) -> float:
        """Clip, set the scheduled lr and step; returns the pre-clip gradient norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        lr = lr_at(self.cfg, step, self.total_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm
