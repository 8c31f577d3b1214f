#!/usr/bin/env bash
# The test command of the README: set up a fresh CPU machine and run the whole test suite.
# torch==2.13.0 is the CPU build (a bare `pip install torch` would pull several GB of CUDA
# wheels); on a machine that already has torch (a GPU box) set FASTDECODE_KEEP_TORCH=1.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${FASTDECODE_KEEP_TORCH:-0}" != "1" ]; then
  python3 -m pip install -q "torch==2.13.0"
fi
python3 -m pip install -q ninja setuptools wheel
python3 -m pip install -q --no-build-isolation -e ".[test]"
python3 -m pytest tests -q -ra "$@"
