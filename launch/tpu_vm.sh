#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: every worker runs the same train command.
#
#   bash launch/tpu_vm.sh --name NAME --zone ZONE [--type v5p-8] [--project P] [--runtime VERSION]
#       [--spot | --preemptible] [--queued] [--retries N] [--repo URL] [--setup CMD] [--logs DIR]
#       [--env KEY=VALUE ...] [--delete] [--dry-run] -- [CONFIG[:ARG]] --workdir DIR
#       [--config.KEY=VALUE ...]
#
# Steps (--dry-run prints each command and runs none of them, only the local checks of the
# arguments and the config; gcloud is not needed for it):
#   1. the TPU: reuse NAME when it is READY (ACTIVE for --queued); else create it with
#      `gcloud compute tpus tpu-vm create` or, with --queued, `gcloud compute tpus queued-resources
#      create` and wait until the queued resource is ACTIVE. A preempted or failed one is deleted
#      and created again.
#   2. the project on every worker, in ~/transformer_jax: this checkout's tracked files with their
#      uncommitted changes (`git archive` of `git stash create`; untracked files are not sent, and
#      an untracked CONFIG is refused here), copied with `tpu-vm scp --worker=all`; or
#      `git clone URL` (then `git pull`) with --repo URL.
#   3. `tpu-vm ssh --worker=all` runs this script with --on-worker on every worker: --setup CMD (if
#      any), .venv with the `tpu` extra (launch/_venv.sh), the default tokenizer once, then
#      `python -m transformer_jax.train ...`. jax.distributed.initialize() finds the other workers
#      itself. Worker 0's output streams to this terminal; every worker appends its whole output to
#      ~/transformer_jax/logs/train-worker<ID>.log, fetched into runs/tpu/NAME/ after the run.
#   4. --retries N: when the run ends with anything but 0 (done), 2 (user error) or 3 (anomaly
#      abort) -- a preempted spot VM, a lost connection -- steps 1-3 run again, up to N times; the
#      same command resumes from the workdir's latest checkpoint.
#   5. --delete: delete the TPU (or queued resource) at the end, whatever the outcome.
#
# Flags: --type     accelerator type (v5p-8, v5litepod-16, v6e-8, v4-32, ...); default v5p-8
#        --runtime  TPU software version; default from the type (v4: tpu-ubuntu2204-base,
#                   v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)
#        --spot / --preemptible   cheaper, can be preempted (use with --retries)
#        --queued   go through a queued resource (waits for capacity); --spot allowed
#        --setup    a shell command every worker runs before training (e.g. mount shared storage;
#                   it runs in a shell of its own: what it exports does not reach training)
#        --logs     local folder for the workers' logs; default runs/tpu/NAME
#        --env KEY=VALUE   an environment variable for the train command on every worker
#                   (repeatable; e.g. LIBTPU_INIT_ARGS=...). TJAX_CACHE_DIR, TJAX_CACHE_MAX_GB,
#                   TJAX_HEARTBEAT_TIMEOUT_S and TJAX_VERBOSE, when set here, are passed on too
#                   (a gs:// TJAX_CACHE_DIR: one compilation cache for every worker).
#
# The workdir. Best on a pod or with --retries: a gs://BUCKET/PATH workdir. Orbax writes the
# checkpoints straight to the bucket and config.json, metrics.jsonl, TensorBoard events and the
# workdir lock go there too, so no shared file system is needed: every worker reaches the bucket,
# and a re-created VM resumes from it. The TPU VM's service account needs write access to the
# bucket (roles/storage.objectAdmin). Before anything runs, this script checks that the bucket is
# writable from here (with the project's Python and gcsfs, else `gcloud storage`): one error line
# if not. (STORAGE_EMULATOR_HOST=http://HOST:PORT points both at a Cloud Storage emulator.)
# A relative local workdir lives on each worker's own disk under ~/transformer_jax: fine for a
# single-host slice (v5p-8) that is reused, but lost when a preempted VM is re-created, and not
# shared between the workers of a pod, which Orbax's multi-host checkpoints need. An absolute path
# must be storage that every worker mounts at the same place (a Filestore NFS share), mounted by
# --setup, e.g. --setup 'mountpoint -q /mnt/runs || sudo mount ...'.
# Without CONFIG, the workdir's config.json (a sweep plan's, or an earlier run's) is used; for a
# relative workdir the local WORKDIR/config.json is sent along with the project. A relative CONFIG
# is a path in this checkout, as on the workers. A flag given twice with two values is refused.
#
# For pods, gcloud needs your key in ssh-agent first: ssh-add ~/.ssh/google_compute_engine.
# Exit status: the train command's (0 done, 2 user error, 3 anomaly, 128+signal preempted; the
# first worker's that failed, read from each worker's last line, since gcloud's own status drops
# theirs on a pod; 255 when worker 0's connection was lost), 2 for a mistake on this command line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/_common.sh
. launch/_common.sh

