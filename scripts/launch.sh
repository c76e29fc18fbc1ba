# Sourced by the config scripts: `launch NAME MAIN_PY_FLAGS...` runs main.py under torchrun.
#
# Environment (all optional):
#   GPUS         processes (GPUs) per node                     default 8
#   ACCUMULATE   micro-batches per optimizer step (--accumulate): GPUS=2 ACCUMULATE=4 makes the 8-GPU batch
#                exactly                                        default 1, or the --resume checkpoint's
#   NNODES       nodes                                         default 1
#   NODE_RANK    this node's index, 0..NNODES-1                default 0
#   MASTER_ADDR  host of node 0                                default 127.0.0.1
#   MASTER_PORT  free TCP port on node 0                       default 29500
#   COCO_PATH    COCO root (train2017/, val2017/, annotations/) default ./data/coco
#   OUTPUT_DIR   checkpoints and logs                          default exps/NAME
#   PYTHON       interpreter with torch                        default .venv/bin/python (scripts/setup.sh), else python3
# Relative paths are relative to the current folder (run from the repository root for the defaults).
# Flags given to the config script come last, so they override the config's.

launch() {
    local name=$1
    shift
    local repo
    repo="$(dirname "${BASH_SOURCE[0]}")/.."
    local python=${PYTHON:-python3}
    [ -n "${PYTHON:-}" ] || [ ! -x "$repo/.venv/bin/python" ] || python="$repo/.venv/bin/python"
    set -x
    exec "$python" -m torch.distributed.run \
        --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="${GPUS:-8}" \
        --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
        "$repo/main.py" --coco_path "${COCO_PATH:-./data/coco}" --output_dir "${OUTPUT_DIR:-exps/$name}" \
        ${ACCUMULATE:+--accumulate "$ACCUMULATE"} "$@"
}

# The model of every DETA config (official configs/*.sh): two-stage Deformable DETR with box refinement,
# 5 feature levels, 900 queries.
DETA_MODEL=(
    --with_box_refine --two_stage --num_feature_levels 5 --num_queries 900
    --dim_feedforward 2048 --dropout 0.0 --cls_loss_coef 1.0
)
