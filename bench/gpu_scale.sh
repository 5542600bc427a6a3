#!/usr/bin/env bash
# Every GPU figure of the scale work in one run inside a device lease (about 7 minutes on one H200):
#
#   make gpu-wheels                                   # here: the pure-Python dependencies, into .wheels/
#   device run, carry [".wheels"]:  bash bench/gpu_scale.sh   # there: results under $OUT
#
# The device machine has torch and transformers but no network, hence the carried wheels.
# Static-decoder tests on CUDA (graph replay == eager to 1e-5 in float32), then bench/bench_scale.py
# with the real Qwen3 shapes: loss memory, micro-steps, decode, whole steps and the projection.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-scale}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TRANSFORMERS_VERBOSITY=error
if [ -d .wheels ]; then
  python -m pip install -q --no-index --find-links .wheels fastapi uvicorn httpx msgpack pysimdjson pydantic-settings \
    prometheus-client pyyaml rich pytest pytest-asyncio hypothesis 2>&1 | tail -3
fi
python -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))" \
  | tee "$OUT/versions.txt"
timeout 150 python -m pytest -q -p no:cacheprovider tests/shared/test_static_decode.py 2>&1 | tail -15 \
  | tee "$OUT/static_decode_tests.txt"
timeout 480 python -m bench.bench_scale --out "$OUT" 2>&1 | tee "$OUT/bench_scale.log" | tail -120
