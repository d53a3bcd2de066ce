# shellcheck shell=bash
# Sourced by the launch scripts: flag helpers, the train arguments after
# `--`, quoting, dry-run printing and the per-machine setup. Defines functions only.

tjax_die() { echo "error: $*" >&2; exit 2; }

# tjax_flag_value "$@": for a value flag at $1 (`--flag VALUE` or `--flag=VALUE`), sets
# TJAX_FLAG (the flag's name), TJAX_VALUE and TJAX_SHIFT (how many arguments it took).
tjax_flag_value() {
  if [[ "$1" == --*=* ]]; then
    TJAX_FLAG="${1%%=*}" TJAX_VALUE="${1#*=}" TJAX_SHIFT=1
  else
    TJAX_FLAG="$1" TJAX_SHIFT=2
    [[ $# -ge 2 && "$2" != --* ]] || tjax_die "$1 needs a value"
    TJAX_VALUE="$2"
  fi
  [[ -n "$TJAX_VALUE" ]] || tjax_die "$TJAX_FLAG needs a value"
}

# tjax_take VAR ARGS...: the value flag at ARGS' $1, as tjax_flag_value takes it, into the
# variable VAR; the flag given again with another value is refused (as cli.parse does: the last
# one silently won), with the same value it is one flag.
tjax_take() {
  local var="$1" seen="TJAX_SEEN_$1"
  shift
  tjax_flag_value "$@"
  if [[ -n "${!seen:-}" && "${!var}" != "$TJAX_VALUE" ]]; then
    tjax_die "$TJAX_FLAG given twice ('${!var}', '$TJAX_VALUE'); give one"
  fi
  printf -v "$var" '%s' "$TJAX_VALUE"
  printf -v "$seen" '%s' 1
}

# tjax_usage SCRIPT: the comment block at the top of SCRIPT (a path from the repository root,
# the scripts' working directory), for --help.
tjax_usage() { sed -n '2,/^set -euo/p' "$1" | sed '$d' | sed 's/^# \{0,1\}//'; }

tjax_check_int() {  # NAME VALUE MIN: VALUE must be an integer >= MIN (no leading 0: bash
  # arithmetic would read 010 as 8, and 08 as an error)
  if [[ ! "$2" =~ ^(0|[1-9][0-9]*)$ ]] || (( $2 < $3 )); then
    tjax_die "$1 must be an integer >= $3, got '$2'"
  fi
}

# tjax_config_arg ARGS...: whether ARGS' $1 is --config=SPEC, --config.KEY=VALUE or
# --config.KEY VALUE; if so, takes it (TJAX_SHIFT arguments): the SPEC into TJAX_CONFIG (another
# one already there is refused), the override, as --config.KEY=VALUE, onto TJAX_OVERRIDES (the
# key given again with another value is refused, as cli.parse does).
tjax_config_arg() {
  local key value o
  case "$1" in
    --config=*)
      [[ -z "$TJAX_CONFIG" || "$TJAX_CONFIG" == "${1#--config=}" ]] ||
        tjax_die "two configs given: $TJAX_CONFIG and ${1#--config=}; give one"
      TJAX_CONFIG="${1#--config=}" TJAX_SHIFT=1 ;;
    --config.*=*) key="${1%%=*}" value="${1#*=}" TJAX_SHIFT=1 ;;
    --config.*)
      [[ $# -ge 2 && "$2" != --* ]] || tjax_die "$1 needs a value: $1=VALUE or $1 VALUE"
      key="$1" value="$2" TJAX_SHIFT=2 ;;
    *) return 1 ;;
  esac
  [[ -n "${key:-}" ]] || return 0
  for o in ${TJAX_OVERRIDES[@]+"${TJAX_OVERRIDES[@]}"}; do
    [[ "${o%%=*}" != "$key" ]] && continue
    [[ "$o" == "$key=$value" ]] && return 0
    tjax_die "$key given twice ('${o#*=}', '$value'); give one"
  done
  TJAX_OVERRIDES+=("$key=$value")
}

