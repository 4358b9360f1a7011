"""M workers in one process: the engine with the in-process averager, on identical seeds and tokens.

Every method (data-parallel, DiLoCo, Streaming DiLoCo and its variants) runs through here, so the
comparison is on equal terms: the same initial model, the same per-worker batches at every step,
the same evaluation windows. The driver runs each engine phase across all workers before the next,
which is what makes every average complete by the time a worker awaits it.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .aggregation import AggregateConfig
from .averaging import InProcessAverager
from .data import Corpus, DataConfig, ShardSampler
from .inner import InnerConfig, InnerOptimizer
from .models import build_model, model_info, model_vocab
from .outer import OuterConfig
from .streaming import StreamingConfig, Worker


@dataclass(frozen=True)
class SimConfig:
    workers: int = 4
    steps: int = 600
    batch_size: int = 16  # sequences per worker per step
    model: str = "tiny"  # a built-in size, a Hugging Face config or folder, or module:function (models.py)
    eval_every: int = 100
    eval_batches: int = 16
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)

    def validate(self) -> "SimConfig":
        for name in ("workers", "steps", "batch_size", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.data.validate()
        info = self.model_info()
        if info.max_seq_len is not None and self.data.seq_len > info.max_seq_len:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds the model's max_seq_len ({info.max_seq_len})")
        self.inner.validate()
        self.outer.validate()
        self.streaming.validate(info.n_blocks)
        self.aggregate.validate()
        return self

    @property
    def vocab_size(self) -> int | None:
        """The tokenizer's vocabulary, which the model is built for; None: the model's own."""
        if not self.data.tokenizer:
            return None
        from .tokenizer import vocab_size
        return vocab_size(self.data.tokenizer)

    def model_info(self):
        return model_info(self.model, self.vocab_size)

    def build_model(self) -> torch.nn.Module:
        """The run's initial model: the same on every peer (seeded by `seed`), on the CPU."""
        return build_model(self.model, self.vocab_size, self.seed)


