#!/usr/bin/env bash
# Device-resident averaging on a CUDA machine (docs/hardware.md#gpu-check):
#   1. the codec on CUDA against the CPU, bit for bit, and its throughput (benchmarks/codec_device.py);
#   2. tests/test_device.py, whose CUDA tests compare the codec, the fused sum, the outer step and a
#      whole sync on the GPU with the CPU;
#   3. a real swarm of two `p2pdiloco peer` processes on loopback, both training on CUDA: both must
#      exit 0, report device cuda, have averaged with each other (sent bytes), and end with a lower
#      eval loss than they started with.
#
# Usage: benchmarks/gpu_check.sh [OUTDIR]      (default: runs/gpu-check; results and peer logs there)
# Exit status: 0 all passed; 1 a check failed; 0 with "SKIP: no CUDA here" on a machine where torch
# sees no CUDA device, or 77 there if GPU_CHECK_REQUIRE=1 (for a CI job that must not pass silently).
# GPU_CHECK_DEVICE=cpu runs the same checks with the CPU in CUDA's place (how the script itself is
# tested on a machine without a GPU); GPU_CHECK_STEPS sets the swarm's inner steps (default 120).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${1:-runs/gpu-check}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STEPS=${GPU_CHECK_STEPS:-120}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout, for every process started below

"$PY" -c 'import torch, p2pdiloco' 2>/dev/null \
    || { echo "FAIL: $PY cannot import torch and p2pdiloco (./scripts/test makes .venv; or set PYTHON)"; exit 1; }
if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "SKIP: no CUDA here (torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device); nothing was checked"
    [ "${GPU_CHECK_REQUIRE:-0}" = 1 ] && exit 77
    exit 0
fi

fail() { echo "FAIL: $*"; exit 1; }

echo "== 1. codec: $DEVICE against the CPU"
devices=(cpu); [ "$DEVICE" = cuda ] && devices+=(cuda)
"$PY" benchmarks/codec_device.py --devices "${devices[@]}" --json "$OUT/codec.json" \
    || fail "the codec's output on $DEVICE differs from the CPU's ($OUT/codec.json)"

echo "== 2. tests/test_device.py"
if [ "$DEVICE" = cuda ]; then
    "$PY" -m pytest -q -rs tests/test_device.py || fail "tests/test_device.py"
else
    "$PY" -m pytest -q -rs tests/test_device.py -k "not cuda" || fail "tests/test_device.py"
fi

echo "== 3. a 2-peer swarm on $DEVICE ($STEPS steps)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done; }
trap cleanup EXIT
common=(--device "$DEVICE" --model tiny --steps "$STEPS" --H 20 --fragments 2 --wait-for-peers 2
        --run-id gpu-check --json summary.json --checkpoint-dir checkpoints)
start_peer() {  # start_peer NAME ARGS...: in its own folder and process group, its log there
    local dir="$OUT/$1"; shift
    rm -rf "$dir"; mkdir -p "$dir"
    (cd "$dir" && exec setsid "$PY" -m p2pdiloco.cli peer "$@" >peer.log 2>&1) &
    pids+=($!)
}
start_peer peer0 "${common[@]}"
join=""
for _ in $(seq 120); do
    join=$(grep -o -- '--initial-peers [^ ]*' "$OUT/peer0/peer.log" 2>/dev/null | head -1 || true)
    [ -n "$join" ] && break
    kill -0 "${pids[0]}" 2>/dev/null || fail "peer0 exited before printing its join line: $OUT/peer0/peer.log"
    sleep 1
done
[ -n "$join" ] || fail "peer0 printed no join line within 120 s: $OUT/peer0/peer.log"
# shellcheck disable=SC2086  # $join is the option and its value
start_peer peer1 "${common[@]}" $join

status=0
for i in 0 1; do
    if ! timeout 900 tail --pid="${pids[$i]}" -f /dev/null; then status=1; fi
    wait "${pids[$i]}" || { echo "peer$i exited $?; its log: $OUT/peer$i/peer.log"; tail -20 "$OUT/peer$i/peer.log"; status=1; }
done
pids=()
[ $status = 0 ] || fail "a peer failed"

"$PY" - "$OUT" "$DEVICE" <<'EOF' || fail "the swarm's summaries (above)"
import json, sys
from pathlib import Path
out, device = Path(sys.argv[1]), sys.argv[2]
ok = True
for name in ("peer0", "peer1"):
    s = json.loads((out / name / "summary.json").read_text())
    fell = s["eval_loss"] < s["eval_loss_initial"]
    on = s["device"].startswith(device)
    averaged = s["bytes_sent"] > 0  # it averaged with the other peer at least once (alone, nothing is sent)
    print(f"{name}: device {s['device']}, eval loss {s['eval_loss_initial']:.4f} -> {s['eval_loss']:.4f}, "
          f"{s['bytes_sent']:,} bytes sent{'' if fell and on and averaged else '  <-- FAIL'}")
    ok = ok and fell and on and averaged
sys.exit(0 if ok else 1)
EOF
echo "PASS: codec, tests and a 2-peer swarm on $DEVICE (results under $OUT)"
