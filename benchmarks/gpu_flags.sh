#!/usr/bin/env bash
# The second prepared GPU measurement (issue 24), for a later lease than gpu_h200.sh's: which XLA
# GPU flags, and which attention kernel, help the GPT-2 small step (124M, 1024 tokens, batch 32,
# bf16). One benchmark process per row, each with its own XLA_FLAGS and timeout, the flags added
# to JAX's defaults one at a time; every row's JSON (tokens/s, MFU, compile_s, and the step's
# device time by kernel class from --profile) goes to one file.
#
#   OUT=/tmp/out bash benchmarks/gpu_flags.sh          # ~10 minutes on an H200
#   OUT=/tmp/out SMOKE=1 bash benchmarks/gpu_flags.sh  # tiny shapes on CPU (the GPU flags are
#                                                      # parsed there too)
# shellcheck source=benchmarks/_gpu_steps.sh
. "$(dirname "${BASH_SOURCE[0]}")/_gpu_steps.sh"

if [[ -n "${SMOKE:-}" ]]; then
  MODEL=(configs/gpt2.py:tiny --config.model.dtype=bfloat16) IMPL=xla STEPS=2 ROUNDS=1 LIMIT=120
else
  MODEL=(configs/gpt2.py:small --config.model.dtype=bfloat16 --config.data.seq_len=1024
         --config.train.batch_size=32 --config.model.vocab_size=50304)
  IMPL=cudnn STEPS=10 ROUNDS=2 LIMIT=150
fi
ROWS=(
  "defaults|"
  "latency hiding scheduler|--xla_gpu_enable_latency_hiding_scheduler=true"
  "no command buffers|--xla_gpu_enable_command_buffer="
  "no Triton GEMM|--xla_gpu_enable_triton_gemm=false"
  "autotune level 0|--xla_gpu_autotune_level=0"
  "while-loop double buffering (scanned layers)|--xla_gpu_enable_while_loop_double_buffering=true"
)
run_rows() {
  for row in "${ROWS[@]}"; do
    local name="${row%%|*}" flags="${row#*|}"
    echo "## $name: XLA_FLAGS=$flags"
    # (benchmark compiles cold, without the persistent cache: each row reports its own compile)
    XLA_FLAGS="$flags" timeout --kill-after=10 "$LIMIT" "$PY" -m transformer_jax.benchmark \
      --config="${MODEL[0]}" "${MODEL[@]:1}" --config.model.attention_impl="$IMPL" \
      --steps="$STEPS" --rounds="$ROUNDS" --profile 2>&1 | tail -1
  done
  echo "## defaults, attention_impl=xla"
  timeout --kill-after=10 "$LIMIT" "$PY" -m transformer_jax.benchmark --config="${MODEL[0]}" \
    "${MODEL[@]:1}" --config.model.attention_impl=xla --steps="$STEPS" --rounds="$ROUNDS" \
    --profile 2>&1 \
    | tail -1
}
step 05_xla_flags $((LIMIT * 8)) bash -c "$(declare -p ROWS MODEL IMPL STEPS ROUNDS LIMIT PY \
  TJAX_CACHE_DIR); $(declare -f run_rows); run_rows"
