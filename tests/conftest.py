import random

import pytest

from p2pdiloco.data import Corpus, DataConfig

WORDS = ("def class return import self value yield while for if else lambda with as try except "
         "the of and to in is that for it as was with be by on not he this are or his from").split()


def make_text(seed: int = 0, n_words: int = 40_000) -> str:
    rng = random.Random(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(4, 12):
            lines.append("    " * rng.randint(0, 2) + " ".join(line))
            line = []
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_text())
    return path


@pytest.fixture(scope="session")
def small_corpus(text_file):
    return Corpus.load(DataConfig(paths=(str(text_file),), seq_len=32))


@pytest.fixture
def swarm(tmp_path):
    """Start real peer processes; every process group they made is killed when the test ends."""
    from peers import Swarm

    s = Swarm(tmp_path)
    try:
        yield s
    finally:
        s.close()
