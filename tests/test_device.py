"""Device-resident averaging: the engine keeps its global copies, outer momentum and residuals on the
model's device and the codec encodes and decodes there, so only encoded bytes cross to the host.

On a CPU-only machine two things pin it. The `meta` device is a real second device (tensors with
shapes and no data): a worker whose model lives there must keep all its state there, and must bring
a mean averaged on the host over to it, or torch refuses to mix the devices. And a real CPU sync,
with `Tensor.cpu` and `Tensor.numpy` recorded, must put no fp32 fragment through either. The tests
at the bottom compare the codec, the outer step and a whole sync on CUDA against the CPU, bit for
bit, where torch sees a GPU (benchmarks/gpu_check.sh runs them).
"""
from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from p2pdiloco.averaging import AverageResult, InProcessAverager
from p2pdiloco.codecs import get_codec
from p2pdiloco.inner import InnerConfig, InnerOptimizer
from p2pdiloco.models import build_model
from p2pdiloco.outer import OuterConfig, OuterSGD
from p2pdiloco.streaming import StreamingConfig, Worker, _InFlight

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


def make_worker(device: str, averager, name: str = "w0", codec: str = "e3m0", **streaming) -> Worker:
    model = build_model("micro", seed=0).to(device)
    cfg = StreamingConfig(**{"H": 4, "fragments": 2, "tau": 0, "alpha": 0.0, "codec": codec, **streaming})
    return Worker(name, model, InnerOptimizer(model, InnerConfig(lr=1e-3, warmup_steps=1), 100), cfg,
                  OuterConfig(lr=0.7, momentum=0.9), averager)


def state_devices(w: Worker) -> set[str]:
    tensors = [*w.global_params, *(o.buf for o in w.outer), *(w.residuals or [])]
    return {t.device.type for t in tensors}


def test_state_lives_on_the_models_device():
    w = make_worker("meta", InProcessAverager(["w0"]).member("w0"))
    assert state_devices(w) == {"meta"}
    assert len(w.global_params) == 3 and all(g.dtype == torch.float32 for g in w.global_params)


def test_a_host_mean_lands_on_the_device_from_its_encoded_spans():
    """The averager's mean is on the host; the worker brings it over (as encoded spans where the
    averager keeps them) and applies it there: without that, the outer step mixes devices and fails."""
    codec = get_codec("e3m0")
    w = make_worker("meta", InProcessAverager(["w0"]).member("w0"))
    f, numel = 0, w.fragments[0].numel
    host = torch.linspace(-1, 1, numel)
    for encoded in ((codec.encode(host[: numel // 2]), codec.encode(host[numel // 2:])), ()):
        future: Future = Future()
        future.set_result(AverageResult(host.clone(), ("w0",), 1.0, 0, encoded))
        w._finish(f, _InFlight(0, future, 0, 1.0, None, None, 0.0))
        assert w.applied_rounds[f] == 0 and w.skipped_rounds == 0
        assert state_devices(w) == {"meta"}
        assert w._mean_here(future.result()).device.type == "meta"


def test_the_codec_decodes_on_its_payloads_device():
    """Decoding happens where the payload is (E3M0's look-up tables included); encoding keeps its
    input's device (E3M0's encoder picks out rare blocks by value, which `meta` cannot: CUDA tests below)."""
    x = torch.linspace(-3, 3, 3001)
    for name in ("e3m0", "e3m0-huffman", "int8", "bf16", "fp32"):
        enc = get_codec(name).encode(x)
        assert enc.to("cpu") is enc, name
        on_meta = enc.to("meta")
        assert on_meta.device.type == "meta" and on_meta.scales.device.type == "meta", name
        if name != "int8":  # int8 checks its scales are finite: a question of values, which meta lacks
            assert on_meta.decode().device.type == "meta", name
        if name != "e3m0" and name != "e3m0-huffman":
            assert get_codec(name).encode(x.to("meta")).device.type == "meta", name


def test_a_cpu_sync_puts_no_fp32_fragment_through_cpu_or_numpy(monkeypatch):
    """A real sync on the CPU (two workers, e3m0 with error feedback, data-parallel warm start then
    streaming) with every `.cpu()` and `.numpy()` recorded: the engine may hand the host encoded
    bytes (uint8), never a fragment's, a gradient's or a mean's fp32 values."""
    seen: list[tuple[torch.dtype, int]] = []
    real_cpu, real_numpy = torch.Tensor.cpu, torch.Tensor.numpy

    def cpu(self, *args, **kwargs):
        seen.append((self.dtype, self.numel()))
        return real_cpu(self, *args, **kwargs)

    def numpy(self, *args, **kwargs):
        seen.append((self.dtype, self.numel()))
        return real_numpy(self, *args, **kwargs)

    averager = InProcessAverager(["w0", "w1"])
    workers = [make_worker("cpu", averager.member(n), n, dp_warmup_steps=2) for n in ("w0", "w1")]
    smallest = min(f.numel for f in workers[0].fragments)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 17), generator=gen) for _ in range(8)]
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch.Tensor, "numpy", numpy)
    for batch in batches:
        for w in workers:
            w.forward_backward(batch[:, :-1], batch[:, 1:])
        for w in workers:
            w.optimizer_step()
        for w in workers:
            w.send_due()
        for w in workers:
            w.apply_due()
    monkeypatch.undo()
    assert sum(len(w.applied_rounds) for w in workers) == 6 and not any(w.skipped_rounds for w in workers)
    big = [(dtype, n) for dtype, n in seen if dtype.is_floating_point and n >= smallest]
    assert not big, f"fp32 vectors went through .cpu()/.numpy(): {big[:5]}"


