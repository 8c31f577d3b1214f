#!/usr/bin/env bash
# One-call GPU validation run (H100 / H200, no network): build the extension with the CUDA
# kernels in place, run the CUDA backend's tests, the whole suite on every backend, and the
# attention / sampling benchmarks. Writes logs and results into $FASTDECODE_GPU_OUT (default
# benchmarks/results/gpu_run/), and fastdecode/cuda_validated.json -- which lets
# backend="auto" pick the CUDA kernels -- only when the CUDA tests passed on this GPU.
#
#   bash scripts/gpu_run.sh   # at most ~9 minutes: build 240 s, CUDA tests 150 s, benchmarks
#                             # 2 x 45 s, whole suite 75 s (each step has its own time limit)
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT_DIR=${FASTDECODE_GPU_OUT:-$ROOT/benchmarks/results/gpu_run}
mkdir -p "$OUT_DIR"
LOG=$OUT_DIR/gpu_run.log
SCRATCH=$(mktemp -d)  # start stamp and junit report (kept out of the results folder)
trap 'rm -rf "$SCRATCH"' EXIT
touch "$SCRATCH/start"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}

say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
# run NAME SECONDS CMD...: run with a time limit, output to $OUT_DIR/NAME.log; returns its status
run() {
  local name=$1 limit=$2
  shift 2
  say "$name: $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  say "$name: exit $rc after $((SECONDS - start)) s"
  tail -n 15 "$OUT_DIR/$name.log" | tee -a "$LOG"
  return $rc
}

rm -f fastdecode/cuda_validated.json "$OUT_DIR/cuda_validated.json"
: >"$LOG"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$LOG" 2>&1
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
      'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name())" >>"$LOG" 2>&1

# 1. Build fastdecode._C with the CUDA kernels (Hopper only: this run validates this machine).
export MAX_JOBS=16 FASTDECODE_BUILD_CUDA=1 FASTDECODE_CUDA_ARCHS=${FASTDECODE_CUDA_ARCHS:-90a}
if ! run build 240 "$PY" setup.py build_ext --inplace; then
  say "build failed: no tests, no validation"
  exit 1
fi
if ! "$PY" -c "from fastdecode.ops import _backends as b; import sys;
ok = b.is_available('cuda'); print('cuda backend:', 'available' if ok else b._load('cuda'));
sys.exit(0 if ok else 1)" 2>&1 | tee -a "$LOG"; then
  say "CUDA backend unavailable after the build: no validation"
  exit 1
fi

# 2. The CUDA backend's tests: the shared op tests' cuda parametrisations + CUDA-only tests.
op_tests=()
for f in tests/test_attention.py tests/test_append_kv.py tests/test_sampling.py \
         tests/test_cuda_specific.py; do
  [[ -f $f ]] && op_tests+=("$f")
done
run pytest_cuda 150 "$PY" -m pytest "${op_tests[@]}" -k cuda -q -rfEs -p no:cacheprovider \
  --junitxml="$SCRATCH/pytest_cuda.xml"
cuda_rc=$?

# 3. Benchmarks (their own result files land in benchmarks/results/, archived below).
for bench in attention sampling; do
  if [[ -f benchmarks/bench_$bench.py ]]; then
    run "bench_$bench" 45 "$PY" "benchmarks/bench_$bench.py" --device cuda
  else
    say "benchmarks/bench_$bench.py missing: skipped"
  fi
done
find benchmarks/results -type f -newer "$SCRATCH/start" ! -path "$OUT_DIR/*" -print0 2>/dev/null |
  tar --null -czf "$OUT_DIR/bench_results.tar.gz" -T -

# 4. The whole suite, every backend (reported, not gating the CUDA validation).
run pytest_all 75 "$PY" -m pytest tests -q -rfE -p no:cacheprovider

# 5. Validation marker: only from a passing CUDA test run that actually ran tests.
"$PY" - "$SCRATCH/pytest_cuda.xml" "$cuda_rc" "$OUT_DIR" <<'EOF' 2>&1 | tee -a "$LOG"
import datetime, json, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch

xml_path, rc, out_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
outcomes = {}  # test id -> "passed" | "skipped" | "failed"
try:
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = ("failed" if kinds & {"failure", "error"} else
                   "skipped" if "skipped" in kinds else "passed")
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = outcome
except (OSError, ET.ParseError) as exc:
    print("no junit report:", exc)
count = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "skipped", "failed")}
# The CUDA-only tests skip without a GPU / without the CUDA kernels: all of them must have run.
specific = [v for k, v in outcomes.items() if "test_cuda_specific" in k]
ok = rc == 0 and count["failed"] == 0 and bool(specific) and all(v == "passed" for v in specific)
print(f"CUDA tests: {count['passed']} passed, {count['skipped']} skipped, {count['failed']} "
      f"failed; CUDA-only tests run: {sum(v == 'passed' for v in specific)}/{len(specific)} "
      f"(pytest exit {rc}) -> {'VALIDATED' if ok else 'NOT validated'}")
if ok:
    import triton
    import transformers

    marker = {
        "passed": True,
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "triton": triton.__version__, "transformers": transformers.__version__},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tests": {"passed": count["passed"], "skipped": count["skipped"]},
    }
    text = json.dumps(marker, indent=2) + "\n"
    Path("fastdecode/cuda_validated.json").write_text(text)
    (out_dir / "cuda_validated.json").write_text(text)
sys.exit(0 if ok else 1)
EOF
status=$?
say "done: $( ((status == 0)) && echo 'CUDA backend validated' || echo 'CUDA backend NOT validated')"
exit $status
