"""The outer optimizer: SGD with Nesterov momentum on the pseudo-gradient Δ = θ_global − θ_local.

DiLoCo (arXiv 2311.08105) uses lr 0.7, momentum 0.9; Streaming DiLoCo tuned lr 0.4. With Δ already
a difference of parameters, lr 1 and momentum 0 make the outer step "replace θ_global by the mean of
the local parameters" (federated averaging). The update, per fragment, on a flat fp32 vector:

    buf ← μ·buf + Δ
    θ   ← θ − lr·(Δ + μ·buf)       (Nesterov; identical to torch.optim.SGD(nesterov=True))
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OuterConfig:
    lr: float = 0.7
    momentum: float = 0.9
    nesterov: bool = True

    def validate(self) -> "OuterConfig":
        if not self.lr > 0:
            raise ValueError(f"outer.lr must be positive, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"outer.momentum must be in [0, 1), got {self.momentum}")
        return self


class OuterSGD:
    """The momentum lives on `device`, with the global copy it updates (the training device)."""

    def __init__(self, cfg: OuterConfig, numel: int, device: torch.device | str = "cpu"):
        self.cfg = cfg.validate()
        self.buf = torch.zeros(numel, dtype=torch.float32, device=device)

    def direction(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(update direction, new momentum buffer) without changing state."""
        buf = self.buf * self.cfg.momentum + delta
        update = delta + self.cfg.momentum * buf if self.cfg.nesterov else buf
        return update, buf

    def step(self, theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Apply one outer step to θ in place and return it."""
        update, self.buf = self.direction(delta)
        return theta.sub_(update, alpha=self.cfg.lr)

    def preview(self, theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """What step() would give, leaving θ and the momentum untouched (eager updates)."""
        update, _ = self.direction(delta)
        return theta - self.cfg.lr * update

    def state_dict(self) -> dict:
        """A copy on the CPU, whatever the device: states travel and are saved device-free."""
        return {"buf": self.buf.to("cpu", copy=True)}

    def load_state_dict(self, state: dict) -> None:
        """A saved or downloaded state (read on the CPU) goes to this optimizer's device."""
        self.buf = state["buf"].to(self.buf.device, torch.float32, copy=True)
