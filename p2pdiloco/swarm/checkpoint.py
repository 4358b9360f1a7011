"""Checkpoints: a peer's whole state on disk, written atomically while it trains, and read back by
`--resume` so that a run survives the whole swarm stopping.

What one holds (a dict of tensors and plain values, read back with `torch.load(weights_only=True)`):
the worker's state (state.py `worker_state`: global parameters, outer momentum, inner moments,
replica, error-feedback residuals, step/token/round counters), the data position (the sampler's
order, epoch and position: a resumed peer neither repeats nor skips data), the run's config (a
checkpoint of another config is refused), and `model`, the global parameters as a plain state dict
for tools that only want the model.

Where: `<checkpoint-dir>/<run id>/<peer id>.pt`. Each file is a *slot* that one live peer holds
(an flock on `<file>.lock`, released by the kernel however the peer ends): `--resume auto` takes
the newest slot nobody holds — this peer's own with a stable `--identity` — and keeps writing it,
so peers that share a folder (docker's volume) never resume from the same file.

Writes are atomic: the file is written beside its slot under a temporary name, fsynced, renamed
over the slot (os.replace), and the folder is fsynced. A kill -9 at any moment leaves the previous
checkpoint or the new one in place, never a torn file; temporary files (`.*.tmp`) are never read.
Periodic ones are copied on the training thread (clones, no I/O) and serialized on a writer thread.
"""
from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..simulate import SimConfig, _jsonable
from ..streaming import Worker
from .config import SwarmConfig
from .records import describe_config
from .state import StateError, load_worker_state, worker_state

log = logging.getLogger("p2pdiloco.checkpoint")

KIND = "p2pdiloco-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here; the message says what to do."""


def run_dir(swarm: SwarmConfig) -> Path:
    return Path(swarm.checkpoint_dir) / swarm.run_id


class Slot:
    """The right to write one checkpoint file: an exclusive flock on its `.lock` sidecar (the file
    itself is replaced on every write, so its own lock would not outlive a write)."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    @classmethod
    def claim(cls, path: Path) -> "Slot | None":
        """The slot, or None if a live process holds it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(path, fd)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def identity_peer_id(identity_path: str) -> str | None:
    """The peer id a `--identity` key file gives (None if there is no such file yet)."""
    if not identity_path or not Path(identity_path).exists():
        return None
    from hivemind.p2p import PeerID
    return PeerID.from_identity(Path(identity_path).read_bytes()).to_base58()


@dataclass
class Resumed:
    path: Path
    slot: Slot
    data: dict  # the loaded checkpoint; dropped once applied


def open_for_resume(cfg: SimConfig, swarm: SwarmConfig) -> Resumed | None:
    """`--resume PATH|auto`: find, claim, load and check the checkpoint; None if `auto` finds none."""
    if swarm.resume == "auto":
        folder = run_dir(swarm)
        mine = identity_peer_id(swarm.identity_path)
        if mine:  # a stable identity resumes its own file, nobody else's
            candidates = [folder / f"{mine}.pt"]
        else:
            candidates = sorted(folder.glob("*.pt"), key=lambda p: p.stat().st_mtime, reverse=True)
        for path in candidates:
            if path.exists():
                slot = Slot.claim(path)
                if slot is not None:
                    break
        else:
            return None
    else:
        path = Path(swarm.resume)
        slot = Slot.claim(path)
        if slot is None:
            raise CheckpointError(f"--resume {path}: a live peer holds this checkpoint; resume another one")
    try:
        data = read(path)
        check_config(data, cfg, swarm, path)
    except BaseException:
        slot.release()
        raise
    return Resumed(path, slot, data)


def read(path: Path) -> dict:
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} does not load ({type(exc).__name__}: {exc}); "
                              f"resume from another one or start without --resume") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise CheckpointError(f"{path} is not a p2pdiloco checkpoint (written before resuming existed?); "
                              f"start without --resume")
    if data.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {data.get('version')}, this p2pdiloco "
                              f"reads {VERSION}; resume it with the version that wrote it")
    return data


# What must be the same to resume: what the run's peers agree on (describe_config), and what the
# data position means. Local choices (batch size, inner lr, τ, α, timeouts) may change on restart.
_DATA_FIELDS = ("paths", "seq_len", "val_fraction", "shards", "seed", "token_dtype")


