#!/usr/bin/env bash
# Train on this machine (CPU, or the local GPUs/TPU when jax sees them).
#
#   bash launch/local.sh [CONFIG[:ARG]] [--workdir DIR] [--config.KEY=VALUE ...]
#
# With no arguments: the smoke model (configs/smoke.py) on the embedded corpus, workdir
# runs/smoke. Creates or reuses .venv, installs the project, trains the default SentencePiece model
# of the embedded corpus once (runs/tokenizers/stdlib_8192.model), then trains. Re-running the
# same command resumes from the workdir's latest checkpoint.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/_venv.sh
. launch/_venv.sh

config="configs/smoke.py"
workdir=""
overrides=()
if [[ $# -gt 0 && "$1" != --* ]]; then config="$1"; shift; fi
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workdir) [[ $# -ge 2 ]] || { echo "error: --workdir needs a value" >&2; exit 2; }
               workdir="$2"; shift 2 ;;
    --workdir=*) workdir="${1#--workdir=}"; shift ;;
    --config.*=*) overrides+=("$1"); shift ;;
    *) echo "error: unknown argument '$1' (usage: launch/local.sh [CONFIG[:ARG]]" \
            "[--workdir DIR] [--config.KEY=VALUE ...])" >&2; exit 2 ;;
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
tokenizer="runs/tokenizers/stdlib_8192.model"
if [[ ! -f "$tokenizer" ]]; then
  echo "training the embedded corpus's SentencePiece model (once) -> $tokenizer"
  python -m transformer_jax.tokenizer --corpus=stdlib --vocab_size=8192 --out="$tokenizer"
fi
echo "workdir: $workdir"
exec python -m transformer_jax.train --config="$config" --workdir="$workdir" "${overrides[@]}"
