"""`p2pdiloco bench quality`: the five methods on identical tokens and seeds, with a plot.

Methods (all through simulate.run_simulation, so the same model init, batches and eval windows):
- data_parallel: gradients averaged every step (bf16 all-reduce bytes);
- diloco: P = 1, τ = 0, fp32 pseudo-gradients;
- streaming: P fragments, τ = 0, fp32;
- streaming_overlap_e3m0: P fragments, τ = 1, α = 0.5, 4-bit E3M0 (`--codec e3m0-huffman`: the same
  values Huffman-coded on the wire; `--tau` and `--alpha` change τ and α of this method and the next,
  and the `small` preset sets α = 0);
- streaming_overlap_e3m0_eager: the same with eager updates.
"""
from __future__ import annotations

import multiprocessing
from dataclasses import replace
from pathlib import Path

from .data import Corpus
from .simulate import SimConfig, run_simulation, write_json
from .streaming import StreamingConfig

PRESETS: dict[str, dict] = {
    # ≤ 3 minutes on 2 CPU cores for all five methods.
    "smoke": {"model": "micro", "workers": 4, "batch_size": 8, "steps": 240, "eval_every": 40,
              "eval_batches": 8, "data": {"seq_len": 64},
              "inner": {"lr": 6e-3, "warmup_steps": 20},
              "outer": {"lr": 0.7, "momentum": 0.5},
              "streaming": {"H": 20, "fragments": 2}, "aggregate": {"method": "mean"}},
    # 20.3 tokens per parameter for the 0.22M-parameter micro model: 4,320 steps × 4 workers × 2 × 128
    # tokens, about 15 minutes on 2 cores with --jobs 2. At a fixed token budget the gap to
    # data-parallel shrinks with the number of steps and syncs (16 → 2 sequences per worker at H = 10:
    # DiLoCo 1.095 → 1.029 × data-parallel), and a data-parallel warm start of the first 5% of steps
    # (as in DiLoCo's own experiments) takes another 1.8 points off; outer momentum 0.5 rather than
    # the papers' 0.9, which cost DiLoCo 10% on small-b16; and plain overlap's merge with α = 0 (take
    # the averaged global copy) rather than the paper's 0.5, which keeps half of each replica's own
    # drift and cost 1.5% here (1.034 → 1.017 × data-parallel). docs/benchmarks.md has the sweeps.
    # The eval set is 256 × 2 held-out sequences, the same 512 as small-b16's 32 × 16.
    "small": {"model": "micro", "workers": 4, "batch_size": 2, "steps": 4320, "eval_every": 240,
              "eval_batches": 256, "data": {"seq_len": 128},
              "inner": {"lr": 6e-3, "warmup_steps": 50},
              "outer": {"lr": 0.7, "momentum": 0.5},
              "streaming": {"H": 10, "fragments": 2, "dp_warmup_steps": 216, "alpha": 0.0},
              "aggregate": {"method": "mean"}},
    # The same tokens in 540 steps of 16 sequences with H = 30: the earlier `small`, kept so that
    # the lever sweeps in docs/benchmarks.md run as they did (about 12 minutes).
    "small-b16": {"model": "micro", "workers": 4, "batch_size": 16, "steps": 540, "eval_every": 30,
                  "eval_batches": 32, "data": {"seq_len": 128},
                  "inner": {"lr": 6e-3, "warmup_steps": 50},
                  "outer": {"lr": 0.7, "momentum": 0.5},
                  "streaming": {"H": 30, "fragments": 2}, "aggregate": {"method": "mean"}},
}

METHODS = ("data_parallel", "diloco", "streaming", "streaming_overlap_e3m0", "streaming_overlap_e3m0_eager")


def method_config(name: str, base: StreamingConfig) -> StreamingConfig:
    if name == "data_parallel":
        return replace(base, mode="data_parallel", dp_warmup_steps=0)
    if name == "diloco":
        return replace(base, fragments=1, tau=0, alpha=0.0, eager=False, codec="fp32")
    if name == "streaming":
        return replace(base, tau=0, alpha=0.0, eager=False, codec="fp32")
    # The 4-bit methods keep a --codec of the E3M0 family (e3m0-huffman: the same values, fewer bytes)
    # and the run's τ and α (τ = 1 and α = 0.5 unless --tau or --alpha says otherwise).
    four_bit = base.codec if base.codec.startswith("e3m0") else "e3m0"
    if name == "streaming_overlap_e3m0":
        return replace(base, eager=False, codec=four_bit)
    if name == "streaming_overlap_e3m0_eager":
        return replace(base, eager=True, codec=four_bit)
    raise ValueError(f"--methods: '{name}' is unknown; choose from {', '.join(METHODS)}")


