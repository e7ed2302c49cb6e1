#!/usr/bin/env bash
# Everything that needs a GPU, in one command, within a time budget (default 560 s: under 10 minutes
# on an H100, autotuning and auto's backend timing included): the CUDA tests (bf16 too), the layer
# benchmark at the anchor shapes (each shape its own run, so one failure costs one shape; a run that
# fails, e.g. in torch.compile, is retried without torch.compile), one fine-tuning step of the 1B
# Llama-shaped model, the quantized-base benchmark (bench_quant.py), what auto chose, and
# $OUT/summary.json (benchmarks/summarize.py: ratios to the
# base per strategy, peft, torch.compile(peft), memory, fine-tune ratios, roofline ideals, targets,
# each stage's outcome). A stage that fails or runs out of time is recorded in status.tsv and the
# summary; the others still run. Runs from the source tree with the machine's python3 (no install).
# Output goes to $OUT when set, else benchmarks/out.
#
# Knobs (environment): GPU_CHECK_BUDGET_S, GPU_CHECK_SKIP (stages not to run, by the name's first word: any
# of info tests hopper layer quant moe multi dora more, or by a stage's whole name, e.g. more_finetune), PYTHON, LAYER_SHAPES ("M K N [ranks]; ..."), LAYER_ARGS,
# FINETUNE_ARGS, TEST_FILES, HOPPER_TEST_FILES; FUSED_LORA_CACHE_DIR (default $OUT/backend_cache: auto
# tunes afresh).
#
# The Hopper-path candidates (backends rows triton-tma, triton-onepass: sm_90 only) get their own
# test stage (their kernels have run on no GPU before: bf16 and TMA descriptors are checked here
# first), and the layer benchmark times each beside the pointer kernels, torch and peft.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export FUSED_LORA_CACHE_DIR="${FUSED_LORA_CACHE_DIR:-$out/backend_cache}"
py="${PYTHON:-python3}"
# Under one device command's 600 s. Every stage together needs more: the stages run in order of
# priority (below) and the later ones get what is left; a second command with
# GPU_CHECK_SKIP="info tests hopper layer quant moe multi dora" measures the rest (the more_* stages).
budget="${GPU_CHECK_BUDGET_S:-560}"
skip=" ${GPU_CHECK_SKIP:-} "
# "M K N [ranks...]; ...": the anchors' shapes; r=64 where a target or docs/DESIGN.md's roofline names it.
shapes="${LAYER_SHAPES:-8192 4096 4096 16 64; 2048 4096 4096 16 64; 8192 4096 14336 16; 8192 14336 4096 16}"
read -r -a layer_args <<< "${LAYER_ARGS:-}"
read -r -a finetune_args <<< "${FINETUNE_ARGS:-}"
read -r -a test_files <<< "${TEST_FILES:-tests/kernels/test_lora_kernels.py tests/kernels/test_segment_kernels.py tests/kernels/test_quantized_kernels.py tests/kernels/test_quantized_kernels_aligned.py tests/kernels/test_dequantize_kernel.py tests/dispatch/test_dequant_once_row.py tests/dispatch/test_quantized_check_rule.py tests/kernels/test_quantized_segment_kernels.py tests/dispatch/test_selection.py tests/ops/test_lora_op.py tests/modules/test_layer.py tests/kernels/test_grouped_kernels.py tests/dispatch/test_grouped_dispatch.py}"
read -r -a hopper_test_files <<< "${HOPPER_TEST_FILES:-tests/kernels/test_hopper_kernels.py tests/dispatch/test_hopper_rows.py}"
start=$SECONDS
status=0
: > "$out/status.tsv"

# stage NAME CAP RESERVE LOG CMD...: run CMD for at most CAP seconds, and never into the RESERVE
# seconds kept for later stages; output to the terminal and $out/LOG; one line in status.tsv.
stage() {
    local name=$1 cap=$2 reserve=$3 log=$4
    shift 4
    if [[ "$skip" == *" ${name%%_*} "* || "$skip" == *" $name "* ]]; then  # its first word, or its whole name
        printf '%s\tnot run\t0\t\n' "$name" >> "$out/status.tsv"
        echo "# $name not run (GPU_CHECK_SKIP)"
        return 124
    fi
    local left=$((budget - (SECONDS - start) - reserve))
    local limit=$((cap < left ? cap : left))
    if ((limit < 15)); then
        printf '%s\tskipped\t0\t\n' "$name" >> "$out/status.tsv"
        echo "# $name skipped: the time budget (${budget}s) is spent"
        status=1
        return 124  # like the time limit: no retry
    fi
    echo "# $name (at most ${limit}s)"
    local t0=$SECONDS
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$out/$log"
    local rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" "$log" >> "$out/status.tsv"
    ((rc == 0)) || { status=1; echo "# $name failed (exit $rc)"; }
    return "$rc"
}

stage info 30 0 info.log "$py" -m fused_lora info
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true; } | tee -a "$out/info.log"

# The first call answers every open GPU target at one shape each, in this order (caps and reserves sized to the
# 560 s budget: the tests, one layer shape, the quantized base, the MoE block, several adapters, DoRA); the
# "more_*" stages (the other shapes, the fine-tune steps, the quantized kernels alone, the DoRA kernel tests)
# take what is left, and a second call with GPU_CHECK_SKIP="info tests hopper layer quant moe multi dora" runs
# them with the whole budget.

# (The grouped kernels' tests, expert weights, compile their own variants: their kernels have run on no GPU.)
FUSED_LORA_CACHE_DIR="$out/test_backend_cache" \
    stage tests 140 330 gpu_tests.log "$py" -m pytest -q -p no:cacheprovider --durations=10 "${test_files[@]}"

