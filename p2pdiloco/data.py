"""Tokens in, batches out: byte-level text, pre-tokenized token files, validation split, worker shards.

Sources, in `DataConfig.paths`:
- text files or folders (every non-hidden file under a folder that has no NUL byte in its first 4 KiB),
  read as bytes: token = byte value (vocabulary 256), files joined by a NUL byte;
- pre-tokenized token files, read by memory map: `.npy` (any integer dtype) or raw `.bin`
  (`token_dtype`, uint16 by default).
  A folder of them (what `p2pdiloco tokenize` writes) stands for its token files, in name order.
With a `tokenizer` (a tokenizer.json), text is encoded with it instead of read as bytes, each file a
document ended by the tokenizer's end-of-text token (tokenizer.py); token files made by
`p2pdiloco tokenize` with another tokenizer (their folder's meta.json says which) are refused.
With no paths, the default corpus is the `.py` sources of the running interpreter's standard
library: present on every machine, no download.

The stream is cut into windows of seq_len + 1 tokens. Windows are grouped in chunks of 64 and each
chunk goes to validation with probability val_fraction (seeded), so validation is spread over the
whole corpus. Training windows are dealt to M workers as disjoint shards: `iid` deals a seeded
permutation round-robin; `non_iid` gives each worker a contiguous run of the corpus (other modules,
other styles). Each worker walks its shard in a fresh seeded order every epoch.
"""
from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

CHUNK_WINDOWS = 64
TOKEN_SUFFIXES = (".npy", ".bin")


