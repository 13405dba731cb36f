#!/usr/bin/env bash
# Train an image tokenizer with torchrun on one or many nodes.
#   NPROC=4 bash scripts/train_vae.sh --model vqgan --train-data data/images/train_clip.csv --val-data ...
# Environment (defaults in brackets): NPROC [all GPUs, or 1 without CUDA], NNODES [1], NODE_RANK [0],
# MASTER_ADDR [127.0.0.1], MASTER_PORT [29500]. All other arguments go to `python -m vae_train`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_torchrun.sh
launch vae_train "$@"
