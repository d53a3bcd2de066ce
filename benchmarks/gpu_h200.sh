#!/usr/bin/env bash
# One prepared GPU measurement (issue 24): run from the repository root on a machine with one
# NVIDIA GPU, after the environment of ../shared/device/README.md (wheels on PYTHONPATH). Every
# step has its own timeout, cut so that the whole script ends within DEADLINE (570 s: the device
# tool's 600 s per command), and writes its output to OUT/NN_name.txt (7 files; the device tool
# brings back 8); the compilation cache and the workdirs go to WORK (default /tmp/tjax_gpu). One
# failing step does not stop the others. Ask the device tool for an H200 (kind nvidia-h200): on a
# GPU under 100 GB (an H100) step 02 runs batch 4, as ours and the torch peer share the GPU.
#
#   OUT=/tmp/out bash benchmarks/gpu_h200.sh          # the measurement (~8 minutes on an H200)
#   OUT=/tmp/out SMOKE=1 bash benchmarks/gpu_h200.sh  # the same steps at tiny shapes (CPU: the
#                                                     # script's own check, ~6 minutes)
#
# In the order they run (the likeliest to be cut by the deadline last):
#  01 versions and devices
#  04 cuDNN attention (its own sliding window included) against the fp32 reference, values and
#     gradients on packed bf16 rows (benchmarks/gpu_parity.py)
#  02 Llama-1B shape at 2048, bf16, cuDNN attention, remat none, batch 8: ours vs Hugging Face
#     + torch.compile, interleaved (benchmark --compare=hf_compile), then our step's device time
#     by kernel class from a profile of 5 more steps (--profile)
#  03 GPT-2 small end to end (python -m transformer_jax.train, data and checkpoints included):
#     the tokenizer and the prepared corpus first (03_prepare, so that no start pays for them),
#     then a cold start (empty compilation cache) and a warm one: each command's wall time, the
#     compile_s of its first metrics line, tokens/s and MFU of the log windows (a checkpoint
#     every 50 steps, to show its cost in the next window)
#  05 GPT-2 small at its published batch (512 x 1024 tokens, 4 microbatches), 20 steps
[[ -n "${SMOKE:-}" ]] && : "${DEADLINE:=1500}"  # (CPU steps are slower; no device limit there)
# shellcheck source=benchmarks/_gpu_steps.sh
. "$(dirname "${BASH_SOURCE[0]}")/_gpu_steps.sh"

memory_mib="$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null \
  | head -1 | tr -dc 0-9)"
LLAMA_BATCH=8
if [[ -n "$memory_mib" ]] && ((memory_mib < 100000)); then
  LLAMA_BATCH=4  # an H100 (80 GB): ours and the torch peer at batch 8 do not fit side by side
fi
if [[ -n "${SMOKE:-}" ]]; then
  LLAMA=(configs/llama.py:tiny --config.data.seq_len=128 --config.train.batch_size=2
         --config.model.vocab_size=512 --config.model.dtype=bfloat16)
  GPT2=(configs/gpt2.py:tiny --config.train.steps=6 --config.train.log_every=2)
  PUBLISHED=(--config.train.microbatches=2 --config.train.steps=4 --config.train.log_every=2)
  VOCAB=512 STEPS=2 ROUNDS=1 IMPL=xla PARITY=dot_product
else
  LLAMA=(configs/llama.py:1b --config.data.seq_len=2048 --config.train.batch_size="$LLAMA_BATCH"
         --config.model.remat=none --config.model.dtype=bfloat16)
  GPT2=(configs/gpt2.py:small --config.train.steps=100 --config.train.log_every=10
        --config.train.batch_size=32 --config.checkpoint.every_steps=50)
  PUBLISHED=(--config.train.microbatches=4 --config.train.steps=20 --config.train.log_every=5
             --config.checkpoint.every_steps=10)
  VOCAB=8192 STEPS=5 ROUNDS=2 IMPL=cudnn PARITY=cudnn
fi

step 01_env 60 bash -c "nvidia-smi || true; $PY -c 'import jax, flax, optax, torch, transformers;
print(jax.__version__, flax.__version__, optax.__version__, torch.__version__,
transformers.__version__); print(jax.devices())'"

step 04_attention_parity 120 env PYTHONPATH=".:${PYTHONPATH:-}" "$PY" benchmarks/gpu_parity.py \
  "$PARITY"

# The torch peer shares the GPU with JAX: no preallocation of 90 % of it for JAX here.
step 02_llama_vs_torch 300 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" \
  -m transformer_jax.benchmark --config="${LLAMA[0]}" "${LLAMA[@]:1}" \
  --config.model.attention_impl="$IMPL" --steps="$STEPS" --rounds="$ROUNDS" \
  --compare=hf_compile --profile

tok="runs/tokenizers/stdlib_$VOCAB.model"
step 03_prepare 90 bash -c "{ [[ -f '$tok' ]] || '$PY' -m transformer_jax.tokenizer \
  --corpus=stdlib --vocab_size=$VOCAB --out='$tok'; } && '$PY' -m transformer_jax.benchmark \
  --config=${GPT2[0]} ${GPT2[*]:1} --config.data.tokenizer='$tok' \
  --config.model.vocab_size=$VOCAB --data_only --steps=1 --rounds=1"
for start in cold warm; do
  rm -rf "$WORK/gpt2_$start"
  step "03_gpt2_small_$start" "$([[ $start == cold ]] && echo 200 || echo 120)" "$PY" \
    -m transformer_jax.train --config="${GPT2[0]}" "${GPT2[@]:1}" --workdir="$WORK/gpt2_$start" \
    --config.data.tokenizer="$tok" --config.model.vocab_size="$VOCAB"
  cat "$WORK/gpt2_$start/metrics.jsonl" >> "$OUT/03_gpt2_small_$start.txt" 2>&1
done

# GPT-2 small at its published batch, 512 x 1024 tokens, in the 4 microbatches of 128 rows that
# train.microbatches=0 chooses on one H100 or H200 (aot, benchmarks/RESULTS.md), pinned here so
# that no search compile comes first (the last step: it runs in the time left)
rm -rf "$WORK/gpt2_published"
step 05_gpt2_small_published 150 "$PY" -m transformer_jax.train --config="${GPT2[0]}" \
  "${PUBLISHED[@]}" --workdir="$WORK/gpt2_published" --config.data.tokenizer="$tok" \
  --config.model.vocab_size="$VOCAB"
cat "$WORK/gpt2_published/metrics.jsonl" >> "$OUT/05_gpt2_small_published.txt" 2>&1
