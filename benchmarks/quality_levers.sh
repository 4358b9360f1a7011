#!/usr/bin/env bash
# What narrows the gap to data-parallel on the `small` preset: one lever at a time, each a
# `bench quality` run over a subset of methods (same tokens and seeds as the preset).
# Writes results/levers/*.json (+ .png). About 25 minutes on 2 CPU cores.
# Usage: benchmarks/quality_levers.sh [OUTDIR]   (run from the repo root, .venv set up)
set -euo pipefail
out=${1:-results/levers}
mkdir -p "$out"
q() { name=$1; shift; p2pdiloco bench quality --preset small "$@" --json "$out/$name.json"; }
# Bytes at H = 100 (the 400x target): data-parallel against streaming + overlap + E3M0.
q h100_bytes --H 100 --methods data_parallel streaming_overlap_e3m0
# The papers' outer momentum 0.9 instead of the preset's 0.5.
q outer_momentum_0.9 --outer-momentum 0.9 --methods diloco streaming_overlap_e3m0
# Syncing 3x more often.
q h10 --H 10 --methods diloco streaming_overlap_e3m0
# A data-parallel warm start for the first 10% of steps (as in DiLoCo's own experiments).
q dp_warmup_10pct --dp-warmup-steps 54 --methods diloco streaming_overlap_e3m0
# 4-bit without error feedback.
q no_error_feedback --no-error-feedback --methods streaming_overlap_e3m0
