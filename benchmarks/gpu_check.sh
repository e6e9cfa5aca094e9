#!/usr/bin/env bash
# GPU checks (issue 4), at most ~8 minutes on one GPU machine, with this repository's .venv built there
# or, on a machine without a package index, with .whl/ from benchmarks/device_wheels.sh carried along
# (installed into /tmp/site on top of the machine's own python3 with torch and torchvision):
#   1. the tests marked `gpu` (nvJPEG decode vs the CPU path, the CUDA actor, a run with gpu_decode);
#   2. benchmarks/gpu_bench.py: model-only fp16 img/s, end to end with CPU decode, end to end with GPU decode.
# Results go to $OUT (default out/gpu-check): pytest-gpu.txt, gpu_bench.txt, gpu_bench.json.
# Exit status: non-zero if the tests or the benchmark failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out/gpu-check}
mkdir -p "$OUT"
SECONDS=0
if [[ ! -x $PY && -d .whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 2
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
    PY=python3
fi
if ! command -v "$PY" >/dev/null; then
    echo "gpu_check: $PY not found: build the environment first (make install, or benchmarks/device_wheels.sh)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
if ! "$PY" -c "import torch, torchvision, ray; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'torchvision', torchvision.__version__, \
'ray', ray.__version__, torch.cuda.get_device_name())"; then
    echo "gpu_check: no usable CUDA device" >&2
    exit 2
fi

# The tests marked gpu (all in tests/test_gpu.py; they skip without CUDA, here they must run).
timeout -k 10 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest-gpu.txt"
tests_rc=${PIPESTATUS[0]}
echo "gpu_check: gpu tests exit ${tests_rc} after ${SECONDS}s"

# Throughput. A timeout still leaves the finished parts in gpu_bench.txt (one JSON line per step).
timeout -k 10 300 "$PY" benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.txt"
bench_rc=${PIPESTATUS[0]}
echo "gpu_check: benchmark exit ${bench_rc} after ${SECONDS}s"
grep '^gpu_bench:' "$OUT/gpu_bench.txt" | tail -1

[[ $tests_rc -eq 0 && $bench_rc -eq 0 ]]