def evaluate(model: torch.nn.Module, batches) -> float:
    model.eval()
    with torch.no_grad():
        device = next(model.parameters()).device
        losses = [float(model(x.to(device), y.to(device))) for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


Progress = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Simulation:
    """cfg.workers engines over one in-process averager, stepped in lock-step phases."""

    def __init__(self, cfg: SimConfig, corpus: Corpus | None = None):
        self.cfg = cfg.validate()
        if cfg.streaming.round_s:
            raise ValueError("streaming.round_s (time-budget rounds) runs on real peers (`p2pdiloco peer`); "
                             "the simulator steps its workers in lock-step")
        if cfg.streaming.tau_auto:
            raise ValueError("streaming.tau_auto (--tau auto) sizes τ to a real link's round latency (peers only); "
                             "the simulator has no link: give the τ a peer chose (its summary's `taus`) as --tau N")
        self.corpus = corpus or Corpus.load(cfg.data)
        self.base = cfg.build_model()
        _check_vocab(self.corpus, model_vocab(self.base))
        self.eval_model = copy.deepcopy(self.base)
        self.val = self.corpus.val_batches(cfg.batch_size, cfg.eval_batches)
        names = [f"worker{i}" for i in range(cfg.workers)]
        self.averager = InProcessAverager(names, cfg.aggregate)
        self.workers, self.samplers = [], []
        for i, name in enumerate(names):
            model = copy.deepcopy(self.base)
            inner = InnerOptimizer(model, cfg.inner, cfg.steps)
            self.workers.append(Worker(name, model, inner, cfg.streaming, cfg.outer, self.averager.member(name)))
            self.samplers.append(ShardSampler(self.corpus, i, cfg.workers, cfg.batch_size))
        self.step = 0

    def train_step(self) -> float:
        """One inner step on every worker, then the syncs it triggers; returns the mean train loss."""
        losses = [w.forward_backward(*s.next()) for w, s in zip(self.workers, self.samplers)]
        for w in self.workers:
            w.optimizer_step()
        for w in self.workers:
            w.send_due()
        self.step += 1
        if self.step < self.cfg.steps:
            for w in self.workers:
                w.apply_due()
        else:  # no lost work: a last sync of every fragment, then every mean lands
            for w in self.workers:
                w.send_final()
            for w in self.workers:
                w.flush()
        return float(np.mean(losses))

    def global_model(self) -> torch.nn.Module:
        return self.workers[0].load_global_into(self.eval_model)

    def evaluate(self) -> float:
        return evaluate(self.global_model(), self.val)

    def tokens(self) -> int:
        return sum(w.tokens for w in self.workers)


def run_simulation(cfg: SimConfig, corpus: Corpus | None = None, progress: Progress | None = _stderr,
                   label: str = "simulate") -> dict:
    """Train cfg.workers replicas for cfg.steps; returns the JSON-ready summary."""
    sim = Simulation(cfg, corpus)
    curve = [(0, evaluate(sim.base, sim.val))]
    start, last_report = time.perf_counter(), 0.0
    while sim.step < cfg.steps:
        loss = sim.train_step()
        if sim.step % cfg.eval_every == 0 or sim.step == cfg.steps:
            curve.append((sim.tokens(), sim.evaluate()))
        now = time.perf_counter() - start
        if progress and (now - last_report > 10 or sim.step == cfg.steps):
            last_report = now
            eta = now / sim.step * (cfg.steps - sim.step)
            progress(f"[{label}] step {sim.step}/{cfg.steps}  train loss {loss:.3f}  "
                     f"eval {curve[-1][1]:.3f}  {sim.tokens() / now:,.0f} tok/s  ETA {eta:,.0f}s")
    wall = time.perf_counter() - start
    workers = sim.workers
    return {
        "eval_loss_initial": curve[0][1],
        "eval_loss": curve[-1][1],
        "eval_curve": [{"tokens": t, "eval_loss": l} for t, l in curve],
        "tokens": sim.tokens(),
        "bytes_sent_per_worker": max(w.bytes_sent for w in workers),
        "peak_sync_bytes": max(w.peak_sync_bytes for w in workers),
        "peak_fragment_sync_bytes": max(w.peak_fragment_sync_bytes for w in workers),
        "skipped_rounds": sum(w.skipped_rounds for w in workers),
        "parameters": sim.base.num_parameters(),
        # What one average of the whole model cost a worker, for comparison with peak_sync_bytes (a
        # fragment's sync should be about 1/P of it): one gradient all-reduce, or one sync of every
        # fragment, as measured (an entropy-coded codec's sizes depend on the values).
        "full_sync_bytes": (_bytes_per_sync(workers, "grad") if cfg.streaming.mode == "data_parallel"
                            else _sum_or_none(_bytes_per_sync(workers, i) for i in range(len(workers[0].fragments)))),
        "fragments": [{"name": f.name, "numel": f.numel, "bytes_per_sync": _bytes_per_sync(workers, i)}
                      for i, f in enumerate(workers[0].fragments)],
        "wall_s": wall,
        "config": _jsonable(asdict(cfg)),
    }


def _check_vocab(corpus: Corpus, vocab: int | None) -> None:
    if vocab is None:  # a model that shows no vocabulary: its embedding will say
        return
    if corpus.tokens.dtype != np.uint8 or vocab < 256:  # bytes fit the byte vocabulary; token ids must be checked once
        top = int(corpus.tokens.max())
        if top >= vocab:
            raise ValueError(f"data.paths: token id {top} is outside the model's vocabulary of {vocab}; "
                             f"give the tokenizer the data was made with (--tokenizer), or a model with a "
                             f"larger vocab_size")


def _bytes_per_sync(workers: list, what: int | str) -> float | None:
    """The most one sync of `what` cost any worker, on average over the run; None if it never synced."""
    return max((b for b in (w.bytes_per_sync(what) for w in workers) if b is not None), default=None)


def _sum_or_none(values) -> float | None:
    values = list(values)
    return None if None in values else sum(values)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


