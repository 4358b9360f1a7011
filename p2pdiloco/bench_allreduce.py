"""`p2pdiloco bench allreduce`: one average of the same fp32 vector across N peer processes, four ways.

Every method runs in its own set of N spawned processes over loopback (127.0.0.1 only):
- p2pdiloco_fp32 / p2pdiloco_e3m0: this project's data plane as peers run it (swarm/dataplane.py,
  Reduce on the bulk port of swarm/bulk.py), no DHT; the time includes encoding the vector and
  decoding the mean; p2pdiloco_grpc_fp32 / p2pdiloco_grpc_e3m0 (not run by default): the same with
  Reduce over gRPC, as with --bulk-port -1; p2pdiloco_e3m0-huffman (not run by default): E3M0 with
  its codes Huffman-coded on the wire (fewer bytes, more CPU); any of these with `_auth` appended
  (p2pdiloco_fp32_auth, ...; `--auth` adds them) runs as a closed run's peers do: mutual TLS with a
  throwaway run CA on gRPC and in each bulk connection's handshake, the bulk port's messages sealed
  with AES-GCM (swarm/bulk_seal.py), and every caller's certificate checked (swarm/trust.py); with
  `_auth-plain` the same with `--bulk-encryption none` (the messages plain after the handshake);
- gloo: torch.distributed all_reduce(SUM) / N (rendezvous through a FileStore, sockets on `lo`);
- hivemind: DecentralizedAverager over a hivemind DHT, matchmaking included (that is its real cost).

Each peer holds a different random vector (seeded by rank) and checks the result against the true
mean. "seconds" is the median over repeats (after one warm-up average) of the slowest peer's wall time
for one average, measured in each process between a common barrier and its result;
"cpu_seconds_all_peers" the median of the CPU time all peers' processes spent on one average, and
"page_faults_per_peer" of the most minor page faults one peer took in it (memory the kernel had to
map and zero: a buffer that should have been reused).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager

import torch
from tqdm import tqdm

from .simulate import write_json
from .wan.links import rate_bytes_per_s

METHODS = ("p2pdiloco_fp32", "p2pdiloco_e3m0", "gloo", "hivemind")
EXTRA_METHODS = ("p2pdiloco_grpc_fp32", "p2pdiloco_grpc_e3m0", "p2pdiloco_e3m0-huffman")
# A p2pdiloco method with one of these suffixes runs closed (admissions checked), its bulk port's
# messages sealed with AES-GCM (_auth) or plain after each connection's TLS handshake (_auth-plain).
CLOSED = {"_auth": "aes-gcm", "_auth-plain": "none"}


def closed(method: str) -> tuple[str, str | None]:
    """(the method without its closed-run suffix, the bulk encryption; None: an open run)."""
    for suffix, encryption in CLOSED.items():
        if method.startswith("p2pdiloco_") and method.endswith(suffix):
            return method.removesuffix(suffix), encryption
    return method, None
FP32_TOL, E3M0_REL_TOL = 1e-5, 0.35


class BenchError(RuntimeError):
    pass


def ring_bytes(numel: int, peers: int) -> int:
    return int(2 * (peers - 1) / peers * numel * 4)


def peer_tensor(rank: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(1000 + rank))


# ---- the methods, each a generator: set up, yield (reset, average), tear down
@contextmanager
def _p2pdiloco(codec_name, bulk, rank, peers, x, rendezvous, timeout, admission=None, encryption="aes-gcm"):
    from .averaging import SyncKey
    from .codecs import get_codec
    from .swarm.channels import Channels
    from .swarm.dataplane import Identity, RoundBook, Servicer, allreduce
    from .swarm.loop import BackgroundLoop
    from .swarm.matchmaking import make_group
    from .swarm.servers import Servers, address

    codec, max_bytes = get_codec(codec_name), max(256 << 20, x.numel() * 4 + (1 << 20))
    trust = None
    if admission is not None:
        from .swarm.trust import Trust
        trust = Trust(admission, encryption)
    identity = Identity("bench", "bench", f"peer-{rank}", codec_name, trust.cert_der if trust else b"")
    book, loop = RoundBook(identity, reduce_timeout_s=timeout), BackgroundLoop(f"bench-{rank}")
    state = {}

    async def no_state():
        raise RuntimeError("a benchmark peer has no state")

    async def start():
        state["channels"] = Channels(max_bytes, trust)  # channels belong to the loop: make them on it
        state["servers"] = Servers(Servicer(book, no_state, trust), max_bytes, timeout)
        return address("127.0.0.1", *await state["servers"].start("127.0.0.1", 0, 0 if bulk else -1))

    async def stop():
        if "servers" in state:
            await state["servers"].stop()
            await state["channels"].close()

    try:
        declared = dict(rendezvous((identity.peer_id, loop.call(start(), timeout=30))))

        def average(r):  # as a peer does (network.py): the mean reuses the previous one's buffer
            group = make_group(SyncKey("fragment", 0, r), declared, identity.peer_id, group_size=peers)
            res = loop.call(allreduce(book, state["channels"], group, codec.encode(x), 1.0, timeout,
                                      out=state.pop("mean", None)), timeout + 5)
            state["mean"] = res.mean
            return res.mean, res.bytes_sent

        yield None, average
    finally:
        try:
            loop.call(stop(), timeout=10)
        finally:
            loop.stop()


@contextmanager
def _gloo(rank, peers, x, rendezvous, timeout, store_path):
    from datetime import timedelta

    import torch.distributed as dist

    rendezvous(None)  # only to start together
    store = dist.FileStore(store_path, peers)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=peers, timeout=timedelta(seconds=timeout))
    buf = torch.empty_like(x)

    def average(r):
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.div_(peers), ring_bytes(x.numel(), peers)

    try:
        yield (lambda: buf.copy_(x)), average
    finally:
        dist.destroy_process_group()


@contextmanager
def _hivemind(rank, peers, x, rendezvous, timeout):
    import hivemind
    from hivemind.averaging import DecentralizedAverager

    mp.set_start_method("fork", force=True)  # hivemind's DHT and averager are forked processes
    dht = averager = None
    host = ["/ip4/127.0.0.1/tcp/0"]
    try:
        if rank == 0:
            dht = hivemind.DHT(host_maddrs=host, start=True)
        first = rendezvous([str(a) for a in dht.get_visible_maddrs()] if dht else None)[0]
        if rank:
            dht = hivemind.DHT(initial_peers=first, host_maddrs=host, start=True)
        averager = DecentralizedAverager([x.clone()], dht, start=True, prefix="bench_allreduce",
                                         target_group_size=peers, min_group_size=peers, min_matchmaking_time=2.0,
                                         request_timeout=1.0, allreduce_timeout=timeout)

        def reset():
            with averager.get_tensors() as tensors:
                tensors[0].copy_(x)

        def average(r):
            if averager.step(timeout=timeout) is None:
                raise RuntimeError("hivemind found no group")
            with averager.get_tensors() as tensors:
                return tensors[0], ring_bytes(x.numel(), peers)

        yield reset, average
    finally:
        if averager is not None:
            averager.shutdown()
        if dht is not None:
            dht.shutdown()


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _worker(method, rank, peers, numel, repeats, timeout, up, down, barrier, store_path, admission=None):
    os.setpgid(0, 0)  # the parent kills this process group (hivemind's children included) if it must
    torch.set_num_threads(1)
    try:
        x = peer_tensor(rank, numel)
        true = sum(peer_tensor(r, numel).double() for r in range(peers)) / peers

        def rendezvous(payload):
            up.put(("addr", rank, payload))
            return down.get(timeout=timeout)

        if method.startswith("p2pdiloco_"):
            base, encryption = closed(method)
            runner = _p2pdiloco(base.rsplit("_", 1)[1], "_grpc_" not in method, rank, peers, x, rendezvous, timeout,
                                admission, encryption or "aes-gcm")
        elif method == "gloo":
            runner = _gloo(rank, peers, x, rendezvous, timeout, store_path)
        else:
            runner = _hivemind(rank, peers, x, rendezvous, timeout)
        seconds, cpu, faults, sent, abs_err, rel_err = [], [], [], 0, 0.0, 0.0
        with runner as (reset, average):
            for r in range(repeats + 1):  # round 0 is the warm-up
                if reset:
                    reset()
                barrier.wait(timeout)
                t0, c0, f0 = time.perf_counter(), time.process_time(), _minor_faults()
                mean, nbytes = average(r)
                dt, dc, df = time.perf_counter() - t0, time.process_time() - c0, _minor_faults() - f0
                diff = mean.double() - true
                abs_err = max(abs_err, diff.abs().max().item())
                rel_err = max(rel_err, (diff.norm() / true.norm()).item())
                if r:
                    seconds.append(dt)
                    cpu.append(dc)
                    faults.append(df)
                    sent = max(sent, nbytes)
            barrier.wait(timeout)  # nobody stops serving while another still needs it
            up.put(("result", rank, {"seconds": seconds, "cpu": cpu, "faults": faults, "bytes": sent, "abs_err": abs_err, "rel_err": rel_err}))
    except BaseException:
        up.put(("error", rank, traceback.format_exc()))


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.join(5)


def run_method(method, peers, numel, repeats, timeout, progress) -> dict:
    ctx = mp.get_context("spawn")
    up, downs, barrier = ctx.Queue(), [ctx.Queue() for _ in range(peers)], ctx.Barrier(peers)
    deadline = time.monotonic() + 120 + (repeats + 3) * timeout
    admissions = [None] * peers
    if closed(method)[1] is not None:
        from .swarm.admission import throwaway_run
        admissions = throwaway_run([f"peer-{rank}" for rank in range(peers)])
    with tempfile.TemporaryDirectory(prefix="bench-allreduce-") as tmp:
        procs, addrs, results = [], {}, {}
        saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME")}
        ok = False
        try:
            os.environ.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")  # inherited by the spawned peers
            try:
                for rank in range(peers):
                    p = ctx.Process(target=_worker, name=f"{method}-{rank}", args=(
                        method, rank, peers, numel, repeats, timeout, up, downs[rank], barrier, f"{tmp}/store",
                        admissions[rank]))
                    p.start()
                    procs.append(p)
            finally:
                for k, v in saved.items():
                    os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
            while len(results) < peers:
                try:
                    kind, rank, payload = up.get(timeout=1.0)
                except queue.Empty:
                    dead = [p.name for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise BenchError(f"{method}: peer process {', '.join(dead)} died") from None
                    if time.monotonic() > deadline:
                        raise BenchError(f"{method}: no result within {120 + (repeats + 3) * timeout:.0f}s") from None
                    continue
                if kind == "error":
                    raise BenchError(f"{method}: peer {rank} failed:\n{payload}")
                if kind == "addr":
                    addrs[rank] = payload
                    if len(addrs) == peers:
                        progress(f"[bench] {method}: {peers} peers up, averaging {repeats + 1} times")
                        for q in downs:
                            q.put([addrs[r] for r in range(peers)])
                else:
                    results[rank] = payload
            ok = True
        finally:
            if not ok:
                barrier.abort()  # the others stop waiting for a peer that failed
            for p in procs:
                p.join(max(1.0, min(30.0 if ok else 3.0, deadline - time.monotonic())))
                if p.is_alive():
                    _kill(p)
            for q in (up, *downs):
                q.cancel_join_thread()
                q.close()
    per_round = [max(r["seconds"][i] for r in results.values()) for i in range(repeats)]
    cpu_per_round = [sum(r["cpu"][i] for r in results.values()) for i in range(repeats)]
    return {"seconds": statistics.median(per_round), "bytes_sent_per_peer": max(r["bytes"] for r in results.values()),
            # CPU of the peers' own processes (hivemind's averager runs in a child: not counted).
            "cpu_seconds_all_peers": None if method == "hivemind" else statistics.median(cpu_per_round),
            "page_faults_per_peer": None if method == "hivemind" else statistics.median(
                max(r["faults"][i] for r in results.values()) for i in range(repeats)),
            "all_seconds": per_round, "max_abs_error": max(r["abs_err"] for r in results.values()),
            "max_rel_error": max(r["rel_err"] for r in results.values())}


def check(method: str, m: dict) -> str | None:
    if "e3m0" in method:
        rel = m["max_rel_error"]
        return None if rel < E3M0_REL_TOL else f"relative error {rel:.3f} ≥ {E3M0_REL_TOL}"
    return None if m["max_abs_error"] <= FP32_TOL else f"max error {m['max_abs_error']:.2e} > {FP32_TOL}"


@contextmanager
def shaped_loopback(rate: str | None):
    """Limit all loopback traffic (every peer shares it) to `rate` with a tbf qdisc, removed after."""
    if rate is None:
        yield
        return
    burst = max(256 << 10, int(rate_bytes_per_s(rate, "--bandwidth") / 100))  # ≥ lo's 64 KiB MTU, or 10 ms at the rate
    cmd = ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", str(burst), "latency", "100ms"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"--bandwidth needs tc (iproute2): {exc}") from None
    if r.returncode:
        raise BenchError(f"--bandwidth: '{' '.join(cmd)}' failed ({r.stderr.strip()}); it needs root and no "
                         f"other root qdisc on lo")
    try:
        yield
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True, timeout=10)


def run_allreduce_bench(peers: int, numel: int, json_path: str, repeats: int = 5, bandwidth: str | None = None,
                        methods=METHODS, progress=print, auth: bool = False) -> dict:
    for m in methods:
        if closed(m)[0] not in METHODS + EXTRA_METHODS:
            raise ValueError(f"--methods: '{m}' is unknown; choose from {', '.join(METHODS + EXTRA_METHODS)} "
                             f"(p2pdiloco methods also with {' or '.join(CLOSED)} appended)")
    if auth:  # each p2pdiloco method's closed-run twins, right after it (the same load on the machine)
        methods = tuple(x for m in methods for x in ([m, *(m + s for s in CLOSED)] if m.startswith("p2pdiloco_")
                                                      and closed(m)[1] is None else [m]))
    if peers < 2 or numel < peers or repeats < 1:
        raise ValueError("--peers must be ≥ 2, --numel ≥ --peers and --repeats ≥ 1")
    rate = rate_bytes_per_s(bandwidth, "--bandwidth") if bandwidth else 20e6  # a slow loaded 2-core host moves ≥ 20 MB/s
    timeout = 60 + 4 * ring_bytes(numel, peers) * peers / rate
    result = {"peers": peers, "numel": numel, "repeats": repeats, "bandwidth": bandwidth,
              "bandwidth_note": "aggregate loopback rate shared by all peers (tc tbf on lo)" if bandwidth else None,
              "methods": {}}
    t0 = time.perf_counter()
    with shaped_loopback(bandwidth):
        # A bar over the methods on a terminal (disable=None: none in logs); `progress` lines go above it.
        for method in tqdm(methods, desc="bench allreduce", unit="method", file=sys.stderr, disable=None, leave=False):
            progress(f"[bench] {method}: starting {peers} peer processes ({numel:,} values each)")
            try:
                m = run_method(method, peers, numel, repeats, timeout, progress)
                m["error"] = check(method, m)
            except BenchError as exc:
                m = {"seconds": None, "bytes_sent_per_peer": None, "error": str(exc)}
            result["methods"][method] = m
            progress(f"[bench] {method}: " + (f"{m['seconds']:.3f}s, {m['bytes_sent_per_peer']:,} bytes/peer"
                                             if m["seconds"] is not None else "FAILED") +
                     (f" ({m['error']})" if m["error"] else ""))
            write_json(json_path, result)
    result["wall_s"] = time.perf_counter() - t0
    write_json(json_path, result)
    return result


def cli(args) -> int:
    def progress(line):
        tqdm.write(line, file=sys.stderr)  # above the bar over the methods, when there is one

    try:
        result = run_allreduce_bench(args.peers, args.numel, args.json, args.repeats, args.bandwidth,
                                     tuple(args.methods or METHODS), progress, auth=args.auth)
    except BenchError as exc:
        print(f"p2pdiloco: error: {exc}", file=sys.stderr)
        return 2
    base = (result["methods"].get("gloo") or {}).get("seconds")
    print(f"{'method':24s} {'seconds':>9s} {'vs gloo':>8s} {'cpu s':>7s} {'bytes/peer':>14s} {'max err':>9s} {'rel err':>8s}")
    for name, m in result["methods"].items():
        if m["seconds"] is None:
            print(f"{name:24s} FAILED: {m['error'].splitlines()[-1]}")
            continue
        ratio = f"{m['seconds'] / base:8.2f}" if base else f"{'-':>8s}"
        cpu = f"{m['cpu_seconds_all_peers']:7.3f}" if m.get("cpu_seconds_all_peers") is not None else f"{'-':>7s}"
        print(f"{name:24s} {m['seconds']:9.3f} {ratio} {cpu} {m['bytes_sent_per_peer']:14,d} {m['max_abs_error']:9.2e} "
              f"{m['max_rel_error']:8.4f}" + (f"  CHECK FAILED: {m['error']}" if m["error"] else ""))
    print(f"{result['peers']} peers, {result['numel']:,} values, median of {result['repeats']}; "
          f"{result['wall_s']:.1f}s; results in {args.json}")
    return 1 if any(m["error"] for m in result["methods"].values()) else 0
