#!/usr/bin/env bash
# GPU check for the top-k search: kernel tests on CUDA, then benchmarks/topk_search.py; JSON into $OUT or ./out.
# Runs on a fresh GPU machine in well under 4 minutes. It prefers a python3 that already has CUDA torch
# and triton (GPU images ship one and may have no network); otherwise it makes .venv-gpu and installs
# requirements/cuda.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-./out}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

has_cuda_stack() {
  "$1" - <<'PY' 2>/dev/null
import torch, triton, pytest, hypothesis
assert torch.cuda.is_available()
PY
}

PY=""
for cand in "${GPU_PYTHON:-}" python3 python; do
  if [ -n "$cand" ] && command -v "$cand" >/dev/null && has_cuda_stack "$cand"; then PY="$cand"; break; fi
done
if [ -z "$PY" ]; then
  echo "no python with CUDA torch + triton found; installing requirements/cuda.txt into .venv-gpu"
  python3 -m venv --system-site-packages .venv-gpu || exit 1
  # Only what this check imports, at the lock's versions (the whole lock takes too long here).
  pins=$(grep -E '^(torch|triton|pytest|pytest-timeout|hypothesis|numpy|sortedcontainers|attrs|iniconfig|pluggy|packaging|Pygments)==' requirements/cuda.txt)
  .venv-gpu/bin/python -m pip install -q --disable-pip-version-check \
    --extra-index-url https://download.pytorch.org/whl/cu130 $pins || exit 1
  PY=.venv-gpu/bin/python
  has_cuda_stack "$PY" || { echo "torch in .venv-gpu sees no CUDA device"; exit 1; }
fi
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())' \
  | tee "$OUT_DIR/gpu_env.txt"

status=0
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_topk_triton.py \
  --junitxml="$OUT_DIR/topk_triton_tests.xml" 2>&1 | tee "$OUT_DIR/topk_triton_tests.log" || status=1
timeout 80 "$PY" benchmarks/topk_search.py --device cuda --out "$OUT_DIR/retrieval_cuda.json" \
  >/dev/null 2>"$OUT_DIR/retrieval_cuda.log" || status=1
[ -s "$OUT_DIR/retrieval_cuda.json" ] && cat "$OUT_DIR/retrieval_cuda.json"
echo "gpu_check: $([ $status -eq 0 ] && echo OK || echo FAILED), results in $OUT_DIR"
exit $status