def check_config(data: dict, cfg: SimConfig, swarm: SwarmConfig, path: Path) -> None:
    saved = json.loads(data["settings"])
    mine = _jsonable(asdict(cfg))
    diffs = [f"{k}: {saved.get(k)!r} there, {mine.get(k)!r} here" for k in ("model", "seed") if saved.get(k) != mine.get(k)]
    diffs += [f"data.{k}: {saved['data'].get(k)!r} there, {mine['data'][k]!r} here" for k in _DATA_FIELDS
              if saved["data"].get(k) != mine["data"][k]]
    if saved["inner"].get("optimizer") != mine["inner"]["optimizer"]:
        diffs.append(f"inner.optimizer: {saved['inner'].get('optimizer')!r} there, {mine['inner']['optimizer']!r} here")
    if data["config"] != describe_config(cfg):
        diffs.insert(0, f"the run's config: {data['config']} there, {describe_config(cfg)} here")
    if data["run_id"] != swarm.run_id:
        diffs.insert(0, f"run id: '{data['run_id']}' there, '{swarm.run_id}' here")
    if diffs:
        raise CheckpointError(f"checkpoint {path} is of another config ({'; '.join(diffs)}); start this peer "
                              f"with the options that wrote it, or resume another checkpoint")


def capture(worker: Worker, sampler, cfg: SimConfig, swarm: SwarmConfig, peer_id: str,
            clock_left_s: float | None) -> dict:
    """Everything, copied (training thread, between steps); `serialize` does the slow part."""
    model = worker.model
    return {
        "kind": KIND, "version": VERSION, "run_id": swarm.run_id, "peer_id": peer_id, "written_at": time.time(),
        "config": describe_config(cfg), "settings": json.dumps(_jsonable(asdict(cfg)), sort_keys=True),
        "worker": worker_state(worker), "data": sampler.state(), "clock_left_s": clock_left_s,
        # For the `model` export: the global parameters (the replica's while data-parallel).
        "_export": {"data_parallel": worker.data_parallel_now,
                    "names": [list(f.param_names) for f in worker.fragments],
                    "params": {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()},
                    "buffers": {n: b.detach().cpu().clone() for n, b in model.state_dict().items()
                                if n not in dict(model.named_parameters())}},
    }


def serialize(ckpt: dict) -> bytes:
    """The checkpoint's bytes, with `model` (name → tensor) built from the copied flat vectors."""
    ckpt = dict(ckpt)
    export = ckpt.pop("_export")
    w = ckpt["worker"]
    flats = w["replica"] if export["data_parallel"] else [w["global"][i] for i in range(len(w["global"]))]
    model = {}
    for names, flat in zip(export["names"], flats):
        offset = 0
        for n in names:
            shape, dtype = export["params"][n]
            numel = int(torch.Size(shape).numel())
            model[n] = flat[offset: offset + numel].view(shape).to(dtype)
            offset += numel
    model.update(export["buffers"])
    ckpt["model"] = model
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def write_atomic(path: Path, blob: bytes) -> None:
    """Temporary file, fsync, rename over `path`, fsync the folder: `path` is the old file or the
    new one whatever happens, and the new one survives a power cut once this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files of this slot left by a writer killed mid-write (the slot is ours: no live writer)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def apply(data: dict, worker: Worker, sampler) -> None:
    try:
        load_worker_state(worker, data["worker"])
    except (StateError, KeyError, TypeError) as exc:
        raise CheckpointError(f"the checkpoint does not fit this peer's model ({exc}); is the config the same?") from None
    sampler.load_state(data["data"])


class Writer:
    """One checkpoint at a time on a thread of its own, so the training loop only pays for the copy."""

    def __init__(self, path: Path, out):
        self.path, self.out = path, out
        self._thread: threading.Thread | None = None

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, ckpt: dict) -> None:
        assert not self.busy()
        self._thread = threading.Thread(target=self._write, args=(ckpt,), name="p2pdiloco-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def write_now(self, ckpt: dict) -> Path:
        self.wait()
        write_atomic(self.path, serialize(ckpt))
        return self.path

    def _write(self, ckpt: dict) -> None:
        t0 = time.perf_counter()
        try:
            blob = serialize(ckpt)
            write_atomic(self.path, blob)
        except Exception as exc:  # a failed periodic checkpoint leaves the previous one; training goes on
            log.error("could not write the checkpoint %s: %s", self.path, exc)
            return
        self.out(f"[peer] checkpoint at step {ckpt['worker']['step']}: {self.path} ({len(blob):,} bytes, "
                 f"{time.perf_counter() - t0:.1f}s)", flush=True)
