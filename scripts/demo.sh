#!/usr/bin/env bash
# The README's main job on a CPU: set up .venv, generate the synthetic COCO-format data set, train a
# small DETA on it (the full DETA code path at reduced size), evaluate with pycocotools.
# Extra arguments go to main.py (e.g. --epochs 2 for a quicker look).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements.txt
DATA=${DATA:-data/synthetic}
OUTPUT_DIR=${OUTPUT_DIR:-outputs/demo}
[ -f "$DATA/annotations/val.json" ] || .venv/bin/python -m datasets.synthetic --out "$DATA" --seed 0
.venv/bin/python main.py \
    --train_json "$DATA/annotations/train.json" --train_images "$DATA/train" \
    --val_json "$DATA/annotations/val.json" --val_images "$DATA/val" \
    --backbone resnet18 --pretrained_backbone none --lr_backbone 2e-4 \
    --with_box_refine --two_stage --assign_first_stage --assign_second_stage \
    --num_feature_levels 5 --enc_layers 2 --dec_layers 2 --hidden_dim 64 --nheads 4 \
    --dim_feedforward 256 --dropout 0.0 --num_queries 50 --cls_loss_coef 1.0 \
    --train_sizes 128,144,160,176,192 --max_size 256 --eval_size 160 \
    --batch_size 4 --epochs 12 --lr_drop 10 --num_workers 1 --print_freq 20 \
    --output_dir "$OUTPUT_DIR" "$@"
