#!/usr/bin/env bash
# One machine, all its GPUs (or N CPU processes with gloo):
#   NPROC=4 launch/torchrun_single_node.sh main_pretrain.py --data_path /cache/ct256 --model mae_vit_base_patch16 ...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${VOLMAE_PYTHON:-.venv/bin/python}
if [ -z "${NPROC:-}" ]; then
    NPROC=$(command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l || echo 1)
    [ "$NPROC" -gt 0 ] || NPROC=1
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$@"
