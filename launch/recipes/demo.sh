#!/usr/bin/env bash
# The whole pipeline on built-in synthetic CT phantoms, what `make demo` runs: labelled phantoms, HDF5 cache,
# MAE pretraining, fine-tuning from its encoder, prediction with explanations, and a summary.
#   launch/recipes/demo.sh [--output_dir demo_output] [--count 320] [--seed 0] ...
# Runs $VOLMAE_PYTHON (default: this checkout's .venv/bin/python); --help lists every option.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
exec "${VOLMAE_PYTHON:-$repo/.venv/bin/python}" "$repo/main_study.py" demo "$@"
