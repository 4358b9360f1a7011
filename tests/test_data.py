"""Corpus loading, validation split, shards, token files, and bad data paths."""
import numpy as np
import pytest

from p2pdiloco.data import Corpus, DataConfig, ShardSampler, default_corpus_files


def test_default_corpus_is_the_stdlib():
    files = default_corpus_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)


def test_split_and_shards_are_disjoint_and_deterministic(small_corpus):
    c = small_corpus
    assert len(set(c.val_windows) & set(c.train_windows)) == 0
    assert len(c.val_windows) + len(c.train_windows) == (len(c.tokens) - 1) // c.cfg.seq_len
    shards = [c.shard(w, 4) for w in range(4)]
    assert sum(len(s) for s in shards) == len(c.train_windows)
    assert len(set().union(*map(set, shards))) == len(c.train_windows)
    assert all(np.array_equal(a, b) for a, b in zip(shards, [c.shard(w, 4) for w in range(4)]))


def test_non_iid_shards_are_contiguous(text_file):
    c = Corpus.load(DataConfig(paths=(str(text_file),), seq_len=32, shards="non_iid"))
    shards = [c.shard(w, 3) for w in range(3)]
    assert all(np.all(np.diff(s) > 0) for s in shards)
    assert shards[0].max() < shards[1].min() < shards[2].min()


def test_sampler_is_deterministic_and_wraps(small_corpus):
    a = ShardSampler(small_corpus, 1, 2, batch_size=7)
    b = ShardSampler(small_corpus, 1, 2, batch_size=7)
    n = len(a.windows) // 7 + 2  # past one epoch
    for _ in range(n):
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert xa.shape == (7, 32) and np.array_equal(xa[:, 1:], ya[:, :-1])
    assert a.epoch >= 1


def test_token_files(tmp_path):
    tokens = (np.arange(20_000) % 1000).astype(np.uint16)
    np.save(tmp_path / "t.npy", tokens)
    tokens.tofile(tmp_path / "t.bin")
    for name in ("t.npy", "t.bin"):
        c = Corpus.load(DataConfig(paths=(str(tmp_path / name),), seq_len=16))
        x, y = c.batch(c.train_windows[:2])
        assert int(x.max()) < 1000 and np.array_equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="mixes token files"):
        (tmp_path / "a.txt").write_text("hello " * 100)
        Corpus.load(DataConfig(paths=(str(tmp_path / "t.npy"), str(tmp_path / "a.txt"))))


def test_folder_skips_binary_and_hidden(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 200)
    (tmp_path / ".hidden").write_text("zzz " * 200)
    (tmp_path / "blob.bin.dat").write_bytes(b"\0\1\2" * 100)
    c = Corpus.load(DataConfig(paths=(str(tmp_path),), seq_len=8))
    assert bytes(c.tokens.tobytes()) == b"alpha " * 200


def test_missing_and_empty_corpus(tmp_path):
    with pytest.raises(ValueError, match="data.paths: '.*nope' does not exist"):
        Corpus.load(DataConfig(paths=(str(tmp_path / "nope"),)))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="holds 0 tokens.*add text or lower data.seq_len"):
        Corpus.load(DataConfig(paths=(str(tmp_path / "empty.txt"),)))
    with pytest.raises(ValueError, match="data.seq_len"):
        DataConfig(seq_len=0).validate()
