"""Tokenizers: a local `tokenizer.json` (Hugging Face `tokenizers`), and training a small one here.

Without `--tokenizer`, text is read as bytes (vocabulary 256, data.py). With one, the model's
vocabulary is the tokenizer's, text is encoded with it (on the fly in data.py, or once into token
shards with `p2pdiloco tokenize`, shards.py), and documents are separated by its end-of-text token.

`p2pdiloco train-tokenizer` trains a byte-level BPE (GPT-2's scheme: any text encodes, and decodes
back to itself) with `tokenizers`' BpeTrainer, on the default corpus or the given inputs: no download.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

END_OF_TEXT = "<|endoftext|>"
# The end-of-document tokens of common tokenizers, in the order they are looked for.
EOS_NAMES = (END_OF_TEXT, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
    """A `tokenizers.Tokenizer` from a tokenizer.json (or a folder holding one)."""
    from tokenizers import Tokenizer
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"tokenizer: '{path}' is not a tokenizer.json file (or a folder with one); make one "
                         f"with `p2pdiloco train-tokenizer --out tokenizer.json`")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises its own Exception type for a bad file
        raise ValueError(f"tokenizer: '{p}' does not load as a Hugging Face tokenizer.json: {exc}") from None


def vocab_size(path: str) -> int:
    return load_tokenizer(path).get_vocab_size(with_added_tokens=True)


def eos_id(tokenizer) -> int | None:
    for name in EOS_NAMES:
        i = tokenizer.token_to_id(name)
        if i is not None:
            return i
    return None


def token_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= 1 << 16 else np.dtype(np.uint32)


def fingerprint(path: str) -> str:
    """What must be equal for two peers to read text the same way: the tokenizer's content (hashed
    once per content: a peer asks for it several times at start)."""
    p = Path(path)
    p = p / "tokenizer.json" if p.is_dir() else p
    st = p.stat()
    return _fingerprint(str(p), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=16)
def _fingerprint(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def encode_documents(tokenizer, docs: Iterable[str], batch: int = 256) -> Iterator[np.ndarray]:
    """Each document's ids followed by the end-of-text id (if the tokenizer has one), in batches
    (`encode_batch` runs on all cores)."""
    eos = eos_id(tokenizer)
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    pending: list[str] = []

    def flush():
        for enc in tokenizer.encode_batch(pending, add_special_tokens=False):
            ids = enc.ids + ([eos] if eos is not None else [])
            yield np.asarray(ids, dtype=dtype)
        pending.clear()

    for doc in docs:
        pending.append(doc)
        if len(pending) >= batch:
            yield from flush()
    if pending:
        yield from flush()


def train_tokenizer(docs: Iterable[str], vocab: int, out: str, total: int | None = None):
    """A byte-level BPE of `vocab` ids (the end-of-text token included), saved to `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if not 257 <= vocab <= 1 << 20:
        raise ValueError(f"--vocab-size must be in [257, 1048576] (a byte-level BPE starts from 256 bytes), got {vocab}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[END_OF_TEXT], show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer, length=total)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    load_tokenizer.cache_clear()
    return tok
