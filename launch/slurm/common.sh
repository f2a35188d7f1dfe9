# Shared by the VolMAE batch scripts: run one torchrun per node and handle preemption.
#   run_volmae SCRIPT.py ARGS...   ->  srun (1 task/node) -> torchrun (NPROC ranks/node) -> SCRIPT.py ARGS
# Environment: OUTPUT_DIR (default runs/$SLURM_JOB_NAME-$SLURM_JOB_ID; a requeued job keeps its id and resumes there),
# VOLMAE_PYTHON (default .venv/bin/python), NPROC_PER_NODE (default: GPUs on the node, else 1).

PYTHON=${VOLMAE_PYTHON:-.venv/bin/python}
OUTPUT_DIR=${OUTPUT_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
mkdir -p "$OUTPUT_DIR"

run_volmae() {
    local script=$1
    shift
    local master gpus nproc cpus pid status
    master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    gpus=${SLURM_GPUS_ON_NODE:-0}
    nproc=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
    cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
    export OMP_NUM_THREADS=$(( cpus / nproc > 0 ? cpus / nproc : 1 ))
    echo "$(date) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $SLURM_NNODES node(s) x $nproc rank(s), output $OUTPUT_DIR"

    # SLURM warns the batch shell (--signal=B:USR1@...) or terminates it: ask every rank to checkpoint and stop.
    trap 'echo "$(date) signal received: asking VolMAE to checkpoint and stop"; touch "$OUTPUT_DIR/STOP"' USR1 TERM
    srun --kill-on-bad-exit=1 --ntasks-per-node=1 "$PYTHON" -m torch.distributed.run \
        --nnodes="$SLURM_NNODES" --nproc_per_node="$nproc" --rdzv_backend=c10d \
        --rdzv_endpoint="$master:${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}" --rdzv_id="$SLURM_JOB_ID" \
        "$script" "$@" &
    pid=$!
    status=0
    wait "$pid" || status=$?
    while kill -0 "$pid" 2>/dev/null; do  # a trapped signal ends `wait` early: keep waiting for the checkpoint
        status=0
        wait "$pid" || status=$?
    done
    if [ -f "$OUTPUT_DIR/PREEMPTED" ]; then
        echo "$(date) checkpointed after step $(cat "$OUTPUT_DIR/PREEMPTED"); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "$(date) finished with status $status"
    exit "$status"
}
