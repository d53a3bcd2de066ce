#!/usr/bin/env bash
# Train on this machine (CPU, or the local GPUs/TPU when jax sees them).
#
#   bash launch/local.sh [CONFIG[:ARG]] [--workdir DIR] [--processes N] [--devices-per-process M]
#                        [--config.KEY=VALUE ...]
#
# With no arguments: the smoke model (configs/smoke.py) on the embedded corpus, workdir
# runs/smoke. Creates or reuses .venv, installs the project, trains the SentencePiece model the
# config names once (e.g. runs/tokenizers/stdlib_8192.model), then trains. Re-running the
# same command resumes from the workdir's latest checkpoint.
#
# --processes N (and/or --devices-per-process M) runs N copies of the train command on this
# machine as one multi-process JAX job over loopback (gloo CPU collectives), each with M CPU
# devices: what a pod's hosts do, for tests and demos. Process 0 prints to the terminal; process
# i logs to WORKDIR/logs/process_i.log. If one process fails the others are stopped; Ctrl-C or
# SIGTERM makes all of them save a checkpoint after the same step and exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/_venv.sh
. launch/_venv.sh
# shellcheck source=launch/_common.sh
. launch/_common.sh

config="configs/smoke.py"
workdir=""
processes=1
devices=""
overrides=()
need_int() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "error: $1 needs a positive integer, got '$2'" >&2; exit 2; }; }
if [[ $# -gt 0 && "$1" != --* ]]; then config="$1"; shift; fi
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workdir|--workdir=*) tjax_flag_value "$@"; workdir="$TJAX_VALUE"; shift "$TJAX_SHIFT" ;;
    --processes) need_int --processes "${2:-}"; processes="$2"; shift 2 ;;
    --processes=*) processes="${1#--processes=}"; need_int --processes "$processes"; shift ;;
    --devices-per-process) need_int --devices-per-process "${2:-}"; devices="$2"; shift 2 ;;
    --devices-per-process=*) devices="${1#--devices-per-process=}"
                             need_int --devices-per-process "$devices"; shift ;;
    --config.*=*) overrides+=("$1"); shift ;;
    *) echo "error: unknown argument '$1' (usage: launch/local.sh [CONFIG[:ARG]]" \
            "[--workdir DIR] [--processes N] [--devices-per-process M]" \
            "[--config.KEY=VALUE ...])" >&2; exit 2 ;;
  esac
done
config_file="${config%%:*}"
[[ -f "$config_file" ]] || { echo "error: config file not found: $config_file" >&2; exit 2; }
if [[ -z "$workdir" ]]; then
  name="$(basename "$config_file" .py)"
  [[ "$config" == *:* ]] && name="${name}_${config#*:}"
  workdir="runs/$name"
fi

tjax_venv ""
# The SentencePiece model the config names, trained once from its corpus (with the control
# pieces its objective needs) when the file is missing.
python -m transformer_jax.tokenizer --config="$config" --if_missing ${overrides[@]+"${overrides[@]}"}
echo "workdir: $workdir"
cmd=(python -m transformer_jax.train --config="$config" --workdir="$workdir" ${overrides[@]+"${overrides[@]}"})
if [[ "$processes" == 1 && -z "$devices" ]]; then exec "${cmd[@]}"; fi

# A multi-process job on this machine: CPU devices, a free loopback port for the coordinator.
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices:-1}"
TJAX_COORDINATOR="127.0.0.1:$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export TJAX_COORDINATOR TJAX_NUM_PROCESSES="$processes"
logs="$workdir/logs"  # (a gs:// workdir's logs: here, under runs/logs/BUCKET/PATH)
[[ "$workdir" != gs://* ]] || logs="runs/logs/${workdir#gs://}"
mkdir -p "$logs"
echo "$processes processes x ${devices:-1} CPU devices, coordinator $TJAX_COORDINATOR; logs in $logs/"
pids=()
for ((i = 0; i < processes; i++)); do
  if [[ $i == 0 ]]; then  # (its tee outlives a Ctrl-C: a dead one failed process 0's next write)
    TJAX_PROCESS_ID=0 "${cmd[@]}" > >(trap '' INT TERM HUP; exec tee -p "$logs/process_0.log") 2>&1 &
  else
    TJAX_PROCESS_ID=$i "${cmd[@]}" > "$logs/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
# Ctrl-C / SIGTERM: every process gets SIGTERM; they agree on a step, save and exit.
trap 'tjax_stop_all TERM' INT TERM
tjax_wait_all "$logs"
