# shellcheck shell=bash
# Shared by the prepared GPU scripts (benchmarks/gpu_h200.sh, benchmarks/gpu_flags.sh): run from
# the repository root; OUT (required) takes each step's output, one file per step (the device
# tool brings back at most 8); WORK (default /tmp/tjax_gpu) takes the compilation cache and the
# workdirs. DEADLINE (default 570 s, under the device tool's 600 s per command) bounds the whole
# script: each step's timeout is cut to the time left, and a step with under 20 s left is
# skipped (said in its file), so the steps that did run always come back.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
WORK="${WORK:-/tmp/tjax_gpu}"
DEADLINE="${DEADLINE:-570}"
export TJAX_CACHE_DIR="$WORK/cache" PYTHONUNBUFFERED=1
rm -rf "$TJAX_CACHE_DIR"

step() {  # NAME TIMEOUT_S CMD...: runs CMD, its output and wall time in OUT/NAME.txt
  local name="$1" limit="$2"; shift 2
  local left=$((DEADLINE - SECONDS - 10))  # (10 s: timeout's --kill-after)
  if ((left < 20)); then
    echo "# skipped: $((DEADLINE - SECONDS)) s left of DEADLINE=$DEADLINE: $*" > "$OUT/$name.txt"
    echo "$name: skipped"
    return
  fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "# rc $rc (limit $limit s), wall $((SECONDS - t0)) s: $*" >> "$OUT/$name.txt"
  echo "$name: rc $rc, $((SECONDS - t0)) s"
}
