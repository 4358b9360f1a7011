"""A peer's shareable state: what a newcomer downloads; and a worker's whole state, for a checkpoint.

The state is the global parameters of every fragment, the outer optimizer's momentum, the inner
optimizer's moments, and the counters that place the peer in the schedule (step, applied rounds).
It can be taken at any time: a fragment whose average was in flight at the donor is one round
behind in the copy, and the newcomer catches it up after its first missed round (peer.py). It travels as one `torch.save` blob read back
with `weights_only=True` (tensors and plain containers only: a hostile peer cannot run code), in
chunks, with its SHA-256 checked before any of it is used (dataplane.py, `download_state`).
"""
from __future__ import annotations

import asyncio
import copy
import hashlib
import io
import logging

import grpc
import torch

from ..streaming import Worker
from .gen import p2pdiloco_pb2 as pb
from .libp2p import LibP2PError

log = logging.getLogger("p2pdiloco.state")

FORMAT = 1


class StateError(ValueError):
    """A downloaded or loaded state that does not fit this peer's model."""


def _host(t: torch.Tensor) -> torch.Tensor:
    """A copy on the CPU: a state blob or checkpoint is the same whatever device its peer trains on."""
    return t.detach().to("cpu", copy=True)


def _here(worker: Worker, t: torch.Tensor) -> torch.Tensor:
    """A loaded (CPU) tensor as the worker keeps it: fp32, on its training device, a copy of its own."""
    return t.to(worker.device, torch.float32, copy=True)


def snapshot(worker: Worker, fragments: set[int] | None = None) -> bytes:
    """Safe from any thread: the global copies are read under the worker's lock. The inner moments
    may be a step apart from them, which costs nothing (they are only a warm start).
    With `fragments`, only those fragments' global copy and outer state (for catching up)."""
    keep = set(range(len(worker.global_params))) if fragments is None else fragments
    with worker.lock:
        state = {
            "format": FORMAT,
            "step": worker.step,
            "global": {i: _host(g) for i, g in enumerate(worker.global_params) if i in keep},
            "outer": {i: o.state_dict() for i, o in enumerate(worker.outer) if i in keep},
            "applied_rounds": {str(k): v for k, v in worker.applied_rounds.items()},
        }
    if fragments is None:
        state["inner"] = copy.deepcopy(worker.inner.opt.state_dict())
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _load(worker: Worker, blob: bytes) -> dict:
    try:
        state = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except Exception as exc:
        raise StateError(f"state blob does not load: {exc}") from None
    return _check(worker, state)


def _check(worker: Worker, state) -> dict:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise StateError(f"state format {state.get('format') if isinstance(state, dict) else '?'} != {FORMAT}")
    glob, mine = state["global"], worker.global_params
    if not isinstance(glob, dict) or any(not 0 <= i < len(mine) or t.shape != mine[i].shape for i, t in glob.items()):
        raise StateError("state's fragments do not match this peer's model: is the config the same?")
    return state


def restore(worker: Worker, blob: bytes) -> None:
    """Load a snapshot into `worker`: the replica restarts from the global parameters."""
    state = _load(worker, blob)
    glob = [state["global"].get(i) for i in range(len(worker.global_params))]
    if any(g is None for g in glob) or "inner" not in state:
        raise StateError("the donor sent a partial state to a newcomer")
    worker.step = int(state["step"])
    worker.global_params = [_here(worker, g) for g in glob]
    for outer, sd in zip(worker.outer, [state["outer"][i] for i in range(len(worker.outer))]):
        outer.load_state_dict(sd)
    worker.inner.opt.load_state_dict(state["inner"])
    worker.applied_rounds = {int(k): int(v) for k, v in state["applied_rounds"].items()}
    worker.tokens_since = [0] * len(worker.fragments)
    for view, flat in zip(worker.views, worker.global_params):
        view.write(flat)
    if worker.residuals is not None:
        worker.residuals = [torch.zeros_like(r) for r in worker.residuals]


def catch_up(worker: Worker, blob: bytes, fragments: set[int]) -> list[int]:
    """Take the donor's newer global copy of `fragments` (those whose last round this peer
    missed), keeping this replica's progress since its last sync: local += global_new − global_old.
    Returns the fragments that were behind and are now current."""
    state = _load(worker, blob)
    rounds = {int(k): int(v) for k, v in state["applied_rounds"].items()}
    updated = []
    with worker.lock:  # a newcomer may be copying this peer's state on the network thread
        for f in sorted(fragments):
            if f not in state["global"] or rounds.get(f, -1) <= worker.applied_rounds.get(f, -1):
                continue
            new = _here(worker, state["global"][f])
            worker.views[f].write(worker.views[f].read() + (new - worker.global_params[f]))
            worker.global_params[f] = new
            worker.outer[f].load_state_dict(state["outer"][f])
            worker.applied_rounds[f] = rounds[f]
            updated.append(f)
    return updated


