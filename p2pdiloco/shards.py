"""`p2pdiloco tokenize` and `p2pdiloco train-tokenizer`: text in, token shards (or a tokenizer) out.

Inputs, any mix of:
- text files, or folders of them (each file one document; hidden and binary files skipped, data.py);
- JSONL / JSON-lines files (`.jsonl`, `.json`, `.jsonl.gz`...): one record per line, its `text`
  field (`--text-field`) is a document;
- Parquet files (`.parquet`): the `text` column.
JSONL and Parquet are read with Hugging Face `datasets` (streaming: no copy in its cache) where it
is installed; otherwise JSONL with the standard library and Parquet with `pyarrow`.

Output: `DIR/tokens-00000.npy`, ... (uint16 for vocabularies up to 65,536, else uint32; at most
`--shard-tokens` tokens each), which `--data DIR` reads by memory map, and `DIR/meta.json` (the
tokenizer's fingerprint and vocabulary, so a run can refuse shards made by another tokenizer).
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .data import _text_files, default_corpus_files
from .tokenizer import encode_documents, fingerprint, load_tokenizer, token_dtype, train_tokenizer

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
META = "meta.json"


def _record_kind(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".zst", ".bz2", ".xz")]
    last = suffixes[-1] if suffixes else ""
    if last in JSON_SUFFIXES:
        return "json"
    if last == ".parquet":
        return "parquet"
    return "text"


def _have_datasets() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def _records(path: Path, kind: str, field: str) -> Iterator[str]:
    if _have_datasets():
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never ask the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import datasets
        datasets.disable_progress_bars()  # ours counts documents across every input
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", streaming=True)
        rows = iter(ds)
    elif kind == "json":
        opener = gzip.open if path.suffix == ".gz" else open
        rows = (json.loads(line) for line in opener(path, "rt", encoding="utf-8") if line.strip())
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"'{path}': reading Parquet needs `datasets` or `pyarrow`; "
                             f"pip install datasets") from None
        rows = (row for batch in pq.ParquetFile(path).iter_batches(columns=[field]) for row in batch.to_pylist())
    for i, row in enumerate(rows):
        text = row.get(field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"'{path}': record {i} has no text field '{field}' (fields: "
                             f"{', '.join(row) if isinstance(row, dict) else type(row).__name__}); "
                             f"name the field with --text-field")
        yield text


def iter_documents(inputs: list[str], field: str = "text") -> Iterator[str]:
    """Every document of the inputs, in order; with no inputs, the default corpus's files."""
    if not inputs:
        for f in default_corpus_files():
            yield f.read_text("utf-8", errors="replace")
        return
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise ValueError(f"input '{item}' does not exist; give text files or folders, .jsonl or .parquet files")
        files = _text_files(path) if path.is_dir() else [path]
        if path.is_dir():  # a folder may hold JSONL / Parquet too (binary Parquet is not in _text_files)
            files = sorted(set(files) | {f for f in path.rglob("*.parquet") if not f.name.startswith(".")})
        for f in files:
            kind = _record_kind(f)
            if kind == "text":
                yield f.read_text("utf-8", errors="replace")
            else:
                yield from _records(f, kind, field)


class ShardWriter:
    """Token arrays in, `.npy` shards of at most `shard_tokens` tokens out."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int):
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_n, self.paths, self.tokens = 0, [], 0

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_n += len(ids)
        self.tokens += len(ids)
        while self.pending_n >= self.shard_tokens:
            joined = np.concatenate(self.pending)
            self._write(joined[: self.shard_tokens])
            rest = joined[self.shard_tokens:]
            self.pending, self.pending_n = ([rest] if len(rest) else []), len(rest)

    def close(self) -> None:
        if self.pending_n:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_n = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        path = self.out / f"tokens-{len(self.paths):05d}.npy"
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, tokens.astype(self.dtype, copy=False))
        tmp.replace(path)
        self.paths.append(path)


def tokenize(inputs: list[str], tokenizer_path: str, out: str, field: str = "text",
             shard_tokens: int = 100_000_000, progress: bool = True) -> dict:
    """Encode every document of the inputs into shards under `out`; returns what meta.json says."""
    from tqdm import tqdm
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    tok = load_tokenizer(tokenizer_path)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(out_dir.glob("tokens-*.npy"))
    if stale:
        raise ValueError(f"--out {out} already holds token shards ({stale[0].name}, ...); use an empty folder")
    writer = ShardWriter(out_dir, token_dtype(vocab), shard_tokens)
    docs = 0
    with tqdm(iter_documents(inputs, field), unit=" docs", disable=not progress, desc="tokenize") as bar:
        for ids in encode_documents(tok, bar):
            writer.add(ids)
            docs += 1
            if docs % 256 == 0:
                bar.set_postfix(tokens=f"{writer.tokens:,}", refresh=False)
    writer.close()
    if not writer.tokens:
        raise ValueError("the inputs hold no documents")
    meta = {"tokenizer": fingerprint(tokenizer_path), "vocab_size": vocab, "dtype": writer.dtype.name,
            "documents": docs, "tokens": writer.tokens, "shards": [p.name for p in writer.paths]}
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def train(inputs: list[str], vocab: int, out: str, field: str = "text", max_mb: float = 0.0) -> None:
    """Train the byte-level BPE on the inputs' documents (the first `max_mb` MB of them, if set)."""
    limit = int(max_mb * 1e6) if max_mb > 0 else None

    def docs():
        seen = 0
        for doc in iter_documents(inputs, field):
            yield doc
            seen += len(doc)
            if limit is not None and seen >= limit:
                return

    train_tokenizer(docs(), vocab, out)
