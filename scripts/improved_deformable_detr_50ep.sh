#!/usr/bin/env bash
# Improved Deformable DETR baseline, ResNet-50, 50 epochs (official configs/improved_baseline.sh): the DETA
# model trained with Hungarian matching and no NMS (no --assign_* flags); 49.6 box AP on COCO val2017.
# Usage: [GPUS=8] [ACCUMULATE=1] [COCO_PATH=...] [OUTPUT_DIR=...] scripts/improved_deformable_detr_50ep.sh [main.py flags]
source "$(dirname "$0")/launch.sh"
launch improved_deformable_detr_50ep "${DETA_MODEL[@]}" --epochs 50 --lr_drop 40 "$@"