# Off sm_90 these tests skip at once (the rows refuse the GPU); on it they compile ~40 variants.
FUSED_LORA_CACHE_DIR="$out/test_backend_cache" \
    stage hopper_tests 50 300 hopper_tests.log "$py" -m pytest -q -p no:cacheprovider --durations=5 \
    "${hopper_test_files[@]}"

# layer SHAPE PREFIX CAP RESERVE: bench_layer.py at one "M K N [ranks]" shape (its files layer_MxKxN.*, whatever
# the stage's prefix); a crash (the usual culprit: torch.compile(peft)), not the time limit, is retried without
# torch.compile so the shape's other figures are kept.
layer() {
    local M K N ranks
    read -r M K N ranks <<< "$1"
    [[ -n "${N:-}" ]] || return 0
    local file="layer_${M}x${K}x${N}" rank_args=()
    [[ -n "${ranks:-}" ]] && read -r -a rank_args <<< "--ranks $ranks"
    stage "$2$file" "$3" "$4" "$file.log" "$py" benchmarks/bench_layer.py --shape "$M" "$K" "$N" "${rank_args[@]}" \
        "${layer_args[@]}" --out "$out/$file"
    local rc=$?
    if ((rc != 0 && rc != 124 && rc != 137)) && [[ ! -e "$out/$file.csv" ]]; then
        stage "$2${file}_nocompile" 60 "$4" "${file}_nocompile.log" "$py" benchmarks/bench_layer.py \
            --shape "$M" "$K" "$N" "${rank_args[@]}" "${layer_args[@]}" --compile-ranks --out "$out/${file}_nocompile"
    fi
}
IFS=';' read -r -a shape_list <<< "$shapes"
# The first shape pays for compiling the kernels' variants; later ones reuse Triton's cache.
layer "${shape_list[0]}" "" 100 230

# A quantized (QLoRA) base (benchmarks/bench_quant.py; CSVs in $out/quant): an NF4 / int8 LoRA layer at
# 8192x4096x4096, r=16, bf16, with auto's choice and each row by name (in-loop triton, dequant-once, chunked torch)
# beside the 16-bit base (issue 21's target: NF4 with auto's choice <= 1.15x the 16-bit fused_lora layer) and
# peft + bitsandbytes (this machine has no bitsandbytes: its row says "not run"); bytes per parameter; the
# whole-weight dequantization's candidates and share of the layer.
stage quant 70 150 quant.log "$py" benchmarks/bench_quant.py --device cuda --shape 8192 4096 4096 --skip finetune \
    --out "$out/quant"

# LoRA on expert stacks (issue 20): an MoE block (16 experts, top-2, 8192 tokens, bf16), fused_lora's expert LoRA
# against peft's target_parameters and the base block through transformers' "grouped_mm" (torch's grouped GEMM);
# a correctness line first (the block's output against peft's with the same adapter), then the target <= 1.10x.
stage moe 60 90 moe.log "$py" benchmarks/bench_moe.py --gpu-suite --out "$out/moe.csv"

# Several adapters in one batch: the segment kernels (triton) and the torch path, mixed against a
# single-adapter batch of the same size (the target: <= 1.15x at k = 4), k = 1, 4, 16, and peft's loop.
stage multi 45 45 multi_adapter.log "$py" benchmarks/bench_multi_adapter.py --gpu-suite --out "$out/multi_adapter"

# DoRA beside LoRA (fused_lora's and peft's): layer at 8192x4096x4096 r=16 and a 1B fine-tuning step.
stage dora 45 0 dora.log "$py" benchmarks/bench_dora.py --gpu-suite --out "$out/dora.csv"

# ---- more: what is left of the budget (or a second call's whole budget)
stage more_finetune 100 0 finetune.log "$py" benchmarks/bench_finetune.py "${finetune_args[@]}" --out "$out/finetune.csv"
for shape in "${shape_list[@]:1}"; do
    layer "$shape" "more_" 75 0
done
stage more_quant 120 0 quant_14336.log "$py" benchmarks/bench_quant.py --device cuda --shape 8192 4096 14336 \
    --skip memory dequant finetune --out "$out/quant_14336"
stage more_quantfinetune 60 0 quant_finetune.log "$py" benchmarks/bench_quant.py --device cuda \
    --skip memory layer dequant --out "$out/quant"
# The quantized-base kernels alone (NF4, int8) against the 16-bit base at 8192x4096x4096, r=16 (issue 12's target),
# after a correctness line per format: Y and dX at that shape against the dequantized weight (exit 1 on a mismatch).
stage more_quantkernels 60 0 quant_kernels.log "$py" benchmarks/bench_quant_kernels.py --out "$out"
# DoRA's Triton kernels against the float64 reference on the GPU (bf16 too).
FUSED_LORA_CACHE_DIR="$out/test_backend_cache" \
    stage more_doratests 60 0 dora_tests.log "$py" -m pytest -q -p no:cacheprovider tests/ops/test_dora.py \
    -k "triton or only"

# What auto chose for each key, with the timings behind it (read from FUSED_LORA_CACHE_DIR).
timeout 60 "$py" -c "from fused_lora import backends; print(backends.report())" > "$out/backends_report.txt" 2>&1 \
    || status=1
cat "$out/backends_report.txt"

"$py" benchmarks/summarize.py "$out" || status=1
echo "# gpu_check: $((SECONDS - start))s, exit $status"
exit $status
