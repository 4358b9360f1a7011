"""E3M0 on each device torch has here: encode and decode throughput, what crosses to the host, and
whether the device's bytes and decoded values equal the CPU's bit for bit.

    python benchmarks/codec_device.py [--numel N] [--repeat R] [--json FILE]

Prints one JSON object (and writes it to --json). Exit status 1 if any device's output differs from
the CPU's, 0 otherwise. On a machine without a GPU it measures the CPU alone (`devices: ["cpu"]`).
A device peer's sync moves `encoded_to_host_s` worth of bytes where a CPU-resident engine would
have moved `fp32_to_host_s` (streaming.py keeps the global copies on the training device).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from p2pdiloco.codecs import get_codec


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm: tables to the device, kernels compiled
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def sample(numel: int) -> torch.Tensor:
    """A pseudo-gradient's shape of values: normal, with magnitudes spread over six decades."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(numel, generator=gen) * torch.logspace(-3, 3, numel)


def measure(numel: int, repeat: int, devices: list[str]) -> dict:
    codec = get_codec("e3m0")
    x = sample(numel)
    reference = codec.encode(x)
    out = {"numel": numel, "codec": codec.name, "encoded_bytes": reference.nbytes, "devices": devices,
           "results": {name: on_device(codec, x, reference, torch.device(name), repeat) for name in devices}}
    return out


def on_device(codec, x: torch.Tensor, reference, device: torch.device, repeat: int) -> dict:
    numel, xd = x.numel(), x.to(device)
    enc = codec.encode(xd)
    same_bytes = enc.to("cpu").to_bytes() == reference.to_bytes()
    same_decode = torch.equal(reference.to(device).decode().cpu().view(torch.int32), reference.decode().view(torch.int32))
    encode_s = _best(lambda: codec.encode(xd), device, repeat)
    decode_s = _best(lambda: enc.decode(), device, repeat)
    remote = device.type != "cpu"
    return {
        "equal_to_cpu": bool(same_bytes and same_decode),
        "encode_s": round(encode_s, 6), "decode_s": round(decode_s, 6),
        "encode_gvalues_per_s": round(numel / encode_s / 1e9, 3),
        "decode_gvalues_per_s": round(numel / decode_s / 1e9, 3),
        # What a sync moves to the host: the encoded bytes, against the fp32 vector (0 on the CPU).
        "encoded_to_host_s": round(_best(lambda: enc.to("cpu") if remote else None, device, repeat), 6),
        "fp32_to_host_s": round(_best(lambda: xd.cpu() if remote else None, device, repeat), 6),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 24, help="values per vector (default 16M: a 64 MiB fragment)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure; the best is kept")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda where torch sees one")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result = measure(args.numel, args.repeat, devices)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0 if all(r["equal_to_cpu"] for r in result["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
