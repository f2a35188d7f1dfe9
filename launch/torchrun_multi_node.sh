#!/usr/bin/env bash
# Several machines with c10d rendezvous. Run the same command on every node:
#   NNODES=4 NPROC=8 RDZV_HOST=node01 RDZV_ID=ct-vitl launch/torchrun_multi_node.sh main_pretrain.py --data_path ...
# RDZV_HOST is any one of the nodes (reachable by all); RDZV_PORT a free port on it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${VOLMAE_PYTHON:-.venv/bin/python}
: "${NNODES:?set NNODES}" "${RDZV_HOST:?set RDZV_HOST}"
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="${NPROC:-1}" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV_HOST:${RDZV_PORT:-29400}" --rdzv_id="${RDZV_ID:-volmae}" \
    --max-restarts="${MAX_RESTARTS:-0}" "$@"
