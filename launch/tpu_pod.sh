#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: the same `python3 -m vggjax.main` command on every worker, where
# jax.distributed finds the other workers by itself.
#
#   bash launch/tpu_pod.sh --name=vgg16-pod --zone=us-central2-b --accelerator=v4-32 \
#       --workdir=gs://my-bucket/runs/vgg16 -- --config=configs/vgg16.py --config.data_dir=/mnt/tfds
#
# Creates the slice (or reuses the one of that name), copies this checkout to every worker (or
# clones --repo there), installs it with `pip install -e .[tpu,gcs]`, starts training on all workers
# (detached: it survives a dropped connection), then follows worker 0's log, where the progress
# lines are; Ctrl-C stops following, not training. Ends by printing the teardown command.
# Everything after `--` goes to vggjax.main unchanged.
#
# Options:
#   --name=NAME         TPU VM name (required)
#   --zone=ZONE         e.g. us-central2-b (required)
#   --workdir=DIR       checkpoints, logs, results: storage every worker sees, a Cloud Storage
#                       gs://bucket/path or an NFS or Filestore mount (required)
#   --accelerator=TYPE  v4-32, v5litepod-16, v5p-32, v6e-16, ... (default v4-32)
#   --version=RUNTIME   TPU software version (default: the one for TYPE's generation)
#   --project=PROJECT   default: gcloud's configured project
#   --spot              a Spot slice: cheaper, can be preempted (SIGTERM saves a checkpoint;
#                       rerunning this command recreates the slice and resumes)
#   --repo=URL          git clone URL on the workers instead of copying this checkout
#   --wait              follow worker 0's log until training ends there, then return (to run
#                       one command after another: python -m vggjax.reproduce --launcher=tpu)
#   --dry-run           print the commands instead of running them
set -euo pipefail

script=tpu_pod.sh
source "$(dirname "$0")/common.sh"

name="" zone="" workdir="" accelerator="v4-32" version="" project="" spot=false repo=""
dry_run=false wait=false
while (($#)); do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --spot) spot=true ;;
    --wait) wait=true ;;
    --dry-run) dry_run=true ;;
    --) shift; break ;;
    *) die "unknown option '$1' (training flags go after --); see the top of $0" ;;
  esac
  shift
done
train_args=("$@")

[[ -n "$name" ]] || die "--name is required (the TPU VM to create or reuse)"
[[ -n "$zone" ]] || die "--zone is required, e.g. --zone=us-central2-b"
[[ -n "$workdir" ]] || die "--workdir is required: a directory every worker sees"
check_train_args "${train_args[@]}"
if [[ -z "$version" ]]; then
  # The TPU software version each generation runs JAX on (Cloud TPU's "TPU software versions").
  case "$accelerator" in
    v6e-[0-9]*) version="v2-alpha-tpuv6e" ;;
    v5p-[0-9]*) version="v2-alpha-tpuv5" ;;
    v5litepod-[0-9]* | v5e-[0-9]*) version="v2-alpha-tpuv5-lite" ;;
    v2-[0-9]* | v3-[0-9]* | v4-[0-9]*) version="tpu-ubuntu2204-base" ;;
    *) die "unknown accelerator type '$accelerator'; e.g. v4-32, v5litepod-16, v5p-32," \
         "v6e-16 (or give --version)" ;;
  esac
fi

where=(--zone="$zone")
[[ -z "$project" ]] || where+=(--project="$project")
tpu=(gcloud compute tpus tpu-vm)
quoted_args=$(show "${train_args[@]}")
log="~/vggjax-train.log"
pid="~/vggjax-train.pid"

# 1. The slice: reused when it is up, recreated when it was preempted.
create=("${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$accelerator"
        --version="$version")
$spot && create+=(--spot)
describe=("${tpu[@]}" describe "$name" "${where[@]}" --format='value(state)')
delete=("${tpu[@]}" delete "$name" "${where[@]}" --quiet)
idle=("${tpu[@]}" ssh "$name" --worker=all "${where[@]}"
      --command="! kill -0 \$(cat $pid 2> /dev/null) 2> /dev/null")
tail_options="-n +1 -F"
$wait && tail_options="--pid=\$(cat $pid) $tail_options"  # ends when training ends
follow=("${tpu[@]}" ssh "$name" --worker=0 "${where[@]}" --command="tail $tail_options $log")
if $dry_run; then
  echo "# unless $name exists ($(show "${describe[@]}"); one PREEMPTED is deleted first," \
    "one up must not be training already):"
  show "${create[@]}"
else
  state=$("${describe[@]}" 2> /dev/null || true)
  case "$state" in
    "") "${create[@]}" ;;
    PREEMPTED | TERMINATED) "${delete[@]}" && "${create[@]}" ;;
    *) "${idle[@]}" > /dev/null \
         || die "$name is training already; follow it with: $(show "${follow[@]}")"
       echo "Reusing the TPU VM $name ($state)." ;;
  esac
fi

# 2. The code on every worker, installed with JAX for TPUs.
if [[ -n "$repo" ]]; then
  fetch="rm -rf ~/vggjax && git clone --depth=1 $(show "$repo") ~/vggjax"
else
  archive="${TMPDIR:-/tmp}/vggjax-$name.tar.gz"
  root=$(cd "$(dirname "$0")/.." && pwd)
  # Tracked and untracked files, not what .gitignore names (virtual environments, caches).
  if $dry_run; then
    echo "# archive this checkout:" \
      "git ls-files --cached --others --exclude-standard | tar -czf $archive"
  else
    (cd "$root" && git ls-files -z --cached --others --exclude-standard \
      | tar --null -T - -czf "$archive")
  fi
  run "${tpu[@]}" scp "$archive" "$name:vggjax.tar.gz" --worker=all "${where[@]}"
  fetch="rm -rf ~/vggjax && mkdir ~/vggjax && tar -xzf ~/vggjax.tar.gz -C ~/vggjax"
fi
run "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" \
  --command="$fetch && cd ~/vggjax && python3 -m pip install -q -e \".[tpu,gcs]\""

# 3. Training on all workers at once, detached; then worker 0's log.
run "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" \
  --command="cd ~/vggjax && setsid nohup python3 -m vggjax.main --workdir=$(show "$workdir") \
$quoted_args > $log 2>&1 < /dev/null & echo \$! > $pid"
teardown=$(show "${delete[@]}")
trap 'echo "# When training is done, delete the slice (checkpoints stay in $workdir):"
      echo "$teardown"' EXIT
echo "# Training runs on every worker of $name; following worker 0's log (Ctrl-C stops following)."
run "${follow[@]}"
