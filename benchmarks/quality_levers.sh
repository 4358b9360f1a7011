#!/usr/bin/env bash
# What narrows the gap to data-parallel: one lever at a time, each a `bench quality` run over a
# subset of methods (same tokens and seeds within a run). Writes OUTDIR/*.json (+ .png).
# The levers run on `small-b16` (the earlier `small`: 540 steps of 16 sequences, H = 30), about
# 25 minutes on 2 CPU cores; the batch, warm-start and alpha sweeps that led to today's `small`
# (same tokens, more and smaller steps, H = 10, 5% data-parallel warm start, plain overlap with
# alpha 0) about an hour more.
# Usage: benchmarks/quality_levers.sh [OUTDIR]   (run from the repo root, .venv set up)
set -euo pipefail
out=${1:-results/levers}
mkdir -p "$out"
q() { name=$1; shift; p2pdiloco bench quality "$@" --json "$out/$name.json"; }
# Bytes at H = 100 (the 400x target): data-parallel against streaming + overlap + E3M0.
q h100_bytes --preset small-b16 --H 100 --methods data_parallel streaming_overlap_e3m0
# The papers' outer momentum 0.9 instead of the preset's 0.5.
q outer_momentum_0.9 --preset small-b16 --outer-momentum 0.9 --methods diloco streaming_overlap_e3m0
# Syncing 3x more often.
q h10 --preset small-b16 --H 10 --methods diloco streaming_overlap_e3m0
# A data-parallel warm start for the first 10% of steps (as in DiLoCo's own experiments).
q dp_warmup_10pct --preset small-b16 --dp-warmup-steps 54 --methods diloco streaming_overlap_e3m0
# 4-bit without error feedback.
q no_error_feedback --preset small-b16 --no-error-feedback --methods streaming_overlap_e3m0
# The same 4.42M tokens in more, smaller steps at H = 10, no warm start, the same 512 held-out
# sequences (batch 2 is the `small` preset without its warm start).
q batch8_h10 --preset small --dp-warmup-steps 0 --threads 1 --batch-size 8 --steps 1080 --eval-every 60 \
  --eval-batches 64 --methods data_parallel diloco streaming_overlap_e3m0_eager
q batch4_h10 --preset small --dp-warmup-steps 0 --threads 1 --batch-size 4 --steps 2160 --eval-every 120 \
  --eval-batches 128 --methods data_parallel diloco streaming_overlap_e3m0_eager
q batch2_h10 --preset small --dp-warmup-steps 0 --threads 1 --methods data_parallel diloco
q batch2_h10_eager --preset small --dp-warmup-steps 0 --threads 1 --methods streaming_overlap_e3m0_eager
# The preset's warm start doubled: 10% of steps data-parallel (plain overlap with the alpha of the time).
q batch2_h10_warmup10 --preset small --threads 1 --dp-warmup-steps 432 --methods streaming_overlap_e3m0_eager diloco
q batch2_h10_warmup10_plain --preset small --threads 1 --dp-warmup-steps 432 --alpha 0.5 --methods streaming_overlap_e3m0
# Plain overlap's merge: the paper's alpha 0.5 (all five methods; alpha changes only plain overlap),
# alpha 0.5 with no delay, and alpha 0 (the preset's).
q batch2_h10_warmup5_alpha05 --preset small --jobs 2 --threads 1 --alpha 0.5
q batch2_h10_tau0_alpha05 --preset small --threads 1 --alpha 0.5 --tau 0 --methods streaming_overlap_e3m0
q batch2_h10_alpha0 --preset small --threads 1 --alpha 0 --methods streaming_overlap_e3m0