REMOTE_DIR="transformer_jax"  # on every worker, relative to the home directory

# ---- on a worker (what step 3 runs there) ----
on_worker() {
  local setup="" log rc
  # (global: the EXIT trap runs after a `set -e` exit has unwound this function's locals)
  wid="$(curl -sf -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    || hostname)"
  # every exit says its status, read back by tjax_workers_status (_common.sh): one before the
  # train command (a bad argument, --setup, the install) too, or a pod's gcloud reports 0 and
  # the run looks lost (255) and is retried
  trap 'echo "tjax: worker $wid exit $?"' EXIT
  while [[ $# -gt 0 && "$1" != -- ]]; do
    case "$1" in
      --setup|--setup=*) tjax_take setup "$@"; shift "$TJAX_SHIFT" ;;
      *) tjax_die "unknown --on-worker argument '$1'" ;;
    esac
  done
  [[ $# -gt 0 ]] && shift
  if [[ -n "$setup" ]]; then bash -c "$setup"; fi
  tjax_train_args "$@"
  if [[ -z "$TJAX_CONFIG" && "$TJAX_WORKDIR" != gs://* && ! -f "$TJAX_WORKDIR/config.json" ]]; then
    tjax_die "no CONFIG given and $TJAX_WORKDIR/config.json not found on $(hostname)"
  fi
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then  # some images lack python3-venv
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
  fi
  tjax_setup tpu "${TJAX_CONFIG:-"--workdir=$TJAX_WORKDIR"}" \
    ${TJAX_OVERRIDES[@]+"${TJAX_OVERRIDES[@]}"}
  mkdir -p logs
  export PYTHONUNBUFFERED=1  # stream through the pipe and ssh as it is printed
  log="logs/train-worker${wid}.log"
  echo "=== $(date -u +%FT%TZ) $(tjax_q "${TJAX_TRAIN[@]}")" >>"$log"
  set +e
  if [[ "$wid" == 0 ]]; then
    echo "worker 0 of the TPU: output below and in ~/$REMOTE_DIR/$log (each worker keeps its own)"
  fi
  tjax_run_logged "$log" "$([[ "$wid" == 0 ]] && echo 1 || echo 0)" "${TJAX_TRAIN[@]}"
  rc=$?
  if [[ "$wid" != 0 ]]; then
    if [[ $rc != 0 ]]; then
      echo "worker $wid: exit $rc; last lines of ~/$REMOTE_DIR/$log:"
      tail -n 20 "$log"
    fi
  fi
  exit "$rc"  # (the EXIT trap says it)
}
if [[ "${1:-}" == --on-worker ]]; then shift; on_worker "$@"; fi

# ---- on this machine ----
name="" zone="" type="v5p-8" project="" runtime="" spot=0 preemptible=0 queued=0 delete=0
retries=0 repo="" setup="" logdir=""
worker_env=()  # KEY=VALUE for the train command on every worker (--env, and FORWARDED below)
FORWARDED=(TJAX_CACHE_DIR TJAX_CACHE_MAX_GB TJAX_HEARTBEAT_TIMEOUT_S TJAX_VERBOSE)
for key in "${FORWARDED[@]}"; do
  if [[ -n "${!key+set}" ]]; then worker_env+=("$key=${!key}"); fi
done
TJAX_DRY_RUN=0
while [[ $# -gt 0 && "$1" != -- ]]; do
  case "$1" in
    -h|--help) tjax_usage launch/tpu_vm.sh; exit 0 ;;
    --name|--name=*) tjax_take name "$@"; shift "$TJAX_SHIFT" ;;
    --zone|--zone=*) tjax_take zone "$@"; shift "$TJAX_SHIFT" ;;
    --type|--type=*) tjax_take type "$@"; shift "$TJAX_SHIFT" ;;
    --project|--project=*) tjax_take project "$@"; shift "$TJAX_SHIFT" ;;
    --runtime|--runtime=*) tjax_take runtime "$@"; shift "$TJAX_SHIFT" ;;
    --retries|--retries=*) tjax_take retries "$@"; shift "$TJAX_SHIFT"
                           tjax_check_int --retries "$retries" 0 ;;
    --repo|--repo=*) tjax_take repo "$@"; shift "$TJAX_SHIFT" ;;
    --setup|--setup=*) tjax_take setup "$@"; shift "$TJAX_SHIFT" ;;
    --logs|--logs=*) tjax_take logdir "$@"; shift "$TJAX_SHIFT" ;;
    --env|--env=*) tjax_flag_value "$@"; shift "$TJAX_SHIFT"
                   [[ "$TJAX_VALUE" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
                     tjax_die "--env '$TJAX_VALUE' is not KEY=VALUE"
                   worker_env+=("$TJAX_VALUE") ;;
    --spot) spot=1; shift ;;
    --preemptible) preemptible=1; shift ;;
    --queued) queued=1; shift ;;
    --delete) delete=1; shift ;;
    --dry-run) TJAX_DRY_RUN=1; shift ;;
    *) tjax_die "unknown flag '$1' (see: bash launch/tpu_vm.sh --help)" ;;
  esac
