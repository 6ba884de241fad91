#!/bin/bash
# Start `python ARGS...` as a multi-node torchrun job inside a SLURM allocation: one srun task per
# node, each running torchrun for that node's GPUs, rendezvous (c10d) on the allocation's first node.
# Usable wherever the suite expects a Python launcher, e.g. DVC's `launcher` parameter inside an
# allocation (`dvc exp run -S launcher=scripts/slurm/launch.sh`), or from train.sbatch.
#
#   scripts/slurm/launch.sh -m reproduce pretrain --model hrvit_b1 --profile paper ...
#
# A failed task ends the whole step at once (--kill-on-bad-exit); a SIGTERM (job preempted or
# requeued) reaches every torchrun, which forwards it to its ranks: they finish the current step,
# save checkpoint.pt and exit 143. Environment: GPUS_PER_NODE (default: SLURM's count or 8),
# RDZV_PORT (29500), PYTHON (python).
set -euo pipefail
: "${SLURM_JOB_ID:?run inside a SLURM allocation (sbatch or salloc)}"
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
exec srun --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
    "${PYTHON:-python}" -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD:${RDZV_PORT:-29500}" --rdzv-id="$SLURM_JOB_ID" "$@"
