#!/usr/bin/env bash
# The GPU run of issue #15: models-alone ceiling, end to end DICOM -> SEG + SR on one engine with
# its variants (lanes, Stage I's input and lung blobs on the host or the device), the published baseline
# as the paper ran it, GPU utilisation. The python step is stopped at 460 s; every phase's numbers are
# in the JSON as soon as it ends. All phases took about 400 s on an H200 with one end-to-end run and no
# variants; the variants add 5 runs of --images per --variant-rounds, so the compiled ceiling (last)
# may be cut. Phases already measured can be left out:
#   bash bench/gpu.sh $OUT --skip baseline --no-compile --latency-seconds 12
#
#   bash bench/gpu.sh [OUT_DIR] [gpu.py options]    # OUT_DIR default: $CXRTRIAGE_GPU_BENCH_OUT, else
#                                                   # bench/results; writes OUT_DIR/gpu.json + gpu.log
#   bash bench/gpu.sh OUT_DIR --dry-run             # CPU, tiny sizes, seconds (tests/test_bench.py)
#   bash bench/gpu.sh --fetch-wheels                # here, once: the Python packages the GPU image
#                                                   # lacks, as Python 3.12 wheels, into .whl/
#
# On the lent GPU machine (its python3 has torch, timm, cv2, scipy, psutil, but not pydicom,
# highdicom, pydantic or smp): add "/.whl/" to .git/info/exclude, run --fetch-wheels here, then
# run "bash bench/gpu.sh" there with carry [".whl"] and print the JSON that comes back under $OUT:
#   run(command="bash bench/gpu.sh $OUT", carry=[".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(pydicom==3.0.2 highdicom==0.28.2 pyjpegls==1.5.1 pylibjpeg==2.1.0 pylibjpeg-libjpeg==2.4.0
        pylibjpeg-openjpeg==2.6.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 segmentation_models_pytorch==0.6.0 py-spy==0.4.3)

if [ "${1:-}" = "--fetch-wheels" ]; then
    pip_python=python3
    [ -x .venv/bin/python ] && pip_python=.venv/bin/python
    "$pip_python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
    du -sh .whl
    exit 0
fi

OUT="${CXRTRIAGE_GPU_BENCH_OUT:-bench/results}"
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then OUT="$1"; shift; fi
mkdir -p "$OUT"

if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
    if ! "$PY" -c "import pydicom, highdicom, pydantic, segmentation_models_pytorch" 2>/dev/null; then
        [ -d .whl ] || { echo "missing packages and no .whl/ (bash bench/gpu.sh --fetch-wheels, carry .whl)"; exit 2; }
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"  # py-spy's binary
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CXRTRIAGE_CACHE="${CXRTRIAGE_CACHE:-/tmp/cxrtriage-cache}" TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}"

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu-card.txt"
fi
status=0
timeout --signal=INT --kill-after=15 460 "$PY" bench/gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu.log" || status=$?
exit "$status"
