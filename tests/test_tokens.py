"""Tokenizers and token shards: train a BPE here, round-trip text, tokenize JSONL / Parquet / text into
shards that `--data` reads, and refuse shards made with another tokenizer."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from p2pdiloco import shards
from p2pdiloco.data import Corpus, DataConfig
from p2pdiloco.tokenizer import END_OF_TEXT, load_tokenizer, vocab_size

pytestmark = pytest.mark.timeout(300)

TEXT = "def f(x):\n    return x  # ünïcödé, emoji 🙂, tabs\t and  spaces\n"


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    shards.train([str(text_file)], 400, str(out))
    return str(out)


@pytest.fixture(scope="module")
def jsonl_file(tmp_path_factory, text_file):
    lines = text_file.read_text().splitlines()
    path = tmp_path_factory.mktemp("jsonl") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(0, len(lines), 25):
            f.write(json.dumps({"id": i, "text": "\n".join(lines[i: i + 25])}) + "\n")
    return path


def test_a_trained_byte_level_bpe_round_trips_any_text(tokenizer_file):
    tok = load_tokenizer(tokenizer_file)
    assert 256 < vocab_size(tokenizer_file) <= 400
    assert tok.token_to_id(END_OF_TEXT) is not None
    for text in (TEXT, "return self value", ""):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    common = tok.encode("return self value for", add_special_tokens=False).ids
    assert len(common) < len("return self value for") / 2  # merges learnt from the corpus


def test_tokenize_jsonl_writes_shards_that_data_reads(tmp_path, tokenizer_file, jsonl_file):
    meta = shards.tokenize([str(jsonl_file)], tokenizer_file, str(tmp_path / "out"), shard_tokens=5000, progress=False)
    assert meta["documents"] == len(jsonl_file.read_text().splitlines())
    assert len(meta["shards"]) > 1 and meta["dtype"] == "uint16"
    corpus = Corpus.load(DataConfig(paths=(str(tmp_path / "out"),), seq_len=32, tokenizer=tokenizer_file))
    assert len(corpus.tokens) == meta["tokens"]
    # The shards hold the documents' ids, each followed by the end-of-text id.
    tok = load_tokenizer(tokenizer_file)
    first = json.loads(jsonl_file.read_text().splitlines()[0])["text"]
    ids = tok.encode(first, add_special_tokens=False).ids
    assert list(corpus.tokens[: len(ids) + 1]) == ids + [tok.token_to_id(END_OF_TEXT)]
    x, y = corpus.batch(np.array([0]))
    assert x.shape == (1, 32) and (x[0, 1:] == y[0, :-1]).all()


def test_text_encoded_on_the_fly_is_the_stream_its_shards_hold(tmp_path, tokenizer_file, text_file):
    shards.tokenize([str(text_file)], tokenizer_file, str(tmp_path / "out"), progress=False)
    on_the_fly = Corpus.load(DataConfig(paths=(str(text_file),), seq_len=32, tokenizer=tokenizer_file)).tokens
    sharded = Corpus.load(DataConfig(paths=(str(tmp_path / "out"),), seq_len=32, tokenizer=tokenizer_file)).tokens
    assert len(on_the_fly) > 1000 and np.array_equal(np.asarray(on_the_fly), np.asarray(sharded))


def test_tokenize_reads_parquet_and_jsonl_without_datasets_too(tmp_path, tokenizer_file, jsonl_file, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    rows = [json.loads(line) for line in jsonl_file.read_text().splitlines()]
    pq.write_table(pa.table({"body": [r["text"] for r in rows]}), tmp_path / "docs.parquet")
    with_datasets = shards.tokenize([str(tmp_path / "docs.parquet")], tokenizer_file, str(tmp_path / "a"),
                                    field="body", progress=False)
    monkeypatch.setattr(shards, "_have_datasets", lambda: False)
    without = shards.tokenize([str(tmp_path / "docs.parquet")], tokenizer_file, str(tmp_path / "b"),
                              field="body", progress=False)
    from_jsonl = shards.tokenize([str(jsonl_file)], tokenizer_file, str(tmp_path / "c"), progress=False)
    assert with_datasets["tokens"] == without["tokens"] == from_jsonl["tokens"]
    assert np.array_equal(np.load(tmp_path / "a" / "tokens-00000.npy"), np.load(tmp_path / "c" / "tokens-00000.npy"))
    with pytest.raises(ValueError, match="no text field 'text'"):
        shards.tokenize([str(tmp_path / "docs.parquet")], tokenizer_file, str(tmp_path / "d"), progress=False)


def test_shards_made_with_another_tokenizer_are_refused(tmp_path, tokenizer_file, jsonl_file, text_file):
    shards.tokenize([str(jsonl_file)], tokenizer_file, str(tmp_path / "out"), progress=False)
    other = tmp_path / "other.json"
    shards.train([str(text_file)], 300, str(other))
    with pytest.raises(ValueError, match="made with another tokenizer"):
        Corpus.load(DataConfig(paths=(str(tmp_path / "out"),), seq_len=32, tokenizer=str(other)))
    with pytest.raises(ValueError, match="already holds token shards"):
        shards.tokenize([str(jsonl_file)], tokenizer_file, str(tmp_path / "out"), progress=False)


def test_a_missing_or_broken_tokenizer_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train-tokenizer"):
        DataConfig(tokenizer=str(tmp_path / "nope.json")).validate()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="does not load"):
        DataConfig(tokenizer=str(tmp_path / "bad.json")).validate()


def test_the_cli_trains_a_tokenizer_and_tokenizes(tmp_path, text_file, jsonl_file):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "p2pdiloco.cli", *args], capture_output=True, text=True,
                              timeout=240, cwd=tmp_path)

    r = cli("train-tokenizer", str(text_file), "--out", "tok.json", "--vocab-size", "300")
    assert r.returncode == 0, r.stderr
    r = cli("tokenize", str(jsonl_file), "--tokenizer", "tok.json", "--out", "shards")
    assert r.returncode == 0, r.stderr
    assert "train on them with --data shards --tokenizer tok.json" in r.stdout
    assert "docs" in r.stderr  # the progress bar
    r = cli("tokenize", "missing.jsonl", "--tokenizer", "tok.json", "--out", "x")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_several_shards_read_as_one_stream_without_loading_them(tmp_path):
    from p2pdiloco.data import TokenShards
    stream = np.arange(1000, dtype=np.uint32) % 700
    for i, (lo, hi) in enumerate([(0, 300), (300, 301), (301, 1000)]):
        np.save(tmp_path / f"tokens-{i:05d}.npy", stream[lo:hi].astype(np.uint16))
    corpus = Corpus.load(DataConfig(paths=(str(tmp_path),), seq_len=32))
    assert isinstance(corpus.tokens, TokenShards) and len(corpus.tokens) == 1000 and corpus.tokens.max() == 699
    for lo, hi in [(0, 33), (290, 333), (299, 302), (300, 301), (960, 1000), (990, 2000)]:
        assert np.array_equal(corpus.tokens[lo:hi], stream[lo:hi]), (lo, hi)
    x, y = corpus.batch(np.arange(20))  # windows 9 and 10 span the shards
    assert x.shape == (20, 32)
    assert np.array_equal(x[9].numpy(), stream[9 * 32: 10 * 32]) and np.array_equal(y[9].numpy(), stream[9 * 32 + 1: 10 * 32 + 1])
