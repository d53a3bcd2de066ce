#!/usr/bin/env bash
# Train on N nodes x G GPUs of a SLURM cluster: writes a batch script and submits it with sbatch.
#
#   bash launch/gpu_slurm.sh --nodes N --gpus-per-node G [--per gpu|node] [--partition P]
#       [--account A] [--time HH:MM:SS] [--job-name NAME] [--script FILE] [--requeue]
#       [--dry-run] -- [CONFIG[:ARG]] --workdir DIR [--config.KEY=VALUE ...]
#
# Run it from a checkout on storage that every node mounts (the batch script cds there). The batch
# script: creates or reuses .venv with the `gpu` extra (launch/_venv.sh; once, on the first node)
# and the default tokenizer (once), sets the XLA/NCCL environment, then
# `srun python -m transformer_jax.train ...`: every task runs the same command and
# jax.distributed.initialize() finds the others from SLURM's variables.
#
# Flags: --per gpu   one process per GPU (N*G tasks; each process addresses one GPU,
#                    JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID); the default
#        --per node  one process per node, each with all G GPUs
#        --time      wall-clock limit of the job (sbatch --time)
#        --job-name  default tjax-<workdir's name>
#        --script    where the batch script is written; default runs/slurm/<job-name>.sbatch
#        --requeue   preemptible-friendly: sbatch --requeue, and the tasks get SIGTERM 300 s before
#                    the time limit (--signal); a run stopped by a signal saves a checkpoint,
#                    exits 128+signal, and the job requeues itself (at most TJAX_MAX_REQUEUES
#                    times, default 10: a crash by a signal every time does not loop forever).
#                    Re-running (or requeueing) the same job resumes from the latest checkpoint.
#        --dry-run   print the batch script and the sbatch command; write and run nothing but
#                    the local checks of the arguments and the config
#
# The workdir must be on shared storage (checkpoints are written by all processes together), or
# a gs://BUCKET/PATH URL: Orbax writes the checkpoints straight to the bucket and the rest of the
# workdir goes there too, so no shared file system is needed for it. Before submitting, this
# script checks that the bucket is writable from here (with the project's Python and gcsfs, else
# `gcloud storage`): one error line if not. (STORAGE_EMULATOR_HOST=http://HOST:PORT points both at
# a Cloud Storage emulator.) Without CONFIG the workdir's config.json (a sweep plan's, or an
# earlier run's) is used. A relative CONFIG is a path in this checkout. A flag given twice with
# two values is refused.
# Environment set unless you set it first: XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 (JAX preallocates
# 75% of GPU memory by default), XLA_FLAGS += --xla_gpu_enable_latency_hiding_scheduler=true
# (overlaps collectives with compute; JAX's GPU performance tips), NCCL_DEBUG=WARN. Interconnect
# settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) are cluster-specific: export them before
# submitting (sbatch passes your environment on), or ask your cluster's documentation.
# Logs: runs/slurm/<job-name>-<job id>.out (task-labelled lines). Exit status 2 for a mistake on
# this command line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/_common.sh
. launch/_common.sh

nodes="" gpus="" per="gpu" partition="" account="" time_limit="" job_name="" script="" requeue=0
TJAX_DRY_RUN=0
while [[ $# -gt 0 && "$1" != -- ]]; do
  case "$1" in
    -h|--help) tjax_usage launch/gpu_slurm.sh; exit 0 ;;
    --nodes|--nodes=*) tjax_take nodes "$@"; shift "$TJAX_SHIFT"
                       tjax_check_int --nodes "$nodes" 1 ;;
    --gpus-per-node|--gpus-per-node=*) tjax_take gpus "$@"; shift "$TJAX_SHIFT"
                       tjax_check_int --gpus-per-node "$gpus" 1 ;;
    --per|--per=*) tjax_take per "$@"; shift "$TJAX_SHIFT"
                   [[ "$per" == gpu || "$per" == node ]] ||
                     tjax_die "--per must be 'gpu' or 'node', got '$per'" ;;
    --partition|--partition=*) tjax_take partition "$@"; shift "$TJAX_SHIFT" ;;
    --account|--account=*) tjax_take account "$@"; shift "$TJAX_SHIFT" ;;
    --time|--time=*) tjax_take time_limit "$@"; shift "$TJAX_SHIFT"
                     [[ "$time_limit" =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] ||
                       tjax_die "--time must look like HH:MM:SS or D-HH:MM:SS, got '$time_limit'" ;;
    --job-name|--job-name=*) tjax_take job_name "$@"; shift "$TJAX_SHIFT" ;;
    --script|--script=*) tjax_take script "$@"; shift "$TJAX_SHIFT" ;;
    --requeue) requeue=1; shift ;;
    --dry-run) TJAX_DRY_RUN=1; shift ;;
    *) tjax_die "unknown flag '$1' (see: bash launch/gpu_slurm.sh --help)" ;;
  esac
