#!/usr/bin/env bash
# The GPU check: one script for a machine with torch+CUDA and triton (no internet needed), run from the
# repository root. Under 8 minutes in all, each step under its own `timeout`, at most 8 files into
# $OUT (or the directory given as $1):
#   env.json     versions, device, packages                               (scripts/gpu_check.py env)
#   tests.txt    the CUDA tests (pytest -k "cuda or triton")
#   h2d.json     pinned host->device GB/s: cudaHostRegister'd pages, torch's pinned blocks, pageable
#   triton.json  Triton GB/s per bit width on Mixtral-size matrices beside this run's HBM bandwidth
#   syncs.json   host syncs per decode step (torch.cuda.set_sync_debug_mode), by source line
#   bench.json   full-size synthetic Mixtral-8x7B int4 under a 12 GB cap beside its baselines
#   bench.txt    the bench's table
#   log.txt      this script's own log: each step's status and seconds
# Without CUDA every step runs at toy sizes (Triton through its interpreter) and the GPU measurements
# say "skipped": tests/test_gpu_check.py runs it that way. GPU_CHECK_TINY=1 forces toy sizes.
set -u
OUT_DIR="${1:-${OUT:-}}"
if [ -z "$OUT_DIR" ]; then echo "usage: scripts/gpu_check.sh OUTDIR (or set OUT)" >&2; exit 2; fi
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 NO_COLOR=1
LOG="$OUT_DIR/log.txt"
: >"$LOG"
START=$(date +%s)

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  CUDA=1; TINY="${GPU_CHECK_TINY:-}"; SCALE=${GPU_CHECK_TIMEOUT_SCALE:-1}
else  # toy sizes on a CPU that may be shared: the step limits are stretched
  CUDA=0; TINY=1; SCALE=${GPU_CHECK_TIMEOUT_SCALE:-4}; export TRITON_INTERPRET=1
fi
TINY_FLAG=${TINY:+--tiny}

log() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

step() {  # step NAME SECONDS FILE command...: the command's output into FILE (the log when FILE is -)
  local name=$1 limit=$2 dest=$3; shift 3
  local t0=$(date +%s) rc
  [ "$dest" = - ] && dest="$LOG"
  limit=$(( limit * SCALE ))
  timeout -k 5 "$limit" "$@" >>"$dest" 2>&1
  rc=$?
  local status=ok
  [ $rc -eq 124 ] && status="timed out after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed (exit $rc)"
  log "$name: $status in $(( $(date +%s) - t0 ))s"
}

log "gpu_check: cuda=$CUDA tiny=${TINY:-0} python=$("$PY" -c 'import sys; print(sys.version.split()[0])')"

step env 20 - "$PY" scripts/gpu_check.py env --out "$OUT_DIR/env.json"

if [ $CUDA = 1 ]; then
  : >"$OUT_DIR/tests.txt"
  step tests 130 "$OUT_DIR/tests.txt" env OFFLOAD_MOE_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -rs -p no:cacheprovider -k "(cuda or triton or pinned) and not interpreter and not without_one" \
    tests/test_triton_kernels.py tests/test_quant_core.py tests/test_pinned.py tests/test_engine.py \
    tests/test_cpu_experts.py tests/test_quantize.py tests/test_nf4.py tests/test_bench.py \
    tests/test_host_syncs.py
else
  echo "skipped: no CUDA device (the CUDA tests skip themselves here; the suite runs them on a GPU)" >"$OUT_DIR/tests.txt"
  log "tests: skipped (no CUDA device)"
fi

step h2d 20 - "$PY" scripts/gpu_check.py h2d $TINY_FLAG --out "$OUT_DIR/h2d.json"
step triton 100 - "$PY" scripts/gpu_check.py triton $TINY_FLAG --out "$OUT_DIR/triton.json"
step syncs 40 - "$PY" scripts/gpu_check.py syncs $TINY_FLAG --out "$OUT_DIR/syncs.json"

if [ -n "$TINY" ]; then
  BENCH=(--synthetic mixtral-8x7b --bits 4 --layers 2 --scale 0.05 --tokens 3 --prompt-tokens 4 --threads 1 --repeats 1)
else  # the 12gb profile: VRAM capped at 12 GB, its planned slots; int4 experts and attention
  BENCH=(--synthetic mixtral-8x7b --bits 4 --profile 12gb --tokens 16 --prompt-tokens 8 --repeats 1)  # one round: the step has 170 s
fi
: >"$OUT_DIR/bench.txt"
step bench 170 "$OUT_DIR/bench.txt" "$PY" -m offload_moe bench "${BENCH[@]}" --json "$OUT_DIR/bench.json"

log "gpu_check: done in $(( $(date +%s) - START ))s"
