#!/usr/bin/env bash
# The fine-tuning walk-through of docs/FINETUNING.md at demo size, on a CPU: train a base model on generated
# shapes of 3 classes, fine-tune it with --finetune on a second generated set of 2 other classes (the class
# heads are re-initialised, everything else is kept), and evaluate the result on that set.
#
# Usage: [PYTHON=...] [OUT=outputs/finetune_demo] [NUM_TRAIN=128] [NUM_VAL=32] [IMAGE_SIZE="128 192"]
#        bash scripts/finetune_demo.sh [main.py flags for all three runs, e.g. --epochs 2]
# Writes OUT/{base,new}_data (the generated sets), OUT/base, OUT/finetuned and OUT/eval (main.py's outputs).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -n "${PYTHON:-}" ] || [ ! -x .venv/bin/python ] || python=.venv/bin/python
OUT=${OUT:-outputs/finetune_demo}
SIZES=(--num_train "${NUM_TRAIN:-128}" --num_val "${NUM_VAL:-32}" --image_size ${IMAGE_SIZE:-128 192})
MODEL=(
    --backbone resnet18 --pretrained_backbone none --lr_backbone 2e-4
    --with_box_refine --two_stage --assign_first_stage --assign_second_stage
    --num_feature_levels 5 --enc_layers 2 --dec_layers 2 --hidden_dim 64 --nheads 4
    --dim_feedforward 256 --dropout 0.0 --num_queries 50 --cls_loss_coef 1.0
    --train_sizes 128,144,160,176,192 --max_size 256 --eval_size 160 --batch_size 4 --num_workers 1
)
data_flags() {  # main.py's flags of a generated set
    echo --train_json "$1/annotations/train.json" --train_images "$1/train" \
         --val_json "$1/annotations/val.json" --val_images "$1/val"
}
set -x
"$python" -m datasets.synthetic --out "$OUT/base_data" --seed 0 --classes circle,square,triangle "${SIZES[@]}"
"$python" -m datasets.synthetic --out "$OUT/new_data" --seed 1 --classes ring,cross "${SIZES[@]}"

# 1. The base model (in the walk-through: a published COCO checkpoint).
"$python" main.py $(data_flags "$OUT/base_data") "${MODEL[@]}" --epochs 8 --lr_drop 6 \
    --output_dir "$OUT/base" "$@"
# 2. Fine-tuning on the new classes: the base model's weights, new class heads, a new run.
"$python" main.py $(data_flags "$OUT/new_data") "${MODEL[@]}" --epochs 6 --lr_drop 4 \
    --finetune "$OUT/base/checkpoint.pth" --output_dir "$OUT/finetuned" "$@"
# 3. Evaluation of the fine-tuned model on the new set's validation images (coco_stats.json, coco_results.json).
"$python" main.py $(data_flags "$OUT/new_data") "${MODEL[@]}" --eval --resume "$OUT/finetuned/checkpoint.pth" \
    --output_dir "$OUT/eval" "$@"
