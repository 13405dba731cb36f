#!/usr/bin/env bash
# Styled-VQ with torchrun on one or many nodes: training (stage 1 / 2) and the distributed steps (dump, kmeans).
#   NPROC=8 bash scripts/train_styled_vq.sh --stage 1 --train-data data/images/train_clip.csv --out-dir runs/svq1
#   NPROC=8 bash scripts/train_styled_vq.sh dump --model runs/svq1 --data data/images/train_clip.csv --out runs/feats
#   NPROC=8 bash scripts/train_styled_vq.sh kmeans --features runs/feats --k 194560 --out runs/codebook.pt
# Environment (defaults in brackets): NPROC [all GPUs, or 1 without CUDA], NNODES [1], NODE_RANK [0],
# MASTER_ADDR [127.0.0.1], MASTER_PORT [29500]. All other arguments go to `python -m styled_vq`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_torchrun.sh
launch styled_vq "$@"
