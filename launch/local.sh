#!/usr/bin/env bash
# Train on this machine (CPU, or the local GPUs/TPU when jax sees them).
#
#   bash launch/local.sh [CONFIG[:ARG]] [--workdir DIR] [--processes N] [--devices-per-process M]
#                        [--config.KEY=VALUE ...]
#
# With no arguments: the smoke model (configs/smoke.py) on the embedded corpus, workdir
# runs/smoke in this checkout. Creates or reuses .venv, installs the project, trains the
# SentencePiece model the config names once (e.g. runs/tokenizers/stdlib_8192.model), then
# trains. Re-running the same command resumes from the workdir's latest checkpoint.
#
# A relative CONFIG or --workdir is taken from the directory you run this in (a CONFIG not found
# there, such as configs/gpt2.py:tiny, from this checkout); the training itself runs in the
# checkout, so relative paths in --config.KEY=VALUE values and in the config are the checkout's.
# Flags take --name=value or --name value (--config=CONFIG too); a flag given twice with two
# values is refused.
#
# --processes N (and/or --devices-per-process M) runs N copies of the train command on this
# machine as one multi-process JAX job over loopback (gloo CPU collectives), each with M CPU
# devices: what a pod's hosts do, for tests and demos. Process 0 prints to the terminal; process
# i appends to WORKDIR/logs/process_i.log (a line dates each run). If one process fails, the
# others are stopped (killed if still running 3 s later, TJAX_KILL_AFTER_S: a job that lost a
# process cannot save) and the job exits with the failed process's status; Ctrl-C, SIGTERM or a
# closed terminal (SIGHUP) makes all of them save a checkpoint after the same step and exit.
set -euo pipefail
here="$PWD"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/_venv.sh
. launch/_venv.sh
# shellcheck source=launch/_common.sh
. launch/_common.sh

TJAX_CONFIG="" TJAX_OVERRIDES=() workdir="" processes=1 devices=""
if [[ $# -gt 0 && "$1" != -* ]]; then TJAX_CONFIG="$1"; shift; fi
while [[ $# -gt 0 ]]; do
  if tjax_config_arg "$@"; then shift "$TJAX_SHIFT"; continue; fi
  case "$1" in
    -h|--help) tjax_usage launch/local.sh; exit 0 ;;
    --workdir|--workdir=*) tjax_take workdir "$@"; shift "$TJAX_SHIFT" ;;
    --processes|--processes=*) tjax_take processes "$@"; shift "$TJAX_SHIFT"
                               tjax_check_int --processes "$processes" 1 ;;
    --devices-per-process|--devices-per-process=*) tjax_take devices "$@"; shift "$TJAX_SHIFT"
                                                   tjax_check_int "$TJAX_FLAG" "$devices" 1 ;;
    *) tjax_die "unknown argument '$1' (see: bash launch/local.sh --help)" ;;
  esac
done
for o in ${TJAX_OVERRIDES[@]+"${TJAX_OVERRIDES[@]}"}; do  # what the launcher sets up
  if [[ "$o" == --config.mesh.cpu_devices=* && -n "$devices" && "${o#*=}" != "$devices" ]]; then
    tjax_die "--devices-per-process $devices and $o disagree (each process would get" \
             "${o#*=} devices); give one"
  fi
done

# CONFIG and --workdir relative to where the command was typed (this script runs in the checkout).
config="${TJAX_CONFIG:-configs/smoke.py}"
config_file="${config%%:*}"
if [[ "$config_file" != /* && ! "$here" -ef . && -f "$here/$config_file" ]]; then
  config="$here/$config" config_file="$here/$config_file"
elif [[ ! -f "$config_file" ]]; then
  tjax_die "config file not found: $config_file (in $here$([[ "$here" -ef . ]] ||
    echo " or $PWD"))"
fi
if [[ -z "$workdir" ]]; then
  name="$(basename "$config_file" .py)"
  [[ "$config" == *:* ]] && name="${name}_${config#"$config_file":}"
  workdir="$PWD/runs/$name"
elif [[ "$workdir" != /* && "$workdir" != gs://* ]]; then
  workdir="$here/$workdir"
fi
echo "workdir: $workdir"

tjax_venv ""
# The SentencePiece model the config names, trained once from its corpus (with the control
# pieces its objective needs) when the file is missing.
python -m transformer_jax.tokenizer --config="$config" --if_missing \
  ${TJAX_OVERRIDES[@]+"${TJAX_OVERRIDES[@]}"}
cmd=(python -m transformer_jax.train --config="$config" --workdir="$workdir"
     ${TJAX_OVERRIDES[@]+"${TJAX_OVERRIDES[@]}"})
if [[ "$processes" == 1 && -z "$devices" ]]; then exec "${cmd[@]}"; fi

# A multi-process job on this machine: CPU devices, a free loopback port for the coordinator.
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices:-1}"
TJAX_COORDINATOR="127.0.0.1:$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# (a config's own mesh.cpu_devices that differs is refused by each process: distributed.py)
export TJAX_COORDINATOR TJAX_NUM_PROCESSES="$processes"
export TJAX_CPU_DEVICES_PER_PROCESS="${devices:-1}"
logs="$workdir/logs"  # (a gs:// workdir's logs: here, under runs/logs/BUCKET/PATH)
[[ "$workdir" != gs://* ]] || logs="$PWD/runs/logs/${workdir#gs://}"
mkdir -p "$logs"
echo "$processes processes x ${devices:-1} CPU devices, coordinator $TJAX_COORDINATOR; logs in $logs/"
pids=()
tjax_start_all "$logs" "$processes" "${cmd[@]}"
# Ctrl-C / SIGTERM / a closed terminal (SIGHUP): every process gets SIGTERM; they agree on a
# step, save and exit.
tjax_wait_all_saving "$logs"
