#!/usr/bin/env bash
# MedMNIST (2D or 3D) from data to result: MAE self-pretraining on the training split, fine-tuning from its
# encoder for each seed, and with --baseline the same architecture from scratch; OUTPUT_DIR/results.json.
#   launch/recipes/medmnist.sh --data_flag adrenalmnist3d --size 28 --data_root ../shared/data/medmnist \
#       --output_dir runs/adrenal28 --seeds 0,1,2 --baseline
# Runs $VOLMAE_PYTHON (default: this checkout's .venv/bin/python); --help lists every option.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
exec "${VOLMAE_PYTHON:-$repo/.venv/bin/python}" "$repo/main_study.py" medmnist "$@"
