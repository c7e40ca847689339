#!/usr/bin/env bash
# The real-data study (README "Real photos from pretrained weights"): on four small real sets, all from one pretrained
# dense ViT and with the same images seen per task (same batches, resolution and schedule):
#   (a) one multi-task MoE model upcycled from the dense ViT (the recipe's `copy` experts), and the same with
#       compute-matched `partition` experts (a_moe_partition),
#   (b) four single-task dense models (the same ViT fine-tuned, one per task),
#   (c) the from-scratch recipe (training/configs/real_shared_data.yaml),
#   (d) the per-task models pruned out of (a) at the default threshold, evaluated like the rest.
#
#   DATA=../shared/data PRETRAINED=facebook/dinov2-small bash training/real_data_study.sh
#
# DATA holds cls/ det/ seg/ depth/ in the Hub column schemas (see the recipes); PRETRAINED is a Hub id or a local
# folder of a dense ViT, DeiT or DINOv2; STEPS (default 400) and OUT (default runs/real_data_study) are optional.
# Each run folder ends with eval_results.json; (d) writes pruned.json; times.txt holds every run's wall time.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${DATA:?set DATA to the folder holding cls/ det/ seg/ depth/}"
: "${PRETRAINED:?set PRETRAINED to a dense ViT / DeiT / DINOv2 (Hub id or folder)}"
STEPS=${STEPS:-400}
OUT=${OUT:-runs/real_data_study}
PATHS=(tasks.cls.dataset.path="$DATA/cls" tasks.det.dataset.path="$DATA/det" tasks.seg.dataset.path="$DATA/seg"
       tasks.depth.dataset.path="$DATA/depth")
mkdir -p "$OUT"

timed() {  # timed NAME COMMAND...: runs COMMAND, its output in OUT/NAME.log, its wall time in OUT/times.txt
  local name=$1 start
  shift
  start=$(date +%s)
  "$@" >"$OUT/$name.log" 2>&1
  echo "$name $(($(date +%s) - start)) s" >>"$OUT/times.txt"
}
train() {  # train NAME ARGS...: one training run of STEPS steps into OUT/NAME
  local name=$1
  shift
  timed "$name" modsquad train "$@" --max-steps "$STEPS" --output-dir "$OUT/$name" --overwrite training.save_every=0
}

train a_moe --config training/configs/real_from_dense.yaml model.pretrained="$PRETRAINED" "${PATHS[@]}"
train a_moe_partition --config training/configs/real_from_dense.yaml model.pretrained="$PRETRAINED" "${PATHS[@]}" \
  model.upcycling.mode=partition model.upcycling.router_init_std=0.1
for task in cls det seg depth; do
  train "b_dense_$task" --config training/configs/real_from_dense.yaml model.pretrained="$PRETRAINED" "${PATHS[@]}" \
    --only-task "$task" 'model.config.moe_layers=[]'
done
train c_scratch --config training/configs/real_shared_data.yaml "${PATHS[@]}"
# Calibrated on training images, scored on the validation splits.
timed d_pruned modsquad prune "$OUT/a_moe" --dataset cls="$DATA/cls" --dataset det="$DATA/det" \
  --dataset seg="$DATA/seg" --dataset depth="$DATA/depth" --calibration-split train --json "$OUT/pruned.json"
