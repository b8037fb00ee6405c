#!/bin/bash
# Multi-node distillation under SLURM: one `accelerate launch` per node (srun), each starting one process per GPU.
#
#   RECIPE=cifar10-ddpm-resnet18 RUN_DIR=/shared/runs/c10 sbatch examples/cluster/slurm-multinode.sh \
#       --set data_root=/shared/data/cifar10-jpg
#
# Arguments after the script go to `distill train` (e.g. --set key=value ...). RUN_DIR must be on storage every node
# sees at the same path (docs/cluster.md): the main process writes the run there, every process writes its RNG state
# into each checkpoint, and a resume reads it on every node. Submitted again (or requeued) with the same RUN_DIR,
# it resumes from the newest checkpoint. Adjust the #SBATCH lines (partition, account, GPUs) to your cluster.
#SBATCH --job-name=distill
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail

: "${RECIPE:?set RECIPE to a recipe name or YAML file}"
: "${RUN_DIR:?set RUN_DIR to the run directory on shared storage}"
export RECIPE RUN_DIR
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))          # total over all nodes
export MAIN_PROCESS_IP
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')  # node 0: the main process
# (awk, not head -n 1: head closes the pipe early, scontrol dies of SIGPIPE and pipefail ends the job)
export MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
export MIXED_PRECISION=${MIXED_PRECISION:-bf16}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}     # compute nodes read the hub cache (HF_HOME) on shared storage
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
RESUME=()
if [ -f "$RUN_DIR/config.yaml" ]; then RESUME=(--resume); fi  # a requeued or resubmitted job continues the run

echo "distill on $SLURM_NNODES nodes x $GPUS_PER_NODE GPUs = $NUM_PROCESSES processes; main process" \
     "$MAIN_PROCESS_IP:$MAIN_PROCESS_PORT; run $RUN_DIR ${RESUME[*]}"

# One task per node; SLURM_NODEID (0 .. nnodes-1) is each node's machine rank, read inside the task.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  exec accelerate launch --multi_gpu --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes "$NUM_PROCESSES" --main_process_ip "$MAIN_PROCESS_IP" \
    --main_process_port "$MAIN_PROCESS_PORT" --rdzv_backend static --same_network \
    --mixed_precision "$MIXED_PRECISION" \
    -m distill.cli train "$RECIPE" -o "$RUN_DIR" --no-progress "$@"' bash "${RESUME[@]}" "$@"