done
[[ $# -gt 0 ]] || tjax_die "missing '-- [CONFIG[:ARG]] --workdir DIR' (see: bash launch/tpu_vm.sh --help)"
shift
[[ -n "$name" ]] || tjax_die "--name NAME is required"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  tjax_die "--name '$name' must be lowercase letters, digits and hyphens, starting with a letter"
[[ -n "$zone" ]] || tjax_die "--zone ZONE is required (e.g. us-east5-a)"
[[ "$type" =~ ^v[0-9][a-z]*(pod)?-[0-9]+$ ]] ||
  tjax_die "--type '$type' is not an accelerator type like v5p-8, v5litepod-16, v6e-8, v4-32"
if [[ -z "$runtime" ]]; then
  case "$type" in
    v2-*|v3-*|v4-*) runtime="tpu-ubuntu2204-base" ;;
    v5p-*) runtime="v2-alpha-tpuv5" ;;
    v5litepod-*|v5e-*) runtime="v2-alpha-tpuv5-lite" ;;
    v6e-*) runtime="v2-alpha-tpuv6e" ;;
    *) tjax_die "no default --runtime for --type $type; give --runtime VERSION" ;;
  esac
fi
(( spot + preemptible < 2 )) || tjax_die "--spot and --preemptible exclude each other"
(( ! (queued && preemptible) )) || tjax_die "--preemptible does not apply to --queued; use --spot"
tjax_train_args "$@"
# The workers get the files git tracks here (step 2): a CONFIG it does not track never reaches them.
config_file="${TJAX_CONFIG%%:*}"
if [[ -n "$config_file" && "$config_file" != /* ]] && git rev-parse --git-dir >/dev/null 2>&1 &&
   ! git ls-files --error-unmatch -- "$config_file" >/dev/null 2>&1; then
  tjax_die "$config_file is not tracked by git, so the workers would not get it: git add it" \
           "(with --repo: commit and push it), or give a path that every worker mounts"
fi
shared=0  # the workdir is the same for every worker and survives a re-created VM
[[ "$TJAX_WORKDIR" == /* || "$TJAX_WORKDIR" == gs://* ]] && shared=1
extra_files=()
if [[ -z "$TJAX_CONFIG" ]] && (( ! shared )); then
  [[ -f "$TJAX_WORKDIR/config.json" ]] ||
    tjax_die "no CONFIG given and $TJAX_WORKDIR/config.json not found (give CONFIG[:ARG] after --)"
  extra_files=("$TJAX_WORKDIR/config.json")
fi
if (( ! shared )); then
  echo "note: workdir $TJAX_WORKDIR is on each worker's own disk (~/$REMOTE_DIR/$TJAX_WORKDIR):" \
       "lost when the VM is re-created and not shared by a pod's workers; see --help" >&2
fi

gc_zone=("--zone=$zone")
[[ -z "$project" ]] || gc_zone+=("--project=$project")
tpu=(gcloud compute tpus tpu-vm)
qr=(gcloud compute tpus queued-resources)
[[ -n "$logdir" ]] || logdir="runs/tpu/$name"
poll_s="${TJAX_POLL_S:-30}"  # seconds between state checks and before a retry

# The TPU's state: READY/ACTIVE, a transient one, or MISSING.
tpu_state() {
  if (( queued )); then
    "${qr[@]}" describe "$name" "${gc_zone[@]}" --format='value(state.state)' 2>/dev/null || echo MISSING
  else
    "${tpu[@]}" describe "$name" "${gc_zone[@]}" --format='value(state)' 2>/dev/null || echo MISSING
  fi
}

delete_tpu() {
  if (( queued )); then tjax_do "${qr[@]}" delete "$name" "${gc_zone[@]}" --force --quiet
  else tjax_do "${tpu[@]}" delete "$name" "${gc_zone[@]}" --quiet
  fi
}

create_tpu() {
  local capacity=()
  (( spot )) && capacity=(--spot)
  (( preemptible )) && capacity=(--preemptible)
  if (( queued )); then
    tjax_do "${qr[@]}" create "$name" "${gc_zone[@]}" --node-id="$name" \
      --accelerator-type="$type" --runtime-version="$runtime" ${capacity[@]+"${capacity[@]}"}
  else
    tjax_do "${tpu[@]}" create "$name" "${gc_zone[@]}" --accelerator-type="$type" \
      --version="$runtime" ${capacity[@]+"${capacity[@]}"}
  fi
}

# Step 1: a READY TPU named NAME (reused, or created; a preempted/failed one is replaced).
ensure_tpu() {
  local want=READY state last=""
  (( queued )) && want=ACTIVE
  if (( TJAX_DRY_RUN )); then
    echo "# 1. the TPU: reused when this says $want; created when missing; deleted and created" \
         "again when preempted or failed"
    if (( queued )); then tjax_q "${qr[@]}" describe "$name" "${gc_zone[@]}" --format='value(state.state)'
    else tjax_q "${tpu[@]}" describe "$name" "${gc_zone[@]}" --format='value(state)'
    fi
    create_tpu
    (( queued )) && echo "# ... then the describe command every 30 s until the state is ACTIVE"
    return 0
  fi
  while true; do
    state="$(tpu_state)"
    [[ "$state" == "$last" ]] || echo "TPU $name: ${state:-?}" >&2
    last="$state"
    case "$state" in
      "$want") return 0 ;;
      MISSING) create_tpu || return 1 ;;
      PREEMPTED|TERMINATED|STOPPED|FAILED|SUSPENDED|SUSPENDING|UNHEALTHY*)
        delete_tpu || return 1
        create_tpu || return 1 ;;
      *) sleep "$poll_s" || true ;;  # CREATING, WAITING_FOR_RESOURCES, PROVISIONING, ...
    esac
    (( ! ${interrupted:-0} )) || return 130
  done
}

# Step 2: the project in ~/transformer_jax on every worker.
copy_project() {
  local ssh_all=("${tpu[@]}" ssh "$name" "${gc_zone[@]}" --worker=all)
  if [[ -n "$repo" ]]; then
    (( TJAX_DRY_RUN )) && echo "# 2. the project on every worker: clone (or pull) $repo"
    local make_dir=""  # a sweep run's config.json goes to runs/..., which a clone lacks
    [[ ${#extra_files[@]} -eq 0 ]] || make_dir=" && mkdir -p $(tjax_q "$REMOTE_DIR/$(dirname "${extra_files[0]}")")"
    tjax_do "${ssh_all[@]}" --command="{ if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR pull --ff-only; else git clone $(tjax_q "$repo") $REMOTE_DIR; fi; }$make_dir" || return 1
    if [[ ${#extra_files[@]} -gt 0 ]]; then
      tjax_do "${tpu[@]}" scp "${extra_files[0]}" "$name:$REMOTE_DIR/${extra_files[0]}" "${gc_zone[@]}" --worker=all || return 1
    fi
    return 0
  fi
  local bundle tree
  bundle="${TMPDIR:-/tmp}/tjax-$name.tar"
  if (( TJAX_DRY_RUN )); then
    echo "# 2. the project on every worker: tracked files with uncommitted changes"
    # shellcheck disable=SC2016  # printed, not run
    tree='$(git stash create)'
    echo "git archive --format=tar -o $bundle \"${tree}\"  # HEAD when the tree is clean"
  else
    tree="$(git stash create 2>/dev/null || true)"
    tjax_do git archive --format=tar -o "$bundle" "${tree:-HEAD}" || return 1
  fi
  if [[ ${#extra_files[@]} -gt 0 ]]; then tjax_do tar -rf "$bundle" "${extra_files[@]}" || return 1; fi
  tjax_do gzip -f "$bundle" || return 1
  tjax_do "${tpu[@]}" scp "$bundle.gz" "$name:tjax-bundle.tar.gz" "${gc_zone[@]}" --worker=all || return 1
  tjax_do "${ssh_all[@]}" --command="mkdir -p $REMOTE_DIR && tar -xzf tjax-bundle.tar.gz -C $REMOTE_DIR && rm tjax-bundle.tar.gz" || return 1
  (( TJAX_DRY_RUN )) || rm -f "$bundle.gz"
}

# Step 3: the same train command on every worker; returns the job's exit status, read from the
# workers' own lines (gcloud's status does not carry theirs when there are several workers).
run_train() {
  local worker=(bash launch/tpu_vm.sh --on-worker) out rc=0
  if [[ ${#worker_env[@]} -gt 0 ]]; then worker=(env "${worker_env[@]}" "${worker[@]}"); fi
  [[ -z "$setup" ]] || worker+=(--setup "$setup")
  worker+=(-- "${TJAX_TRAIN[@]:3}")
  (( TJAX_DRY_RUN )) && echo "# 3. on every worker: [--setup], .venv (tpu extra), then" \
                             "$(tjax_q "${TJAX_TRAIN[@]}")"
  out="$(mktemp)"
  tjax_do "${tpu[@]}" ssh "$name" "${gc_zone[@]}" --worker=all \
    --command="cd $REMOTE_DIR && $(tjax_q "${worker[@]}")" | tee "$out" || rc=$?
  (( TJAX_DRY_RUN )) || rc="$(tjax_workers_status "$out" "$rc")"
  rm -f "$out"
  return "$rc"
}

fetch_logs() {
  (( TJAX_DRY_RUN )) && echo "# 4. every worker's log into $logdir/"
  if (( ! TJAX_DRY_RUN )); then mkdir -p "$logdir"; fi
  tjax_do "${tpu[@]}" scp "$name:$REMOTE_DIR/logs/train-worker*.log" "$logdir/" "${gc_zone[@]}" \
    --worker=all || echo "(could not fetch the workers' logs)" >&2
}

# Step 0, for a gs:// workdir: the bucket is writable from here (_common.sh).
check_bucket() {
  tjax_check_config "# 0. the config passes its checks (this checkout's .venv)" ""
  tjax_check_bucket "# 0. the bucket is writable (checked before anything runs)" ""
}

if (( TJAX_DRY_RUN )); then
  check_bucket; ensure_tpu; copy_project; run_train; fetch_logs
  if (( retries )); then
    echo "# exit other than 0, 2, 3 (preempted, connection lost): steps 1-4 again, up to $retries" \
         "times; training resumes from $TJAX_WORKDIR$( (( shared )) ||
         echo " if the VM survived (a re-created VM has a new disk)")"
  fi
  if (( delete )); then echo "# 5. at the end"; delete_tpu; fi
  exit 0
fi

command -v gcloud >/dev/null || tjax_die "gcloud not found (install the Google Cloud CLI)"
check_bucket
attempt=0
interrupted=0  # Ctrl-C (or a SIGTERM) here: no retry; the logs, and --delete, all the same
trap 'interrupted=1' INT TERM HUP
while true; do
  rc=0
  { ensure_tpu && copy_project && run_train; } || rc=$?
  (( rc == 0 )) || echo "run on $name ended with exit status $rc" >&2
  fetch_logs || true
  if [[ $rc == 0 || $rc == 2 || $rc == 3 ]] || (( interrupted || attempt >= retries )); then
    break
  fi
  attempt=$((attempt + 1))
  echo "retry $attempt of $retries: the same command resumes from $TJAX_WORKDIR" >&2
  sleep "$poll_s" || true
  (( ! interrupted )) || break
done
if (( delete )); then delete_tpu || true; fi
exit "$rc"
