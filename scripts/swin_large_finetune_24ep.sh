#!/usr/bin/env bash
# DETA, Swin-L, COCO fine-tuning of an Objects365 checkpoint, 24 epochs (official configs/deta_swin_ft.sh):
# 62.9 box AP on COCO val2017. Official run: 2 nodes x 8 GPUs, 1 image per GPU (16 in all), --bigger scales.
# Needs the Swin-L backbone and a pre-trained checkpoint, passed as --finetune (class heads of another size
# are dropped).
# Usage: NNODES=2 NODE_RANK=... MASTER_ADDR=... scripts/swin_large_finetune_24ep.sh --finetune o365.pth
source "$(dirname "$0")/launch.sh"
launch swin_large_finetune_24ep "${DETA_MODEL[@]}" --assign_first_stage --assign_second_stage \
    --epochs 24 --lr_drop 20 --lr 5e-5 --lr_backbone 5e-6 --batch_size 1 --backbone swin --bigger "$@"