def run_quality(preset: str, cfg: SimConfig, json_path: str, methods=METHODS, progress=print,
                jobs: int = 1, threads: int = 0) -> dict:
    """Run `methods` and write their results to `json_path` as each finishes (partial results
    survive an interrupted run). With jobs > 1 the methods run side by side in that many processes
    of `threads` torch threads each (each reports its progress on stderr, not through `progress`):
    every method is its own seeded simulation, so its result does not depend on what runs beside it."""
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    # Every method's config is checked before hours of training, not after (a bad name, or --tau 0
    # with the eager method).
    configs = [(m, replace(cfg, streaming=method_config(m, cfg.streaming)).validate()) for m in methods]
    result = {"preset": preset, "workers": cfg.workers, "H": cfg.streaming.H,
              "fragments": cfg.streaming.fragments, "steps": cfg.steps, "model": cfg.model,
              "aggregate": cfg.aggregate.method, "methods": {}}
    for m, run in _runs(configs, progress, jobs, threads):
        result["parameters"] = run["parameters"]
        s = run["config"]["streaming"]
        result["methods"][m] = {k: run[k] for k in _KEPT} | {k: s[k] for k in ("tau", "alpha", "eager", "codec")}
        write_json(json_path, result)
    result["methods"] = {m: result["methods"][m] for m in methods}  # the order asked for, whatever finished first
    result["ratios"] = ratios(result["methods"], cfg)
    write_json(json_path, result)
    plot(result, Path(json_path).with_suffix(".png"))
    return result


_KEPT = ("eval_loss", "bytes_sent_per_worker", "peak_sync_bytes", "peak_fragment_sync_bytes", "tokens", "wall_s",
         "eval_loss_initial", "eval_curve", "skipped_rounds", "fragments", "full_sync_bytes")


def _runs(configs: list[tuple[str, SimConfig]], progress, jobs: int, threads: int):
    """(method, summary) as each run finishes: in this process one after another, or in a pool of
    `jobs` processes (spawned: torch and fork do not mix) that is torn down if any run fails."""
    if jobs == 1 or len(configs) == 1:
        corpus = Corpus.load(configs[0][1].data)
        for m, c in configs:
            yield m, run_simulation(c, corpus, progress, label=m)
        return
    with multiprocessing.get_context("spawn").Pool(min(jobs, len(configs)), _child_init, (threads,)) as pool:
        # Leaving the block terminates the pool: a failed run or Ctrl-C does not leave the others running.
        yield from pool.imap_unordered(_child_run, configs)


def _child_init(threads: int) -> None:
    import torch
    if threads:
        torch.set_num_threads(threads)


def _child_run(item: tuple[str, SimConfig]) -> tuple[str, dict]:
    m, c = item
    return m, run_simulation(c, Corpus.load(c.data), label=m)  # progress on the child's stderr, run_simulation's default


def round_bytes(name: str, cfg: SimConfig, method: dict) -> float | None:
    """Bytes a worker sends in one steady-state period of H steps: one sync of every fragment (or
    H gradient all-reduces for data-parallel), from what the run's syncs cost on average; None if
    some fragment never synced."""
    if name == "data_parallel":
        return cfg.streaming.H * method["full_sync_bytes"]
    return method["full_sync_bytes"]


def ratios(methods: dict, cfg: SimConfig) -> dict:
    out = {}
    dp, dl = methods.get("data_parallel"), methods.get("diloco")
    for name, m in methods.items():
        r = {}
        if dp:
            r["eval_loss_vs_data_parallel"] = m["eval_loss"] / dp["eval_loss"]
            if m["bytes_sent_per_worker"]:
                r["bytes_fewer_than_data_parallel"] = dp["bytes_sent_per_worker"] / m["bytes_sent_per_worker"]
                # The same without the run's start and end (first syncs, final sync): one H period.
                ours, theirs = round_bytes(name, cfg, m), round_bytes("data_parallel", cfg, dp)
                if ours and theirs:
                    r["bytes_fewer_than_data_parallel_per_H_steps"] = theirs / ours
        if dl:
            r["eval_loss_vs_diloco"] = m["eval_loss"] / dl["eval_loss"]
        if m["full_sync_bytes"]:
            r["peak_sync_vs_full_model_sync"] = m["peak_sync_bytes"] / m["full_sync_bytes"]
            if m.get("peak_fragment_sync_bytes"):  # with a data-parallel warm start the peak above is a gradient's
                r["peak_fragment_sync_vs_full_model_sync"] = m["peak_fragment_sync_bytes"] / m["full_sync_bytes"]
        out[name] = r
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["methods"]
    color = {name: f"C{i}" for i, name in enumerate(METHODS)}
    fig, axes = plt.subplots(1, 2 if "data_parallel" in methods else 1, figsize=(12, 4.5), squeeze=False)
    ax = axes[0][0]
    for name, m in methods.items():
        xs = [c["tokens"] for c in m["eval_curve"][1:]]
        ax.plot(xs, [c["eval_loss"] for c in m["eval_curve"][1:]], marker=".", label=name, color=color.get(name))
    ax.set(xlabel="tokens (all workers)", ylabel="eval loss (global parameters)",
           title=f"preset {result['preset']}: M={result['workers']}, H={result['H']}, P={result['fragments']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if "data_parallel" in methods:
        ax = axes[0][1]
        dp = {c["tokens"]: c["eval_loss"] for c in methods["data_parallel"]["eval_curve"]}
        for name, m in methods.items():
            if name == "data_parallel":
                continue
            pts = [(c["tokens"], c["eval_loss"] / dp[c["tokens"]]) for c in m["eval_curve"][1:] if c["tokens"] in dp]
            ax.plot(*zip(*pts), marker=".", label=name, color=color.get(name))
        ax.axhline(1.03, color="gray", linestyle="--", linewidth=1, label="1.03 × data_parallel")
        ax.set(xlabel="tokens (all workers)", ylabel="eval loss / data_parallel's", title="ratio to data-parallel")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
