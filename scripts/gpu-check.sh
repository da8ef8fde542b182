#!/usr/bin/env bash
# GPU checks, for a CUDA machine whose python3 already has torch and transformers (no network needed,
# no install: the package runs from this checkout).
#   1. exactness on the GPU: concurrent attention against the reference (fp32 and bf16) and one
#      worker against transformers' greedy decoding on tiny Llama, Mistral, Qwen2 and Qwen3 models;
#   2. the benchmark on a random-weight model shaped like Qwen2.5-7B, bf16, up to 8168 tokens of
#      shared prompt and 8 workers, with a profile of one step.
# Usage: scripts/gpu-check.sh [OUT_DIR] (default gpu-results). DEVICE=cuda:1, PRESET=tiny-qwen2 and
# CONTEXT=512 change the device, the model and the prompt lengths (a CPU dry run: DEVICE=cpu
# PRESET=tiny-qwen2 CONTEXT=64).
set -euo pipefail
out=${1:-gpu-results}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HOGWILD_TEST_DEVICE="$device" PYTHONUNBUFFERED=1
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
python3 -m pytest -q -p no:cacheprovider tests/test_attention.py \
    tests/test_engine.py::test_tiny_architectures_one_worker_equals_greedy 2>&1 | tee "$out/tests.log" \
    || echo "GPU TESTS FAILED (see $out/tests.log); running the benchmark anyway"
python3 -m hogwild.cli bench --random-config "${PRESET:-qwen2.5-7b}" --device "$device" --dtype bfloat16 \
    --context "${CONTEXT:-512,2048,8168}" --workers 1,2,4,8 --profile --out "$out/bench" 2>&1 | tee "$out/bench.log"
