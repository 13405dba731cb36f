#!/usr/bin/env bash
# Train a Chinese CLIP with torchrun on one or many nodes (the seed's open_clip flags work: --train-data, --val-data,
# --csv-img-key, --csv-caption-key, --batch-size, --lr, --wd, --epochs, --warmup, --workers, --model, ...).
#   NPROC=4 bash scripts/train_clip.sh --model RN50 --train-data data/images/train_clip.csv \
#       --val-data data/images/val_clip.csv --batch-size 64 --lr 1e-4 --wd 0.1 --epochs 30 --local-loss --gather-with-grad
# Environment (defaults in brackets): NPROC [all GPUs, or 1 without CUDA], NNODES [1], NODE_RANK [0],
# MASTER_ADDR [127.0.0.1], MASTER_PORT [29500]. All other arguments go to `python -m clip_train`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_torchrun.sh
launch clip_train "$@"
