"""Golden regression: a few steps of the tiny model must keep producing the same numbers.

A change to numerics (model, codecs, optimizers, schedule, data order) shows up here. If the change
is intended, regenerate with `P2PDILOCO_UPDATE_GOLDEN=1 ./scripts/test tests/test_golden.py` and
say why in the commit message.
"""
import json
import os
from pathlib import Path

import pytest
import torch

from p2pdiloco.aggregation import AggregateConfig
from p2pdiloco.data import Corpus, DataConfig
from p2pdiloco.inner import InnerConfig
from p2pdiloco.simulate import SimConfig, Simulation
from p2pdiloco.streaming import StreamingConfig

from conftest import make_text

GOLDEN = Path(__file__).parent / "golden" / "tiny_streaming.json"
CASES = {
    "data_parallel": StreamingConfig(mode="data_parallel"),
    "streaming_overlap_e3m0": StreamingConfig(H=4, fragments=2, tau=1, alpha=0.5, codec="e3m0"),
}


def _trace(tmp_path, streaming):
    (tmp_path / "golden.txt").write_text(make_text(seed=42, n_words=20_000))
    data = DataConfig(paths=(str(tmp_path / "golden.txt"),), seq_len=64)
    cfg = SimConfig(model="tiny", workers=2, steps=8, batch_size=2, eval_batches=2, data=data,
                    inner=InnerConfig(lr=2e-3, warmup_steps=2), streaming=streaming,
                    aggregate=AggregateConfig(method="mean"))  # the pinned numbers are the plain mean's
    torch.set_num_threads(1)  # reductions in a fixed order
    sim = Simulation(cfg, Corpus.load(data))
    losses = [sim.train_step() for _ in range(cfg.steps)]
    flat = torch.cat([p.detach().reshape(-1) for p in sim.global_model().parameters()])
    return {"train_losses": losses, "eval_loss": sim.evaluate(),
            "global_sum": float(flat.double().sum()), "global_norm": float(flat.double().norm()),
            "bytes_sent": sim.workers[0].bytes_sent}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(tmp_path, case):
    threads = torch.get_num_threads()
    try:
        got = _trace(tmp_path, CASES[case])
    finally:
        torch.set_num_threads(threads)
    if os.environ.get("P2PDILOCO_UPDATE_GOLDEN") == "1":
        data = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        data[case] = got
        GOLDEN.write_text(json.dumps(data, indent=2) + "\n")
        pytest.skip("golden values regenerated")
    want = json.loads(GOLDEN.read_text())[case]
    assert got["bytes_sent"] == want["bytes_sent"]
    assert got["train_losses"] == pytest.approx(want["train_losses"], rel=1e-4)
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-4)
    assert got["global_sum"] == pytest.approx(want["global_sum"], rel=1e-4, abs=1e-3)
    assert got["global_norm"] == pytest.approx(want["global_norm"], rel=1e-5)