# tjax_train_args ARGS...: the train command's arguments after `--`:
#   [CONFIG[:ARG]] --workdir DIR [--config.KEY=VALUE ...]
# Sets TJAX_CONFIG, TJAX_WORKDIR, TJAX_OVERRIDES and TJAX_TRAIN (the command as an array).
# CONFIG is checked relative to the current directory (the repository root). Without CONFIG the
# workdir must hold the config.json of an earlier run or a sweep plan (train.py reads it); that
# is checked by the caller, which knows where the workdir lives.
tjax_train_args() {
  TJAX_CONFIG="" TJAX_WORKDIR="" TJAX_OVERRIDES=() TJAX_SEEN_TJAX_WORKDIR=""
  if [[ $# -gt 0 && "$1" != -* ]]; then TJAX_CONFIG="$1"; shift; fi
  while [[ $# -gt 0 ]]; do
    if tjax_config_arg "$@"; then shift "$TJAX_SHIFT"; continue; fi
    case "$1" in
      --workdir|--workdir=*) tjax_take TJAX_WORKDIR "$@"; shift "$TJAX_SHIFT" ;;
      *) tjax_die "unknown train argument '$1' after -- (expected CONFIG[:ARG] --workdir DIR" \
                  "[--config.KEY=VALUE ...])" ;;
    esac
  done
  [[ -n "$TJAX_WORKDIR" ]] || tjax_die "--workdir DIR is required after --"
  if [[ -n "$TJAX_CONFIG" && ! -f "${TJAX_CONFIG%%:*}" ]]; then
    tjax_die "config file not found: ${TJAX_CONFIG%%:*}"
  fi
  TJAX_TRAIN=(python -m transformer_jax.train)
  [[ -z "$TJAX_CONFIG" ]] || TJAX_TRAIN+=("--config=$TJAX_CONFIG")
  TJAX_TRAIN+=("--workdir=$TJAX_WORKDIR" ${TJAX_OVERRIDES[@]+"${TJAX_OVERRIDES[@]}"})
}

# tjax_q ARGS...: the arguments as one shell-quoted line (plain words stay unquoted).
tjax_q() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+=" $a"
    elif [[ "$a" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then  # --flag='value'
      a="${BASH_REMATCH[2]}"; out+=" ${BASH_REMATCH[1]}'${a//\'/\'\\\'\'}'"
    else out+=" '${a//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "${out# }"
}

# tjax_do CMD...: with TJAX_DRY_RUN=1 prints the command, else echoes it to stderr and runs it.
tjax_do() {
  if [[ "${TJAX_DRY_RUN:-0}" == 1 ]]; then tjax_q "$@"; return 0; fi
  echo "+ $(tjax_q "$@")" >&2
  "$@"
}

# tjax_setup EXTRAS CONFIG|--workdir=DIR [--config.KEY=VALUE ...]: on the machine that trains:
# .venv with the project (+ EXTRAS), and once the tokenizer CONFIG names (with the control pieces
# its objective needs, as launch/local.sh makes it), or the one DIR/config.json names (a sweep's
# run, a resume).
tjax_setup() {
  # shellcheck source=launch/_venv.sh
  . launch/_venv.sh
  tjax_venv "$1"
  if [[ "$2" == --workdir=* ]]; then
    python -m transformer_jax.tokenizer "$2" --if_missing "${@:3}"
  else
    python -m transformer_jax.tokenizer --config="$2" --if_missing "${@:3}"
  fi
}

# tjax_python_check [--local] HEADER PREFIX CMD...: a check by the project's Python: runs CMD;
# exit status 2 there (a bad value) is its error line here and exit 2; another failure returns 1
# (for the caller's fallback). With TJAX_DRY_RUN=1 it prints HEADER and CMD (after PREFIX), and
# runs CMD only if --local (it has no effect outside this process: a dry run checks it too).
tjax_python_check() {
  local out run=1
  if [[ "$1" == --local ]]; then shift; elif (( TJAX_DRY_RUN )); then run=0; fi
  if (( run )); then
    out="$("${@:3}" 2>&1)" || {
      if [[ $? == 2 ]]; then grep -m1 '^error: ' <<<"$out" >&2 || echo "$out" >&2; exit 2; fi
      return 1
    }
  fi
  if (( TJAX_DRY_RUN )); then
    echo "$1"
    echo "$2$(tjax_q "${@:3}")"
  fi
}

# tjax_check_config HEADER PREFIX: that CONFIG and its overrides pass the checks that need no
# devices or data (python -m transformer_jax.config), with this checkout's .venv if it has one:
# a bad key or value is one error line here, exit 2, not one on every worker after its setup.
tjax_check_config() {
  [[ -n "$TJAX_CONFIG" && -x .venv/bin/python ]] || return 0
  tjax_python_check --local "$1" "$2" .venv/bin/python -m transformer_jax.config \
    "--config=$TJAX_CONFIG" \
    ${TJAX_OVERRIDES[@]+"${TJAX_OVERRIDES[@]}"} ||
    echo "note: could not check the config here (.venv/bin/python failed); the training" \
         "checks it before compiling" >&2
}

# tjax_check_bucket HEADER PREFIX: for a gs:// TJAX_WORKDIR, that the bucket is writable from
# here (and holds config.json when no TJAX_CONFIG is given), checked with the project's Python
# (gcsfs, which honours STORAGE_EMULATOR_HOST) or else gcloud storage; one error line, exit 2,
# when it is not.
tjax_check_bucket() {
  local py=python3 need=() probe
  [[ "$TJAX_WORKDIR" == gs://* ]] || return 0
  [[ -x .venv/bin/python ]] && py=.venv/bin/python
  [[ -n "$TJAX_CONFIG" ]] || need=(--need=config.json)
  if tjax_python_check "$1" "$2" "$py" -m transformer_jax.config.paths "$TJAX_WORKDIR" \
       ${need[@]+"${need[@]}"}; then :
  elif command -v gcloud >/dev/null; then  # no Python with the project's packages here
    probe="${TJAX_WORKDIR%/}/.launch-probe-$$"
    { printf ok | gcloud storage cp - "$probe" && gcloud storage rm "$probe"; } >/dev/null 2>&1 ||
      tjax_die "workdir $TJAX_WORKDIR is not writable (gcloud storage cp to $probe failed)"
    [[ ${#need[@]} -eq 0 ]] || gcloud storage ls "${TJAX_WORKDIR%/}/config.json" >/dev/null 2>&1 ||
      tjax_die "no CONFIG given and ${TJAX_WORKDIR%/}/config.json not found"
  else
    echo "note: could not check that $TJAX_WORKDIR is writable (no .venv with gcsfs, no gcloud);" \
         "the training checks it before compiling" >&2
  fi
}

# The processes of a job on this machine (launch/local.sh): their pids in the array `pids`.
tjax_stop_all() {  # $1: the signal, to every process still running
  local p
  for p in "${pids[@]}"; do if [[ -n "$p" ]]; then kill "-$1" "$p" 2>/dev/null || true; fi; done
}

# tjax_start_all LOGDIR N CMD...: starts N copies of CMD, process i with TJAX_PROCESS_ID=i and its
# output appended to LOGDIR/process_i.log after a line that dates the run (a resumed run keeps
# the earlier ones' lines); process 0's output is shown here too. Their pids go into `pids`.
tjax_start_all() {
  local logs="$1" n="$2" i log
  shift 2
  for ((i = 0; i < n; i++)); do
    log="$logs/process_$i.log"
    echo "=== $(date -u +%FT%TZ) $(tjax_q "$@")" >>"$log"
    if [[ $i == 0 ]]; then  # (its tee outlives a Ctrl-C: a dead one failed process 0's next write)
      TJAX_PROCESS_ID=0 "$@" > >(trap '' INT TERM HUP; exec tee -p -a "$log") 2>&1 &
    else
      TJAX_PROCESS_ID=$i "$@" >>"$log" 2>&1 &
    fi
    pids+=($!)
  done
}

# tjax_wait_all LOGDIR: waits for every process in `pids` (process i logs to
# LOGDIR/process_i.log) and exits with the job's status: the first failure's (a status other
# than 0 and 143, a stop after a signal), else 143 if any process stopped so, else 0. A failure
# stops the others: they cannot save without the failed one (a checkpoint is written by all
# together; a SIGTERM made them try, and wait for it until JAX's heartbeat timeout), so what
# did not stop on its own within TJAX_KILL_AFTER_S seconds (default 3) gets SIGKILL.
tjax_wait_all() {
  local logdir="$1" status=0 deadline=0 alive i pid rc
  while true; do
    alive=0
    for i in "${!pids[@]}"; do
      pid=${pids[$i]}
      [[ -z "$pid" ]] && continue
      if kill -0 "$pid" 2>/dev/null; then alive=1; continue; fi
      rc=0; wait "$pid" || rc=$?
      pids[i]=""
      [[ $rc == 0 ]] && continue
      # A failure outranks a stop: the job must not look preempted (and be requeued as such).
      if [[ $status == 0 || ( $status == 143 && $rc != 143 ) ]]; then status=$rc; fi
      if [[ $rc != 143 && $deadline == 0 ]]; then
        echo "error: process $i exited with status $rc (log: $logdir/process_$i.log);" \
             "stopping the others" >&3
        deadline=$((SECONDS + ${TJAX_KILL_AFTER_S:-3}))
      fi
    done
    [[ $alive == 0 ]] && break
    if [[ $deadline != 0 && $SECONDS -ge $deadline ]]; then tjax_stop_all KILL; fi
    sleep 0.5 || true  # (a Ctrl-C kills the sleep too: under set -e the job went unwaited for)
  done 3>&2 2>/dev/null  # (not bash's own "PID Killed COMMAND" for each process stopped so)
  exit "$status"
}

# tjax_wait_all_saving LOGDIR: tjax_wait_all, while a Ctrl-C, a SIGTERM or a closed terminal
# (SIGHUP) sends every process SIGTERM: they agree on a step, save and exit (143).
tjax_wait_all_saving() {
  trap 'tjax_stop_all TERM' INT TERM HUP
  tjax_wait_all "$1"
}

# tjax_run_logged LOG SHOW CMD...: runs CMD with its output appended to LOG (SHOW=1: shown here
# too) and returns its status. A SIGTERM, SIGHUP or SIGINT to this shell reaches CMD as SIGTERM
# (it saves a checkpoint and exits 143), and the status said is CMD's. The tee that shows the
# output ignores those signals and a reader that went away (a VM's shutdown signals every
# process, and an ssh connection can drop: a dead tee failed the train's next write, and it
# died without its checkpoint).
tjax_run_logged() {
  local log="$1" show="$2" pid rc=0
  shift 2
  if [[ "$show" == 1 ]]; then
    "$@" > >(trap '' INT TERM HUP; exec tee -p -a "$log") 2>&1 &
  else
    "$@" >>"$log" 2>&1 &
  fi
  pid=$!
  trap 'kill -TERM "$pid" 2>/dev/null' INT TERM HUP
  wait "$pid" || rc=$?
  while (( rc > 128 )) && kill -0 "$pid" 2>/dev/null; do rc=0; wait "$pid" || rc=$?; done
  trap - INT TERM HUP
  return "$rc"
}

# tjax_workers_status FILE RC: the exit status of a train command that `gcloud ... ssh
# --worker=all` ran on every worker of a TPU (launch/tpu_vm.sh), from the lines "tjax: worker W
# exit S" the workers print last, in its output FILE. gcloud's own status RC drops theirs when
# there are several workers (each failure is only printed), and is 0 when a worker's connection
# is lost. The job's status: the first failure's (not 0, not 143), else 143 if a worker stopped
# after a signal, else RC if it is not 0, else 255 (lost: retried) unless worker 0 said 0.
tjax_workers_status() {
  local status="" done0=0 w s
  while read -r w s; do
    if [[ $s != 0 && $s != 143 ]]; then [[ -z $status || $status == 143 ]] && status=$s
    elif [[ $s == 143 && -z $status ]]; then status=143
    fi
    [[ $w == 0 && $s == 0 ]] && done0=1
  done < <(grep -aoE 'tjax: worker [0-9]+ exit [0-9]+' "$1" | awk '{print $3, $5}')
  if [[ -n $status ]]; then echo "$status"
  elif [[ $2 != 0 ]]; then echo "$2"
  elif (( done0 )); then echo 0
  else echo 255
  fi
}
