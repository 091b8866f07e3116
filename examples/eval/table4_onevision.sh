#!/usr/bin/env bash
# The paper's Table 4 (arXiv 2504.17040): DyMU on LLaVA-OneVision-7B (SigLIP, AnyRes crops) over image
# and video benchmarks, through lmms-eval with the `dymu` model plugin, then one markdown table with
# the mean visual tokens per image and per video next to the scores.
#
# NOT RUN in dymu's development environment (no GPU, no model weights, no hub access): this script
# is the recipe, its numbers are yours to produce. Needs: a CUDA machine with hub access,
#   pip install torch  &&  pip install "dymu[eval,video]"
# TASKS: lmms-eval task names for the benchmarks of the paper's OneVision table; compare them with the
# table you reproduce and override IMAGE_TASKS / VIDEO_TASKS to match it exactly.
#
# Thresholds: calibrated here with `dymu calibrate` on CALIB_IMAGES (a folder or JSON list of images;
# calibration runs on the AnyRes crops, as the model sees them), or put your own files at
# $THRESHOLDS/onevision-{low,mid,high}.json.
#
#   CALIB_IMAGES=/data/llava665k/images NPROC=8 bash examples/eval/table4_onevision.sh
set -euo pipefail

MODEL=${MODEL:-llava-hf/llava-onevision-qwen2-7b-ov-hf}
OUT=${OUT:-results/table4}
THRESHOLDS=${THRESHOLDS:-thresholds}
NPROC=${NPROC:-8}            # processes (GPUs) for data-parallel evaluation
BATCH=${BATCH:-4}            # prompts per batch and process, image tasks
VIDEO_BATCH=${VIDEO_BATCH:-1}  # video tasks: 32 frames x 196 pooled positions each
FRAMES=${FRAMES:-32}         # frames taken evenly from each video (lmms-eval's usual max_frames_num)
TOME_R=${TOME_R:-16}         # ToMe merges per layer: the fixed-length baseline
IMAGE_TASKS=${IMAGE_TASKS:-gqa,mmbench_en_dev,mme,pope,scienceqa_img,seedbench,mmmu_val,ai2d}
VIDEO_TASKS=${VIDEO_TASKS:-videomme,mvbench,mlvu_dev,egoschema_subset}

mkdir -p "$THRESHOLDS" "$OUT"
for preset in low mid high; do
    file="$THRESHOLDS/onevision-$preset.json"
    if [ ! -f "$file" ]; then
        : "${CALIB_IMAGES:?set CALIB_IMAGES to calibrate $file (or put the file there)}"
        dymu calibrate --model "$MODEL" --images "$CALIB_IMAGES" --preset "$preset" --batch-size 64 --out "$file"
    fi
done

run() {  # run NAME MODEL_ARGS: the image tasks, then the video tasks (same row in the report)
    accelerate launch --num_processes "$NPROC" -m lmms_eval --model dymu \
        --model_args "pretrained=$MODEL,$2,batch_size=$BATCH" \
        --tasks "$IMAGE_TASKS" --log_samples --output_path "$OUT/$1/image"
    accelerate launch --num_processes "$NPROC" -m lmms_eval --model dymu \
        --model_args "pretrained=$MODEL,$2,batch_size=$VIDEO_BATCH,max_frames_num=$FRAMES" \
        --tasks "$VIDEO_TASKS" --log_samples --output_path "$OUT/$1/video"
}

run full       "mode=full"
run dymu-low   "mode=dymu,thresholds=$THRESHOLDS/onevision-low.json"
run dymu-mid   "mode=dymu,thresholds=$THRESHOLDS/onevision-mid.json"
run dymu-high  "mode=dymu,thresholds=$THRESHOLDS/onevision-high.json"
run tome       "mode=tome,r=$TOME_R"
# dtome and downsample are not defined for AnyRes models (dymu.apply refuses them with the reason).

dymu report "$OUT" --out "$OUT/table4.md"