@dataclass(frozen=True)
class DataConfig:
    paths: tuple[str, ...] = ()
    seq_len: int = 128
    val_fraction: float = 0.02
    shards: str = "iid"
    seed: int = 0
    token_dtype: str = "uint16"
    tokenizer: str = ""  # a tokenizer.json; "" reads text as bytes

    def validate(self) -> "DataConfig":
        if self.seq_len < 1:
            raise ValueError(f"data.seq_len must be at least 1, got {self.seq_len}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.shards not in ("iid", "non_iid"):
            raise ValueError(f"data.shards '{self.shards}' is unknown; use 'iid' or 'non_iid'")
        if self.token_dtype not in ("uint8", "uint16", "int32", "uint32", "int64"):
            raise ValueError(f"data.token_dtype '{self.token_dtype}' is unknown; use uint8, uint16, int32, uint32 or int64")
        for p in self.paths:
            if not Path(p).exists():
                raise ValueError(f"data.paths: '{p}' does not exist; give an existing text file, folder, "
                                 f"or .npy/.bin token file")
        if self.tokenizer:
            from .tokenizer import load_tokenizer
            load_tokenizer(self.tokenizer)  # a missing or broken file is said now
        return self


def default_corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not name.startswith(".") and p.is_file():
                with open(p, "rb") as f:
                    if b"\0" not in f.read(4096):
                        found.append(p)
    return found


def _token_folder(path: Path) -> list[Path] | None:
    """The token files of a folder that holds token files and nothing else but meta.json; else None."""
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    tokens = [p for p in files if p.suffix in TOKEN_SUFFIXES]
    return tokens if tokens and len(tokens) == len([p for p in files if p.name != "meta.json"]) else None


def _check_shard_tokenizer(folder: Path, tokenizer: str) -> None:
    import json

    from .tokenizer import fingerprint
    meta = folder / "meta.json"
    if not meta.is_file():
        return
    made_with = json.loads(meta.read_text()).get("tokenizer")
    if tokenizer and made_with and made_with != fingerprint(tokenizer):
        raise ValueError(f"data.paths: the shards in '{folder}' were made with another tokenizer "
                         f"(fingerprint {made_with}) than data.tokenizer '{tokenizer}' ({fingerprint(tokenizer)}); "
                         f"give the tokenizer they were made with, or tokenize the text again")


def _encode_text(files: list[Path], tokenizer_path: str) -> np.ndarray:
    from .tokenizer import encode_documents, load_tokenizer
    docs = (f.read_text("utf-8", errors="replace") for f in files)
    parts = list(encode_documents(load_tokenizer(tokenizer_path), docs))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


class TokenShards:
    """Several memory-mapped token files seen as one stream without reading them into memory: what
    Corpus needs of an array (length, dtype, max, slices, which may span two files)."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = arrays
        self.starts = np.cumsum([0] + [len(a) for a in arrays])
        self.dtype = np.result_type(*arrays)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def max(self):
        return max(a.max() for a in self.arrays if len(a))

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError("TokenShards takes contiguous slices only")
        parts, first = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        for i in range(max(first, 0), len(self.arrays)):
            lo, hi = max(start - self.starts[i], 0), min(stop - self.starts[i], len(self.arrays[i]))
            if self.starts[i] >= stop:
                break
            if hi > lo:
                parts.append(np.asarray(self.arrays[i][lo:hi], dtype=self.dtype))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)


def load_tokens(cfg: DataConfig) -> np.ndarray:
    """The whole token stream (a memory map for token files; in memory for text: bytes, or the
    tokenizer's ids)."""
    paths = []
    for p in map(Path, cfg.paths):
        in_folder = _token_folder(p)
        if in_folder is not None:
            _check_shard_tokenizer(p, cfg.tokenizer)
        paths.extend(in_folder or [p])
    token_files = [p for p in paths if p.suffix in TOKEN_SUFFIXES and p.is_file()]
    if token_files and len(token_files) != len(paths):
        raise ValueError("data.paths mixes token files (.npy/.bin) with text; give one kind")
    if token_files:
        arrays = [np.load(p, mmap_mode="r") if p.suffix == ".npy" else np.memmap(p, dtype=cfg.token_dtype, mode="r")
                  for p in token_files]
        for p, a in zip(token_files, arrays):
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"data.paths: token file '{p}' must hold a 1-D integer array, got {a.dtype} {a.shape}")
        tokens = arrays[0] if len(arrays) == 1 else TokenShards(arrays)
    else:
        files = default_corpus_files() if not paths else [f for p in paths for f in _text_files(p)]
        if cfg.tokenizer:
            tokens = _encode_text(files, cfg.tokenizer)
        else:
            blob = b"\0".join(f.read_bytes() for f in files)
            tokens = np.frombuffer(blob, dtype=np.uint8)
    if len(tokens) < 2 * (cfg.seq_len + 1):
        where = ", ".join(cfg.paths) or "the default corpus"
        raise ValueError(f"data.paths: {where} holds {len(tokens)} tokens, fewer than two windows of "
                         f"data.seq_len + 1 = {cfg.seq_len + 1}; add text or lower data.seq_len")
    return tokens


@dataclass
class Corpus:
    cfg: DataConfig
    tokens: np.ndarray
    train_windows: np.ndarray = field(init=False)
    val_windows: np.ndarray = field(init=False)

    def __post_init__(self):
        n_windows = (len(self.tokens) - 1) // self.cfg.seq_len
        chunk = np.arange(n_windows) // CHUNK_WINDOWS
        rng = np.random.default_rng([self.cfg.seed, 7])
        is_val = rng.random(chunk[-1] + 1) < self.cfg.val_fraction
        if is_val.all() or not is_val.any():  # tiny corpora: keep at least one chunk on each side
            is_val[:] = False
            is_val[-1] = True
        self.val_windows = np.flatnonzero(is_val[chunk])
        self.train_windows = np.flatnonzero(~is_val[chunk])

    @classmethod
    def load(cls, cfg: DataConfig) -> "Corpus":
        return cls(cfg.validate(), load_tokens(cfg))

    def batch(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.cfg.seq_len
        rows = np.stack([np.asarray(self.tokens[w * s: w * s + s + 1], dtype=np.int64) for w in windows])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def shard(self, worker: int, workers: int) -> np.ndarray:
        if len(self.train_windows) < workers:
            raise ValueError(f"the corpus has {len(self.train_windows)} training windows, fewer than "
                             f"{workers} workers; add data or lower data.seq_len")
        if self.cfg.shards == "iid":
            perm = np.random.default_rng([self.cfg.seed, 11]).permutation(self.train_windows)
            return perm[worker::workers]
        return np.array_split(self.train_windows, workers)[worker]

    def val_batches(self, batch_size: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        order = np.random.default_rng([self.cfg.seed, 13]).permutation(self.val_windows)
        order = order[: batch_size * max_batches]
        return [self.batch(order[i: i + batch_size]) for i in range(0, len(order), batch_size)]


class ShardSampler:
    """A worker's endless, deterministic walk over its shard: a fresh seeded order every epoch."""

    def __init__(self, corpus: Corpus, worker: int, workers: int, batch_size: int, stream: int | None = None):
        # `stream` seeds the order instead of the worker index: a swarm peer without a fixed shard
        # walks all the data in an order of its own.
        self.corpus, self.batch_size, self.worker = corpus, batch_size, worker if stream is None else stream
        self.windows = corpus.shard(worker, workers)
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> np.ndarray:
        return np.random.default_rng([self.corpus.cfg.seed, 17, self.worker, self.epoch]).permutation(self.windows)

    def state(self) -> dict:
        """Where the walk is (a checkpoint's data position): the order's seed, epoch and position."""
        return {"stream": int(self.worker), "epoch": self.epoch, "pos": self.pos, "windows": len(self.windows)}

    def load_state(self, state: dict) -> None:
        """Continue a walk saved by `state()`: the next batch is the one that walk would have drawn."""
        if int(state["windows"]) != len(self.windows):
            raise ValueError(f"the saved data position is in a shard of {state['windows']} windows, this one has "
                             f"{len(self.windows)}: the data, --seq-len, --shard or --workers changed")
        self.worker, self.epoch, self.pos = int(state["stream"]), int(state["epoch"]), int(state["pos"])
        self._order = self._shuffle()
        if not 0 <= self.pos <= len(self._order):
            raise ValueError(f"the saved data position {self.pos} is outside the shard's {len(self._order)} windows")

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        picked = []
        while len(picked) < self.batch_size:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            take = self._order[self.pos: self.pos + self.batch_size - len(picked)]
            picked.extend(take)
            self.pos += len(take)
        return self.corpus.batch(np.asarray(picked))
