#!/usr/bin/env bash
# Train the DALLE transformer with torchrun on one or many nodes.
#   NPROC=8 bash scripts/train_dalle.sh --train-data data/train_tokens.pt --val-data data/val_tokens.pt --dim 512 ...
# Environment (defaults in brackets): NPROC [all GPUs, or 1 without CUDA], NNODES [1], NODE_RANK [0],
# MASTER_ADDR [127.0.0.1], MASTER_PORT [29500]. All other arguments go to `python -m dalle_train`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_torchrun.sh
launch dalle_train "$@"