def fingerprint(blob: bytes, fragments: set[int] | None = None) -> tuple:
    """What donors of one run must agree on: per fragment, the last round applied and a hash of its
    global copy and outer momentum (bit-identical on every peer that applied the same rounds). The
    inner optimizer's moments and the step are each replica's own and are left out."""
    try:
        state = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
        glob, outer, rounds = state["global"], state["outer"], state["applied_rounds"]
        out = []
        for f in sorted(glob):
            if fragments is not None and f not in fragments:
                continue
            h = hashlib.sha256(glob[f].float().contiguous().numpy().tobytes())
            buf = outer.get(f, {}).get("buf")
            if isinstance(buf, torch.Tensor):
                h.update(buf.float().contiguous().numpy().tobytes())
            out.append((int(f), int(rounds.get(str(f), -1)), h.hexdigest()[:16]))
        return tuple(out)
    except Exception as exc:
        raise StateError(f"state blob does not load: {exc}") from None


def agreed(blobs: dict[str, bytes], fragments: set[int] | None = None) -> tuple[str, bytes, int]:
    """The blob of a donor whose state at least one other donor matches exactly (fingerprint), the
    fingerprint most donors share winning, and how many donors share it; StateError if no two agree. A lying donor is
    then outvoted by honest ones, though not by a colluding majority (docs/swarm.md)."""
    prints = {who: fingerprint(blob, fragments) for who, blob in blobs.items()}
    counts: dict[tuple, int] = {}
    for p in prints.values():
        counts[p] = counts.get(p, 0) + 1
    best = max(counts.items(), key=lambda kv: (kv[1], sum(r for _, r, _ in kv[0])))
    if best[1] < 2:
        raise StateError(f"the {len(blobs)} donors' states all differ (rounds in flight, or a donor lies); retrying")
    who = next(w for w, p in prints.items() if p == best[0])
    liars = [w[-8:] for w, p in prints.items() if p != best[0]]
    if liars:
        log.warning(
            "donor(s) %s disagree with the majority of %d; their state is ignored", ", ".join(liars), best[1])
    return who, blobs[who], best[1]


def rejoin(worker: Worker, blob: bytes) -> None:
    """A peer resumed from its checkpoint joins a live swarm: it takes the swarm's shared state
    (global parameters, outer momentum, step and round counters: the schedule's place) from the
    donor's full snapshot, and keeps its own — the replica's progress since its last sync (rebased
    as in `catch_up`), inner moments, error-feedback residuals, token counts, and (peer.py) its
    data position."""
    state = _load(worker, blob)
    glob = [state["global"].get(i) for i in range(len(worker.global_params))]
    if any(g is None for g in glob):
        raise StateError("the donor sent a partial state to a rejoining peer")
    with worker.lock:
        for f, new in enumerate(glob):
            new = _here(worker, new)
            worker.views[f].write(worker.views[f].read() + (new - worker.global_params[f]))
            worker.global_params[f] = new
            worker.outer[f].load_state_dict(state["outer"][f])
        worker.applied_rounds = {int(k): int(v) for k, v in state["applied_rounds"].items()}
        worker.step = int(state["step"])