# ---- CUDA against the CPU, bit for bit (skipped without a GPU)

def _awkward(n: int) -> torch.Tensor:
    """Values that take every path of the E3M0 encoder: ordinary blocks, all-zero blocks, -0.0,
    subnormal-sized and huge blocks (the exact float formulation), and a ragged tail."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, generator=gen) * torch.logspace(-3, 3, n)
    x[:1024] = 0.0
    x[1024:1030] = -0.0
    x[2048:3072] *= 2.0 ** -130
    x[3072:4096] *= 2.0 ** 120
    return x


@CUDA
@pytest.mark.parametrize("name,block", [("e3m0", 1024), ("e3m0", 33), ("e3m0-huffman", 1024), ("int8", 256),
                                        ("bf16", 1), ("fp16", 1), ("fp32", 1)])
def test_codec_on_cuda_is_the_cpus_bit_for_bit(name, block):
    codec = get_codec(name)
    if block != codec.block:
        codec = type(codec)(block)
    x = _awkward(3 * 65536 + 4101)
    on_cpu, on_gpu = codec.encode(x), codec.encode(x.cuda())
    assert on_gpu.device.type == "cuda"
    host = on_gpu.to("cpu")
    assert torch.equal(host.values, on_cpu.values) and torch.equal(host.scales, on_cpu.scales)
    assert host.to_bytes() == on_cpu.to_bytes()
    decoded = on_cpu.to("cuda").decode()
    assert decoded.device.type == "cuda"
    assert torch.equal(decoded.cpu().view(torch.int32), on_cpu.decode().view(torch.int32))


@CUDA
def test_fused_weighted_sum_on_cuda_is_the_cpus():
    codec = get_codec("e3m0")
    parts = [(codec.encode(_awkward(70001) * (i + 1)), w) for i, w in enumerate((0.5, 0.25, 0.25))]
    want = codec.weighted_sum(parts)
    got = codec.weighted_sum([(enc.to("cuda"), w) for enc, w in parts])
    assert want is not None and got is not None and got.device.type == "cuda"
    assert torch.equal(got.cpu().view(torch.int32), want.view(torch.int32))


@CUDA
def test_outer_step_on_cuda_is_the_cpus():
    """The global copies of a GPU peer and a CPU peer must stay bit-identical (donors' states are
    compared by hash): the outer step is elementwise, and must round alike on both."""
    gen = torch.Generator().manual_seed(2)
    theta, deltas = torch.randn(100_003, generator=gen), [torch.randn(100_003, generator=gen) for _ in range(3)]
    cpu, gpu = OuterSGD(OuterConfig(), theta.numel()), OuterSGD(OuterConfig(), theta.numel(), "cuda")
    t_cpu, t_gpu = theta.clone(), theta.cuda()
    for d in deltas:
        cpu.step(t_cpu, d)
        gpu.step(t_gpu, d.cuda())
    assert torch.equal(t_gpu.cpu().view(torch.int32), t_cpu.view(torch.int32))
    assert torch.equal(gpu.buf.cpu().view(torch.int32), cpu.buf.view(torch.int32))


@CUDA
def test_a_sync_on_cuda_matches_the_cpu():
    """Two workers on CUDA and two on the CPU, their replicas set to the same values, sync every
    fragment once: the same bytes go out and the same global copies come back; the state stays
    on the GPU."""
    results = {}
    for device in ("cpu", "cuda"):
        averager = InProcessAverager(["w0", "w1"])
        workers = [make_worker(device, averager.member(n), n) for n in ("w0", "w1")]
        for i, w in enumerate(workers):
            with torch.no_grad():
                for p in w.model.parameters():
                    p.add_(torch.full_like(p, 0.01 * (i + 1)) * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(device))
            w.tokens_since = [100] * len(w.fragments)
            for f in range(len(w.fragments)):
                w._send(f, 0, final=False)
        for w in workers:
            w.flush()
        assert state_devices(workers[0]) == {device}
        results[device] = ([g.cpu() for g in workers[0].global_params], workers[0].bytes_sent)
    assert results["cpu"][1] == results["cuda"][1]
    for a, b in zip(results["cpu"][0], results["cuda"][0]):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
