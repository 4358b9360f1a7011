"""Peers on mixed hardware: profiles, options over profiles, devices, micro-batches."""
from __future__ import annotations

import argparse

import pytest
import torch

from p2pdiloco.hardware import HardwareConfig, load_profile, profile_names, resolve_device
from p2pdiloco.swarm.cli import add_peer_parser, peer_configs

PROFILES = ("apple-laptop", "consumer-gpu", "cpu-small", "datacenter-gpu")


def parse(*argv: str):
    parser = argparse.ArgumentParser()
    add_peer_parser(parser.add_subparsers(dest="command"))
    return peer_configs(parser.parse_args(["peer", *argv]))


def test_every_shipped_profile_loads_and_validates():
    assert set(PROFILES) <= set(profile_names())
    for name in PROFILES:
        sim, swarm, hw = parse("--profile", name)
        assert hw.device in ("cpu", "cuda", "mps") and sim.batch_size % max(hw.micro_batch, 1) == 0


def test_options_on_the_command_line_override_the_profile(tmp_path):
    sim, swarm, hw = parse("--profile", "cpu-small")
    assert (sim.batch_size, hw.threads, hw.micro_batch, swarm.reduce_timeout_s) == (8, 2, 4, 30.0)
    sim, swarm, hw = parse("--profile", "cpu-small", "--batch-size", "6", "--micro-batch", "3", "--threads", "1",
                           "--reduce-timeout", "9", "--device", "cpu")
    assert (sim.batch_size, hw.threads, hw.micro_batch, swarm.reduce_timeout_s) == (6, 1, 3, 9.0)
    own = tmp_path / "mine.toml"
    own.write_text('batch_size = 12\n[hardware]\nmicro_batch = 6\nslowdown = 2.5\n')
    sim, _, hw = parse("--profile", str(own))
    assert (sim.batch_size, hw.micro_batch, hw.slowdown, hw.device) == (12, 6, 2.5, "auto")


def test_bad_profiles_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="named profiles: .*cpu-small"):
        load_profile("no-such-profile")
    run = tmp_path / "run.toml"
    run.write_text('model = "mini"\nbatch_size = 4\n')
    with pytest.raises(ValueError, match="sets model: a profile holds only"):
        load_profile(str(run))
    broken = tmp_path / "broken.toml"
    broken.write_text("[hardware\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_profile(str(broken))
    with pytest.raises(ValueError, match="micro_batch .* must divide batch_size"):
        parse("--profile", "cpu-small", "--micro-batch", "3")
    with pytest.raises(ValueError, match="unknown field 'hardware.gpu'"):
        typo = tmp_path / "typo.toml"
        typo.write_text("[hardware]\ngpu = 1\n")
        parse("--profile", str(typo))
    with pytest.raises(ValueError, match="slowdown must be ≥ 1"):
        parse("--slowdown", "0.5")


def test_devices_resolve_or_say_what_to_do():
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="--device cpu"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown"):
        HardwareConfig(device="tpu").validate(8)


def test_micro_batches_accumulate_the_same_gradient_as_the_whole_batch(small_corpus):
    """A small device takes the same step as a large one: accumulation is exact up to float sums."""
    import copy

    from p2pdiloco.averaging import InProcessAverager
    from p2pdiloco.data import ShardSampler
    from p2pdiloco.inner import InnerConfig, InnerOptimizer
    from p2pdiloco.model import Transformer, model_config
    from p2pdiloco.outer import OuterConfig
    from p2pdiloco.streaming import StreamingConfig, Worker

    torch.manual_seed(0)
    base = Transformer(model_config("tiny"))
    x, y = ShardSampler(small_corpus, 0, 1, 8).next()
    grads, losses = [], []
    for micro in (0, 2, 4):
        model = copy.deepcopy(base)
        w = Worker("w", model, InnerOptimizer(model, InnerConfig(), 10), StreamingConfig(H=10, fragments=2),
                   OuterConfig(), InProcessAverager(["w"]).member("w"))
        losses.append(w.forward_backward(x, y, micro_batch=micro))
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        assert w.tokens == y.numel()
    for g, loss in zip(grads[1:], losses[1:]):
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-6)
        assert loss == pytest.approx(losses[0], rel=1e-5)
