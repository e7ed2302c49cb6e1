#!/usr/bin/env bash
# Everything that needs a GPU, in one command (aimed at under 6 minutes on an H100, autotuning
# included): the CUDA tests (bf16 too), the layer benchmark at the anchor shapes, and one
# fine-tuning step of the 1B Llama-shaped model. Runs from the source tree with the machine's own
# python3 (no install needed). Logs, CSVs and the PNG go to $OUT when set, else benchmarks/out.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
status=0

python3 -m fused_lora info | tee "$out/info.log"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$out/info.log"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_ops.py tests/test_layer.py \
    2>&1 | tee "$out/gpu_tests.log" || status=1
python3 benchmarks/bench_layer.py --gpu-suite --out "$out/layer" 2>&1 | tee "$out/layer.log" || status=1
python3 benchmarks/bench_finetune.py --out "$out/finetune.csv" 2>&1 | tee "$out/finetune.log" || status=1
exit $status
