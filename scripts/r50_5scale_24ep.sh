#!/usr/bin/env bash
# DETA, ResNet-50, 24 epochs (official configs/deta_2x.sh): 51.1 box AP on COCO val2017.
# Usage: [GPUS=8] [ACCUMULATE=1] [COCO_PATH=...] [OUTPUT_DIR=...] scripts/r50_5scale_24ep.sh [main.py flags]
source "$(dirname "$0")/launch.sh"
launch r50_5scale_24ep "${DETA_MODEL[@]}" --assign_first_stage --assign_second_stage \
    --epochs 24 --lr_drop 20 "$@"
