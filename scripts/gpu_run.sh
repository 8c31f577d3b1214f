#!/usr/bin/env bash
# One-call GPU validation and benchmark run, sized for a short H100 / H200 window (one command of
# at most 10 minutes, no network, only the output folder comes back):
#
#   1. build    fastdecode._C with the CUDA kernels (skipped when the sources and torch are those
#               of the last successful build here: a second call on a warm machine goes straight
#               to the tests); compiler errors are grepped into the log
#   2. gate     the GPU backends' tests (cuda and triton) in parallel shards, then at once the
#               validation record gpu_validation.json that backend="auto" trusts
#   3. bench    decode attention and sampling on the GPU (tools: benchmarks/gpu_suite.py)
#
# Output: $FASTDECODE_GPU_OUT, else $OUT, else benchmarks/results/gpu_run/. Each step has a
# time limit; their sum (printed by the dry run) stays under 7 minutes. At the end only these
# stay at the top of the output folder (a collector may bring back no more than 8 files):
# gpu_run.log, gpu_validation.json, gate_failures.txt, {attention,sampling}_gpu.{csv,md}; every
# other log (build, steps, shards, per-test outcomes) is packed into logs.tgz.
#
#   bash scripts/gpu_run.sh                # on the GPU machine
#   GPU_RUN_STEPS="info build gate" bash scripts/gpu_run.sh   # only these steps (in plan order)
#   GPU_RUN_DRY=1 bash scripts/gpu_run.sh  # anywhere: print the steps, their limits, the total
#   GPU_RUN_GATE_DEADLINE=190 bash scripts/gpu_run.sh  # the gate's time on a cold Triton cache
#   GPU_RUN_STEPS="build tune" bash scripts/gpu_run.sh  # the Triton decode launch sweep (not in
#                                          # the default plan; tune_attention_gpu.md)
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT_DIR=${FASTDECODE_GPU_OUT:-${OUT:-$ROOT/benchmarks/results/gpu_run}}
PY=${PYTHON:-python3}
GRACE=5  # seconds between SIGINT and SIGKILL when a step runs out of time
DRY=${GPU_RUN_DRY:-0}
# The gate's deadline: 140 s covers a machine whose Triton cache is warm; a fresh machine
# compiles every kernel first and needs about 190 s.
GATE_DEADLINE=${GPU_RUN_GATE_DEADLINE:-140}

# name, limit (s), command: the plan, in order.
STEPS=(
  "info|10|step_info"
  "build|140|step_build"
  "gate|$((GATE_DEADLINE + 10))|$PY tools/gpu_gate.py --out $OUT_DIR --deadline $GATE_DEADLINE"
  "bench_attention|45|$PY benchmarks/gpu_suite.py attention --out $OUT_DIR --budget 40"
  "bench_sampling|45|$PY benchmarks/gpu_suite.py sampling --out $OUT_DIR --budget 40"
)
# Steps outside the default plan, run only when GPU_RUN_STEPS names them (after the plan's).
OPTIONAL_STEPS=(
  "tune|110|$PY benchmarks/gpu_tune_attention.py --out $OUT_DIR --budget 95"
)
if [[ -n ${GPU_RUN_STEPS:-} ]]; then
  chosen=()
  for step in "${STEPS[@]}" "${OPTIONAL_STEPS[@]}"; do
    [[ " $GPU_RUN_STEPS " == *" ${step%%|*} "* ]] && chosen+=("$step")
  done
  STEPS=("${chosen[@]}")
fi

total=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit _ <<<"$step"
  total=$((total + limit + GRACE))
done
if [[ $DRY == 1 ]]; then
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$step"
    printf '%-16s limit %4d s (+%d s grace)  %s\n' "$name" "$limit" "$GRACE" "$cmd"
  done
  echo "output: $OUT_DIR"
  echo "total: $total s"
  exit 0
fi

mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_run.log
: >"$LOG"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

step_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'device',
torch.cuda.get_device_name(), 'capability', torch.cuda.get_device_capability())"
  nproc
}

# The build is skipped when this stamp (sources, build script, torch) matches the last build's.
build_stamp() {
  { find csrc setup.py -type f -print0 | sort -z | xargs -0 sha256sum; "$PY" -c "import torch;
print(torch.__version__, torch.version.cuda)"; } | sha256sum | cut -d' ' -f1
}

step_build() {
  local stamp
  stamp=$(build_stamp)
  if [[ -f build/.gpu_run_stamp && $(cat build/.gpu_run_stamp) == "$stamp" ]] &&
     ls fastdecode/_C*.so >/dev/null 2>&1; then
    echo "build: sources unchanged since the last build on this machine, skipped"
  else
    rm -f build/.gpu_run_stamp
    MAX_JOBS=$(nproc) FASTDECODE_BUILD_CUDA=1 FASTDECODE_CUDA_ARCHS=${FASTDECODE_CUDA_ARCHS:-90a} \
      "$PY" setup.py build_ext --inplace || return 1
    mkdir -p build && echo "$stamp" >build/.gpu_run_stamp
  fi
  "$PY" -c "from fastdecode.ops import _backends as b; import sys
ok = b.is_available('cuda'); print('cuda backend:', 'available' if ok else b._load('cuda'))
sys.exit(0 if ok else 1)"
}

# run NAME LIMIT CMD...: the step's output goes to OUT_DIR/NAME.log; returns its status.
run_step() {
  local name=$1 limit=$2 cmd=$3 start=$SECONDS rc
  say "$name (limit $limit s): $cmd"
  if declare -F "${cmd%% *}" >/dev/null; then  # a function of this script: run in a subshell
    export -f step_info step_build build_stamp
    export PY
    timeout --signal=INT --kill-after=$GRACE "$limit" bash -c "$cmd" >"$OUT_DIR/$name.log" 2>&1
  else
    timeout --signal=INT --kill-after=$GRACE "$limit" $cmd >"$OUT_DIR/$name.log" 2>&1
  fi
  rc=$?
  say "$name: exit $rc after $((SECONDS - start)) s"
  tail -n 12 "$OUT_DIR/$name.log" | tee -a "$LOG"
  return $rc
}

say "gpu_run: plan of ${#STEPS[@]} steps, at most $total s; output in $OUT_DIR"
status=0
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$step"
  if ! run_step "$name" "$limit" "$cmd"; then
    status=1
    if [[ $name == build ]]; then
      say "build failed; compiler errors:"
      grep -E -m 40 "error|Error|FAILED" "$OUT_DIR/build.log" | tee -a "$LOG"
      say "done: no tests without a build"
      exit 1
    fi
  fi
done
say "done: $(cat "$OUT_DIR/gate_summary.txt" 2>/dev/null | tail -n 1)"
KEEP="gpu_run.log gpu_validation.json gate_failures.txt attention_gpu.csv attention_gpu.md
sampling_gpu.csv sampling_gpu.md tune_attention_gpu.md logs.tgz"
pack=()
for f in "$OUT_DIR"/*; do
  [[ " ${KEEP//$'\n'/ } " == *" $(basename "$f") "* ]] || pack+=("$(basename "$f")")
done
if ((${#pack[@]})); then
  tar czf "$OUT_DIR/logs.tgz" -C "$OUT_DIR" "${pack[@]}" && (cd "$OUT_DIR" && rm -rf "${pack[@]}")
fi
exit $status
