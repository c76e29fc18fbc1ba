#!/usr/bin/env bash
# Train on a Slurm cluster: one task per node runs a config script, whose torchrun starts GPUS processes there.
#
#   sbatch --nodes=2 scripts/slurm_train.sh scripts/swin_large_finetune_24ep.sh --finetune o365.pth
#   sbatch --nodes=1 --partition=gpu scripts/slurm_train.sh scripts/r50_5scale_12ep.sh
#
# Any sbatch option can be given on the command line (they override the #SBATCH lines). COCO_PATH and
# OUTPUT_DIR pass through the environment as for the config scripts.
#SBATCH --job-name=deta
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=slurm-%j.out
set -euo pipefail

export GPUS=${GPUS:-${SLURM_GPUS_ON_NODE:-8}}
export NNODES=$SLURM_JOB_NUM_NODES
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}  # distinct per job on a shared node

# SLURM_NODEID is set per task by srun, hence the inner shell.
srun --kill-on-bad-exit=1 bash -c 'NODE_RANK=$SLURM_NODEID exec "$@"' _ "$@"