done
[[ $# -gt 0 ]] || tjax_die "missing '-- [CONFIG[:ARG]] --workdir DIR' (see: bash launch/gpu_slurm.sh --help)"
shift
[[ -n "$nodes" ]] || tjax_die "--nodes N is required"
[[ -n "$gpus" ]] || tjax_die "--gpus-per-node G is required"
tjax_train_args "$@"
if [[ -z "$TJAX_CONFIG" && "$TJAX_WORKDIR" != gs://* && ! -f "$TJAX_WORKDIR/config.json" ]]; then
  tjax_die "no CONFIG given and $TJAX_WORKDIR/config.json not found (give CONFIG[:ARG] after --)"
fi
[[ -n "$job_name" ]] || job_name="tjax-$(basename "$TJAX_WORKDIR")"
[[ "$job_name" =~ ^[A-Za-z0-9_.+-]+$ ]] ||
  tjax_die "--job-name '$job_name' may hold letters, digits and _.+- only"
[[ -n "$script" ]] || script="runs/slurm/$job_name.sbatch"

# What each task runs before the train command: the GPUs its JAX process addresses (read by
# jax.distributed.initialize; without it JAX would give every process the GPU of its SLURM_LOCALID).
# shellcheck disable=SC2016  # expanded by each task, not here
if [[ "$per" == gpu ]]; then
  tasks_per_node="$gpus"
  # its own GPU among the node's, or the only one when SLURM binds one GPU per task
  task_env='case "${CUDA_VISIBLE_DEVICES:-}" in *,*|"") ids=$SLURM_LOCALID ;; *) ids=0 ;; esac'
  task_env+='; export JAX_LOCAL_DEVICE_IDS=$ids; exec "$@"'
else
  tasks_per_node=1
  task_env="export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1))); exec \"\$@\""
fi

batch_script() {
  local repo
  repo="$(pwd -P)"
  echo "#!/bin/bash"
  echo "# written by launch/gpu_slurm.sh: $nodes node(s) x $gpus GPU(s), one process per $per"
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=$tasks_per_node"
  echo "#SBATCH --gpus-per-node=$gpus"
  [[ -z "$partition" ]] || echo "#SBATCH --partition=$partition"
  [[ -z "$account" ]] || echo "#SBATCH --account=$account"
  [[ -z "$time_limit" ]] || echo "#SBATCH --time=$time_limit"
  echo "#SBATCH --output=$repo/runs/slurm/%x-%j.out"
  echo "#SBATCH --open-mode=append"
  if (( requeue )); then
    echo "#SBATCH --requeue"
    echo "#SBATCH --signal=TERM@300"
  fi
  local setup_args  # the config's tokenizer, or the one the workdir's config.json names
  setup_args="$(tjax_q "${TJAX_CONFIG:-"--workdir=$TJAX_WORKDIR"}" \
    ${TJAX_OVERRIDES[@]+"${TJAX_OVERRIDES[@]}"})"
  cat <<EOF
set -euo pipefail
cd $(tjax_q "$repo")
. launch/_common.sh
# .venv with the gpu extra and the config's tokenizer, once; one job at a time (a sweep's jobs
# may start together on the same checkout)
if command -v flock >/dev/null; then
  (flock 9 && tjax_setup gpu $setup_args) 9>runs/slurm/.setup.lock
else
  tjax_setup gpu $setup_args
fi
. .venv/bin/activate
export XLA_PYTHON_CLIENT_MEM_FRACTION="\${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export XLA_FLAGS="\${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
export NCCL_DEBUG="\${NCCL_DEBUG:-WARN}"
export PYTHONUNBUFFERED=1
echo "job \$SLURM_JOB_ID on \$SLURM_JOB_NODELIST (restart \${SLURM_RESTART_COUNT:-0}): \$SLURM_NTASKS processes"
set +e
srun --label --nodes=$nodes --ntasks-per-node=$tasks_per_node \\
  bash -c $(tjax_q "$task_env") task \\
  $(tjax_q "${TJAX_TRAIN[@]}")
rc=\$?
set -e
echo "train exited with status \$rc"
EOF
  if (( requeue )); then
    cat <<'EOF'
if (( rc >= 128 )); then  # stopped by a signal (time limit, preemption): checkpoint saved
  if (( ${SLURM_RESTART_COUNT:-0} < ${TJAX_MAX_REQUEUES:-10} )); then
    scontrol requeue "$SLURM_JOB_ID" && exit 0
  fi
  echo "not requeued: the job restarted ${SLURM_RESTART_COUNT:-0} times already" \
    "(TJAX_MAX_REQUEUES=${TJAX_MAX_REQUEUES:-10}); a signal every time (an out-of-memory" \
    "kill?) needs a look before it is resubmitted"
fi
EOF
  fi
  # shellcheck disable=SC2016
  echo 'exit "$rc"'
}

check_bucket() {
  tjax_check_config "# checked before submitting: the config passes its checks" "# "
  tjax_check_bucket "# checked before submitting: the bucket is writable" "# "
}

check_bucket
if (( TJAX_DRY_RUN )); then
  echo "# $script"
  batch_script
  echo "# submit:"
  tjax_q sbatch "$script"
  exit 0
fi
command -v sbatch >/dev/null || tjax_die "sbatch not found: run this on a SLURM login node (or use --dry-run)"
mkdir -p "$(dirname "$script")" runs/slurm
batch_script >"$script"
echo "wrote $script"
tjax_do sbatch "$script"