def worker_state(worker: Worker) -> dict:
    """Everything of a worker, for a checkpoint (checkpoint.py): the shareable state plus what is
    this peer's own — its replica, error-feedback residuals and counters. Taken on the training
    thread between steps, so nothing changes under it; the lock keeps a newcomer's snapshot out.
    A mean still in flight cannot be resumed: it is saved as a failed round (its tokens and its
    residual go to the fragment's next Δ, and the fragment is marked missed, to catch up)."""
    with worker.lock:
        residuals = None if worker.residuals is None else [_host(r) for r in worker.residuals]
        tokens_since = list(worker.tokens_since)
        for f, sync in worker.in_flight.items():
            tokens_since[f] += int(sync.weight)
            if sync.residual_before is not None and residuals is not None:
                residuals[f] = _host(sync.residual_before)
        return {
            "format": FORMAT,
            "step": worker.step,
            "global": {i: _host(g) for i, g in enumerate(worker.global_params)},
            "outer": {i: o.state_dict() for i, o in enumerate(worker.outer)},
            "applied_rounds": {str(k): v for k, v in worker.applied_rounds.items()},
            "inner": copy.deepcopy(worker.inner.opt.state_dict()),
            "replica": [_host(v.read()) for v in worker.views],
            "residuals": residuals,
            "missed": sorted(worker.missed | set(worker.in_flight)),
            "counters": {"tokens": worker.tokens, "tokens_since": tokens_since,
                         "skipped_rounds": worker.skipped_rounds, "bytes_sent": worker.bytes_sent,
                         "peak_sync_bytes": worker.peak_sync_bytes,
                         "peak_fragment_sync_bytes": worker.peak_fragment_sync_bytes,
                         "sync_bytes": {str(k): list(v) for k, v in worker.sync_bytes.items()}},
        }


def load_worker_state(worker: Worker, state: dict) -> None:
    """The inverse of `worker_state`, on a worker built from the same config (checked here by shape)."""
    _check(worker, state)
    n = len(worker.global_params)
    if len(state["global"]) != n or len(state["replica"]) != n or len(state["outer"]) != n:
        raise StateError(f"the checkpoint holds {len(state['global'])} fragments, this peer's model {n}")
    for f, flat in enumerate(state["replica"]):
        if flat.shape != worker.global_params[f].shape:
            raise StateError("the checkpoint's replica does not match this peer's model: is the config the same?")
    c = state["counters"]
    with worker.lock:
        worker.step = int(state["step"])
        worker.global_params = [_here(worker, state["global"][i]) for i in range(n)]
        for i, outer in enumerate(worker.outer):
            outer.load_state_dict(state["outer"][i])
        worker.inner.opt.load_state_dict(state["inner"])
        worker.applied_rounds = {int(k): int(v) for k, v in state["applied_rounds"].items()}
        for view, flat in zip(worker.views, state["replica"]):
            view.write(flat.float())
        if worker.residuals is not None:  # a run without error feedback before starts with none to carry
            saved = state["residuals"]
            worker.residuals = ([_here(worker, r) for r in saved] if saved
                                else [torch.zeros_like(r) for r in worker.residuals])
        worker.missed = {int(f) for f in state["missed"]}
        worker.tokens, worker.tokens_since = int(c["tokens"]), [int(t) for t in c["tokens_since"]]
        worker.skipped_rounds, worker.bytes_sent = int(c["skipped_rounds"]), int(c["bytes_sent"])
        worker.peak_sync_bytes = int(c["peak_sync_bytes"])
        worker.peak_fragment_sync_bytes = int(c["peak_fragment_sync_bytes"])
        worker.sync_bytes = {(int(k) if k.isdigit() else k): [int(x) for x in v] for k, v in c["sync_bytes"].items()}
        worker.in_flight.clear()


def digest(blob: bytes) -> bytes:
    return hashlib.sha256(blob).digest()


async def download_state(stub, caller: pb.Caller, timeout_s: float, max_bytes: int,
                         fragments: set[int] | None = None) -> bytes:
    """Stream a peer's state; raises StateError on a short, oversized or corrupt download."""
    chunks, total, expected = [], 0, None
    request = pb.StateRequest(caller=caller, fragments=sorted(fragments or ()))
    call = stub.DownloadState(request, timeout=timeout_s)
    try:
        async for chunk in call:
            if expected is None:
                expected, sha = chunk.total_bytes, chunk.sha256
                if expected > max_bytes:
                    raise StateError(f"the donor offers {expected:,} bytes of state, more than {max_bytes:,}")
            chunks.append(chunk.data)
            total += len(chunk.data)
            if total > expected:
                raise StateError(f"the donor sent more than the {expected:,} bytes it announced")
    except grpc.aio.AioRpcError as exc:
        raise StateError(f"download failed: {exc.code().name}: {exc.details()}") from None
    except LibP2PError as exc:
        raise StateError(f"download failed: {exc}") from None
    except asyncio.CancelledError:
        call.cancel()
        raise
    blob = b"".join(chunks)
    if expected is None or len(blob) != expected or digest(blob) != sha:
        raise StateError(f"downloaded state fails its check ({len(blob):,} of {expected or 0:,} bytes, sha256 "
                         f"{'ok' if expected is not None and digest(blob) == sha else 'mismatch'})")
    return blob
