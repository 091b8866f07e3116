#!/usr/bin/env bash
# The paper's Table 2 (arXiv 2504.17040): LLaVA-1.5-7B in every dymu mode over 9 image benchmarks,
# through lmms-eval with the `dymu` model plugin, then one markdown table from the result folders.
#
# NOT RUN in dymu's development environment (no GPU, no model weights, no hub access): this script
# is the recipe, its numbers are yours to produce. Needs: a CUDA machine with hub access,
#   pip install torch  &&  pip install "dymu[eval]"
# and, for MM-Vet and LLaVA-Bench (GPT-judged in lmms-eval), OPENAI_API_KEY in the environment.
#
# Thresholds: calibrated here with `dymu calibrate` on CALIB_IMAGES (a folder or JSON list of images;
# the paper calibrates on images of LLaVA's instruction data), or put your own files (for example
# the paper's, converted with `dymu thresholds import`) at $THRESHOLDS/llava15-{low,mid,high}.json.
#
#   CALIB_IMAGES=/data/llava665k/images NPROC=8 bash examples/eval/table2_llava15.sh
set -euo pipefail

MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf}
OUT=${OUT:-results/table2}
THRESHOLDS=${THRESHOLDS:-thresholds}
NPROC=${NPROC:-8}          # processes (GPUs) for data-parallel evaluation
BATCH=${BATCH:-8}          # prompts per batch and process
TOME_R=${TOME_R:-16}       # ToMe merges per layer: 576 - 23*16 = 208 tokens, the `mid` budget
BUDGET=${BUDGET:-mid}      # thresholds the dtome and downsample baselines use (same average tokens)
TASKS=${TASKS:-gqa,mmbench_en_dev,mme,pope,scienceqa_img,seedbench,textvqa_val,mmvet,llava_in_the_wild}

mkdir -p "$THRESHOLDS" "$OUT"
for preset in low mid high; do
    file="$THRESHOLDS/llava15-$preset.json"
    if [ ! -f "$file" ]; then
        : "${CALIB_IMAGES:?set CALIB_IMAGES to calibrate $file (or put the file there)}"
        dymu calibrate --model "$MODEL" --images "$CALIB_IMAGES" --preset "$preset" --batch-size 64 --out "$file"
    fi
done

run() {  # run NAME MODEL_ARGS
    accelerate launch --num_processes "$NPROC" -m lmms_eval --model dymu \
        --model_args "pretrained=$MODEL,$2,batch_size=$BATCH" \
        --tasks "$TASKS" --log_samples --output_path "$OUT/$1"
}

run full       "mode=full"
run dymu-low   "mode=dymu,thresholds=$THRESHOLDS/llava15-low.json"
run dymu-mid   "mode=dymu,thresholds=$THRESHOLDS/llava15-mid.json"
run dymu-high  "mode=dymu,thresholds=$THRESHOLDS/llava15-high.json"
run tome       "mode=tome,r=$TOME_R"
run dtome      "mode=dtome,thresholds=$THRESHOLDS/llava15-$BUDGET.json"
run downsample "mode=downsample,thresholds=$THRESHOLDS/llava15-$BUDGET.json"

dymu report "$OUT" --out "$OUT/table2.md"
