"""Outer Nesterov SGD against hand-computed values and torch; the inner lr schedule."""

import pytest
import torch

from p2pdiloco.inner import InnerConfig, lr_at
from p2pdiloco.outer import OuterConfig, OuterSGD


def test_outer_step_by_hand():
    opt = OuterSGD(OuterConfig(lr=0.5, momentum=0.9), 2)
    theta = torch.tensor([1.0, -2.0])
    # step 1: buf = Δ = [0.2, -0.4]; update = Δ + 0.9·buf = [0.38, -0.76]; θ -= 0.5·update
    opt.step(theta, torch.tensor([0.2, -0.4]))
    assert theta.tolist() == pytest.approx([1.0 - 0.19, -2.0 + 0.38])
    # step 2: buf = 0.9·[0.2,-0.4] + [0.1, 0.1] = [0.28, -0.26]; update = [0.1+0.252, 0.1-0.234]
    opt.step(theta, torch.tensor([0.1, 0.1]))
    assert theta.tolist() == pytest.approx([0.81 - 0.5 * 0.352, -1.62 - 0.5 * (0.1 - 0.234)])


def test_outer_matches_torch_sgd_nesterov():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(50, generator=g)
    ref = theta.clone().requires_grad_(True)
    torch_opt = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=True)
    ours = OuterSGD(OuterConfig(lr=0.7, momentum=0.9), 50)
    for _ in range(5):
        delta = torch.randn(50, generator=g)
        ref.grad = delta.clone()
        torch_opt.step()
        ours.step(theta, delta)
    assert torch.allclose(theta, ref.detach(), atol=1e-6)


def test_preview_changes_nothing():
    opt = OuterSGD(OuterConfig(), 3)
    theta = torch.ones(3)
    peek = opt.preview(theta, torch.full((3,), 0.1))
    assert torch.equal(theta, torch.ones(3)) and torch.equal(opt.buf, torch.zeros(3))
    assert torch.allclose(opt.step(theta.clone(), torch.full((3,), 0.1)), peek)


def test_lr1_momentum0_is_averaging():
    opt = OuterSGD(OuterConfig(lr=1.0, momentum=0.0), 2)
    theta = torch.tensor([1.0, 1.0])
    assert opt.step(theta, torch.tensor([0.25, -0.5])).tolist() == [0.75, 1.5]


def test_inner_schedule():
    cfg = InnerConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0, 110) == pytest.approx(1e-4)
    assert lr_at(cfg, 9, 110) == pytest.approx(1e-3)
    assert lr_at(cfg, 60, 110) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(cfg, 110, 110) == pytest.approx(1e-4)
    assert all(lr_at(cfg, s, 110) >= lr_at(cfg, s + 1, 110) for s in range(10, 110))


@pytest.mark.parametrize("field,value,match", [
    ("lr", 0.0, "outer.lr"), ("momentum", 1.0, "outer.momentum")])
def test_outer_config_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        OuterConfig(**{field: value}).validate()
