#!/usr/bin/env bash
# Your own volumes from corpus to label-efficiency result: cache, MAE pretraining per seed, fine-tuning from its
# encoder on fractions of the labelled patients (and from scratch with --baseline); OUTPUT_DIR/results.json and
# OUTPUT_DIR/report.png.
#   launch/recipes/volumes.sh --corpus DIR_OR_CSV [--corpus ...] --labels labels.csv --label malignant \
#       --group patient_id --output_dir runs/nodules --seeds 0,1,2 --label_fractions 0.1,0.25,1.0 --baseline
# Runs $VOLMAE_PYTHON (default: this checkout's .venv/bin/python); --help lists every option.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
exec "${VOLMAE_PYTHON:-$repo/.venv/bin/python}" "$repo/main_study.py" volumes "$@"
