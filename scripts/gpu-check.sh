#!/usr/bin/env bash
# GPU checks, for a CUDA machine whose python3 already has torch, transformers (>= 5.17), triton,
# pytest and hypothesis (no network, no install: the package runs from this checkout). Budget: under
# 11 minutes on a fresh H100/H200, Triton compiles and graph captures included; every phase has its
# own timeout (120 + 170 + 130 + 50 + 150 s) so the script always ends and writes what it has (the benchmark
# writes bench.json after every cell, and the cells done when it is cut off).
#   1. exactness on the GPU: both attention backends against the reference (fp32, bf16), the fused
#      kernel on random layouts, one worker against transformers' greedy decoding on tiny Llama,
#      Mistral, Qwen2 and Qwen3 models with torch (eager) and triton (CUDA graphs), the lean
#      decoder's fused kernels against torch and its passes against transformers' modules (fp32, bf16);
#   2. the benchmark on a random-weight model shaped like Qwen2.5-7B, bf16: hogwild-triton (graphs,
#      lean decoder), hogwild-triton-modules (graphs, transformers' modules), hogwild-torch (eager) and
#      transformers eager, N = 1, 2, 4, 8 and
#      L = 8192, 32736, 2048 (the goals' context first, then the longest: a timeout cuts the short
#      cells; 32736 leaves room for the decoded tokens in 32768 positions), with a torch.profiler
#      trace of each method; then
#      hogwild-triton against transformers compiled (StaticCache + torch.compile) at L = 8192;
#   3. `hogwild solve` end to end on the same random model (worker tokens/s over a 512-pass run);
#   4. quantized weights (needs torchao, bitsandbytes): a random model of QUANT_PRESET (default
#      tiny-qwen2-gqa7) saved to disk, then `bench` with --quantize int8 and nf4 (hogwild-triton with
#      graphs and the lean decoder, hogwild-torch; weight bytes in bench.json) and `solve --json`.
# Usage: scripts/gpu-check.sh [OUT_DIR] (default gpu-results). A CPU dry run (tiny model, small grid):
#   DEVICE=cpu PRESET=tiny-qwen2 CONTEXT=300,64 WORKERS=2,1 STEPS=3 BUDGET=8 DTYPE=float32 \
#     COMPILED_CONTEXT=64 COMPILED_WORKERS=1 COMPILE_BACKEND=eager scripts/gpu-check.sh /tmp/gpu-dry
set -uo pipefail
out=${1:-gpu-results}
device=${DEVICE:-cuda}
preset=${PRESET:-qwen2.5-7b}
dtype=${DTYPE:-bfloat16}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HOGWILD_TEST_DEVICE="$device" PYTHONUNBUFFERED=1
[ "$device" = cpu ] && export TRITON_INTERPRET=1
start=$SECONDS
phase() { echo "== $1 ($((SECONDS - start)) s)"; }

phase versions
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python3 -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers",
transformers.__version__, "triton", triton.__version__, "device", torch.cuda.get_device_name() if
torch.cuda.is_available() else "cpu")'
  git rev-parse HEAD 2>/dev/null || true; } 2>&1 | tee "$out/versions.txt"

phase "exactness tests"
tests=(tests/test_attention.py tests/test_triton_attention.py
       tests/test_engine.py::test_tiny_architectures_one_worker_equals_greedy tests/test_lean.py
       tests/test_collaboration.py::test_identical_keys_share_by_length
       tests/test_collaboration.py::test_backends_agree_and_rows_sum_to_one)
timeout "${TEST_TIMEOUT:-120}" python3 -m pytest -q -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$out/tests.log" \
    || echo "GPU TESTS FAILED OR TIMED OUT (see $out/tests.log); going on"

phase benchmark
timeout -s INT "${BENCH_TIMEOUT:-170}" python3 -m hogwild.cli bench --random-config "$preset" --device "$device" \
    --dtype "$dtype" --workers "${WORKERS:-8,4,2,1}" --context "${CONTEXT:-8192,32736,2048}" \
    --steps "${STEPS:-10}" --warmup 3 --methods "${METHODS:-hogwild-triton,hogwild-triton-modules,hogwild-torch,transformers}" \
    --profile --out "$out/bench" 2>&1 | tee "$out/bench.log" \
    || echo "BENCHMARK FAILED OR TIMED OUT (see $out/bench.log); going on"

# transformers compiled apart: its compile takes minutes, and a run cut short inside it measures nothing.
phase "benchmark against compiled transformers"
timeout -s INT "${COMPILED_TIMEOUT:-130}" python3 -m hogwild.cli bench --random-config "$preset" --device "$device" \
    --dtype "$dtype" --workers "${COMPILED_WORKERS:-4,1}" --context "${COMPILED_CONTEXT:-8192}" \
    --steps "${STEPS:-10}" --warmup 3 --methods hogwild-triton,transformers-compiled \
    ${COMPILE_BACKEND:+--compile-backend "$COMPILE_BACKEND"} --out "$out/bench-compiled" 2>&1 \
    | tee "$out/bench-compiled.log" || echo "COMPILED BENCHMARK FAILED OR TIMED OUT; going on"

phase "solve end to end"
timeout "${SOLVE_TIMEOUT:-50}" python3 -m hogwild.cli solve "What is 17 * 23?" --random-config "$preset" \
    --device "$device" --dtype "$dtype" --workers 4 --budget "${BUDGET:-512}" --json > "$out/solve.json" \
    2> "$out/solve.log" || echo "SOLVE FAILED OR TIMED OUT (see $out/solve.log)"
python3 - "$out/solve.json" <<'EOF' 2>&1 | tee -a "$out/solve.log"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as exc:  # the run failed: its log says why
    sys.exit(f"no solve result: {exc}")
decode = r.get("timings", {}).get("decode") or r["elapsed_s"]
print(f"solve: {r['forward_passes']} passes, {r['tokens_generated']} worker tokens, decode {decode:.2f} s, "
      f"{r['tokens_generated'] / decode:.1f} worker tokens/s, elapsed {r['elapsed_s']:.2f} s")
EOF
phase "quantized weights"
quant() {  # a random model saved to disk, then each scheme: the benchmark (weight bytes in bench.json) and a solve
  local model="$out/quant-model"
  python3 -c 'import sys, torch
from hogwild.models import random_model
m = random_model(sys.argv[2], dtype=torch.bfloat16)
m.model.save_pretrained(sys.argv[1]); m.tokenizer.save_pretrained(sys.argv[1])' "$model" "${QUANT_PRESET:-tiny-qwen2-gqa7}" \
      || return 1
  for scheme in int8 nf4; do
    python3 -m hogwild.cli bench --model "$model" --quantize "$scheme" --device "$device" --workers 4,1 --context 2048 \
        --steps 10 --warmup 3 --methods "${QUANT_METHODS:-hogwild-triton,hogwild-torch}" --out "$out/bench-$scheme" \
        || echo "QUANTIZED BENCHMARK ($scheme) FAILED"
    python3 -m hogwild.cli solve "What is 17 * 23?" --model "$model" --quantize "$scheme" --device "$device" \
        --workers 2 --budget 64 --json > "$out/solve-$scheme.json" || echo "QUANTIZED SOLVE ($scheme) FAILED"
  done
}
export -f quant phase; export out device start
timeout "${QUANT_TIMEOUT:-150}" bash -c quant 2>&1 | tee "$out/quantized.log" \
    || echo "QUANTIZED RUN FAILED OR TIMED OUT (see $out/quantized.log)"
phase done
