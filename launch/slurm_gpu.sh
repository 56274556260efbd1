#!/usr/bin/env bash
# Trains on a SLURM GPU cluster: one batch job whose `srun` starts `python -m vggjax.main` on
# every node, where jax.distributed reads the job's layout from SLURM's environment.
#
#   bash launch/slurm_gpu.sh --nodes=2 --gpus-per-node=8 --workdir=/shared/runs/vgg16 \
#       --setup='source ~/venvs/vggjax/bin/activate' -- --config=configs/vgg16.py \
#       --config.data_dir=/shared/tensorflow_datasets
#
# Run it from this checkout on a login node, where the checkout, the virtual environment
# (`pip install -e '.[gpu]'`, once) and the workdir are on storage the compute nodes share.
# It writes WORKDIR/train.sbatch, submits it, follows the job's log (Ctrl-C stops following, not
# the job) and prints the scancel command. Everything after `--` goes to vggjax.main unchanged.
# SLURM sends SIGTERM 5 minutes before --time runs out: vggjax saves a checkpoint and exits, and
# the same command resumes.
#
# Options:
#   --workdir=DIR          checkpoints, logs, results, the job's output (required)
#   --nodes=N              (default 1)
#   --gpus-per-node=G      (default 8)
#   --per-node             one process per node driving its G GPUs, instead of one per GPU
#   --time=LIMIT           SLURM time limit, e.g. 24:00:00 (default: the partition's)
#   --partition=NAME, --account=NAME, --cpus-per-task=N   passed to SLURM
#   --setup=COMMANDS       run before training on each node, e.g. module loads, venv activation
#   --job-name=NAME        (default vggjax)
#   --dependency=SPEC      start only after other jobs, e.g. afterok:123:124 (sbatch's option)
#   --no-follow            print the job's id and return instead of following its log
#   --dry-run              print the batch script and the commands instead of running them
set -euo pipefail

script=slurm_gpu.sh
source "$(dirname "$0")/common.sh"

workdir="" nodes=1 gpus=8 per_node=false time="" partition="" account="" cpus="" setup=""
job_name=vggjax dry_run=false dependency="" follow=true
while (($#)); do
  case "$1" in
    --workdir=*) workdir="${1#*=}" ;;
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus="${1#*=}" ;;
    --per-node) per_node=true ;;
    --time=*) time="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --cpus-per-task=*) cpus="${1#*=}" ;;
    --setup=*) setup="${1#*=}" ;;
    --job-name=*) job_name="${1#*=}" ;;
    --dependency=*) dependency="${1#*=}" ;;
    --no-follow) follow=false ;;
    --dry-run) dry_run=true ;;
    --) shift; break ;;
    *) die "unknown option '$1' (training flags go after --); see the top of $0" ;;
  esac
  shift
done
train_args=("$@")

[[ -n "$workdir" ]] || die "--workdir is required: a directory every node sees"
for count in "nodes=$nodes" "gpus-per-node=$gpus" ${cpus:+"cpus-per-task=$cpus"}; do
  [[ "${count#*=}" =~ ^[1-9][0-9]*$ ]] || die "--$count: must be a positive integer"
done
check_train_args "${train_args[@]}"
[[ "$workdir" == /* ]] || workdir="$PWD/$workdir"  # the job runs elsewhere
root=$(cd "$(dirname "$0")/.." && pwd)

if $per_node; then
  tasks=1
  layout="# One process per node: JAX would otherwise bind each process to GPU SLURM_LOCALID.
export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))"
else
  tasks=$gpus
  layout="# One process per GPU: every task sees the node's GPUs; JAX gives task i GPU i."
fi
batch="#!/bin/bash
#SBATCH --job-name=$job_name
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$tasks
#SBATCH --gpus-per-node=$gpus
#SBATCH --output=$workdir/slurm-%j.out
#SBATCH --signal=TERM@300
${time:+#SBATCH --time=$time
}${partition:+#SBATCH --partition=$partition
}${account:+#SBATCH --account=$account
}${cpus:+#SBATCH --cpus-per-task=$cpus
}set -e
$layout
${setup:+$setup
}cd $(show "$root")
srun python -m vggjax.main --workdir=$(show "$workdir") $(show "${train_args[@]}")"

sbatch_file="$workdir/train.sbatch"
submit=(sbatch --parsable ${dependency:+--dependency="$dependency"} "$sbatch_file")
if $dry_run; then
  echo "# $sbatch_file:"
  echo "$batch"
  echo "# submit and follow:"
  show mkdir -p "$workdir"
  show "${submit[@]}"
  $follow || exit 0
  echo "tail -n +1 -F $(show "$workdir")/slurm-JOBID.out"
  exit 0
fi
mkdir -p "$workdir"
echo "$batch" > "$sbatch_file"
job=$("${submit[@]}")
job=${job%%;*}  # "JOBID;CLUSTER" on federated clusters
$follow || { echo "$job"; exit 0; }
trap 'echo "# To stop job $job (its checkpoints stay in $workdir):"
      echo "scancel $job"' EXIT
echo "# Submitted job $job; following its log (Ctrl-C stops following, not the job)."
tail -n +1 -F "$workdir/slurm-$job.out"
