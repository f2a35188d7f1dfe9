#!/usr/bin/env bash
# Your own volumes from corpus to label-efficiency result: cache, MAE pretraining, fine-tuning from its encoder
# on fractions of the labelled patients with 5-fold cross-validation (and from scratch, on the same folds);
# each arm's final model is its fold ensemble, scored once on test. OUTPUT_DIR/results.json and report.png.
#   launch/recipes/volumes.sh --corpus DIR_OR_CSV [--corpus ...] --labels labels.csv --label malignant \
#       --group patient_id --output_dir runs/nodules --folds 5 --label_fractions 0.1,0.25,1.0
# Runs $VOLMAE_PYTHON (default: this checkout's .venv/bin/python); --help lists every option.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
exec "${VOLMAE_PYTHON:-$repo/.venv/bin/python}" "$repo/main_study.py" volumes "$@"
