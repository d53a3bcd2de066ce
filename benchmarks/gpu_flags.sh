#!/usr/bin/env bash
# The second prepared GPU measurement (issue 24), for a later lease than gpu_h200.sh's: which XLA
# GPU flags, and which attention kernel, help the GPT-2 small step (124M, 1024 tokens, batch 32,
# bf16). One benchmark process per row, each a step of its own (its XLA_FLAGS, its timeout, its
# file OUT/05_rowN.txt: tokens/s, MFU, compile_s, and the step's device time by kernel class
# from --profile), the flags added to JAX's defaults one at a time, most likely to matter
# first. The rows left when DEADLINE (570 s) nears are skipped: ROWS_FROM=N starts at row N (a
# second lease finishes the table).
#
#   OUT=/tmp/out bash benchmarks/gpu_flags.sh          # ~10 minutes of rows on an H200: more
#                                                      # than one 570 s command, so a task's
#                                                      # 15 device minutes (starts included)
#                                                      # finish the first rows, another task
#                                                      # the rest with ROWS_FROM=N
#   OUT=/tmp/out SMOKE=1 bash benchmarks/gpu_flags.sh  # tiny shapes on CPU (the GPU flags are
#                                                      # parsed there too)
# (--profile runs op by op, without command buffers: XLA's default while profiling, so its idle
# and span describe such a step; tokens/s and MFU are of the timed steps, with them.)
[[ -n "${SMOKE:-}" ]] && : "${DEADLINE:=1500}"
# shellcheck source=benchmarks/_gpu_steps.sh
. "$(dirname "${BASH_SOURCE[0]}")/_gpu_steps.sh"

if [[ -n "${SMOKE:-}" ]]; then
  MODEL=(configs/gpt2.py:tiny --config.model.dtype=bfloat16) IMPL=xla STEPS=2 ROUNDS=1 LIMIT=120
else
  MODEL=(configs/gpt2.py:small --config.model.dtype=bfloat16 --config.data.seq_len=1024
         --config.train.batch_size=32 --config.model.vocab_size=50304)
  IMPL=cudnn STEPS=10 ROUNDS=2 LIMIT=180
fi
SCAN=--config.model.scan_layers=true
ROWS=(  # name|XLA_FLAGS|extra config flags
  "defaults||"
  "no Triton GEMM|--xla_gpu_enable_triton_gemm=false|"
  "latency hiding scheduler|--xla_gpu_enable_latency_hiding_scheduler=true|"
  "no command buffers|--xla_gpu_enable_command_buffer=|"
  "autotune level 0|--xla_gpu_autotune_level=0|"
  "defaults, attention_impl=xla||--config.model.attention_impl=xla"
  "defaults, scanned layers||$SCAN"
  "double buffering, scanned layers|--xla_gpu_enable_while_loop_double_buffering=true|$SCAN"
)
for ((i = ${ROWS_FROM:-0}; i < ${#ROWS[@]}; i++)); do
  IFS="|" read -r name flags extra <<< "${ROWS[$i]}"
  # (benchmark compiles cold, without the persistent cache: each row reports its own compile)
  # shellcheck disable=SC2086  # $extra: zero or one flag
  step "05_row$i" "$LIMIT" env XLA_FLAGS="$flags" "$PY" -m transformer_jax.benchmark \
    --config="${MODEL[0]}" "${MODEL[@]:1}" \
    $([[ "$extra" == *attention_impl* ]] || echo "--config.model.attention_impl=$IMPL") $extra \
    --steps="$STEPS" --rounds="$ROUNDS" --profile
  sed -i "1i ## row $i, $name: XLA_FLAGS=$flags $extra" "$OUT/05_row$i.txt"
done
