#!/usr/bin/env bash
# One prepared GPU measurement (issue 24): run from the repository root on a machine with one
# NVIDIA GPU, after the environment of ../shared/device/README.md (wheels on PYTHONPATH). Every
# step has its own timeout and writes its output to OUT/NN_name.txt (at most 8 files, as the
# device tool brings back); the compilation cache and the workdirs go to WORK (default
# /tmp/tjax_gpu). One failing step does not stop the others.
#
#   OUT=/tmp/out bash benchmarks/gpu_h200.sh          # the measurement (~10 minutes on an H200)
#   OUT=/tmp/out SMOKE=1 bash benchmarks/gpu_h200.sh  # the same steps at tiny shapes (CPU: the
#                                                     # script's own check, a minute or two)
#
#  01 versions and devices
#  02 Llama-1B shape at 2048, bf16, cuDNN attention, remat none, batch 8: ours vs Hugging Face
#     eager and torch.compile, interleaved (benchmark --compare=hf,hf_compile), then our step's
#     device time by kernel class from a profile of 5 more steps (--profile)
#  03 GPT-2 small end to end (python -m transformer_jax.train, data and checkpoints included):
#     a cold start (empty compilation cache) then a warm one: each command's wall time, the
#     compile_s of its first metrics line, tokens/s and MFU of the log windows
#  04 cuDNN attention (its own sliding window included) against the fp32 reference, values and
#     gradients on packed bf16 rows (benchmarks/gpu_parity.py)
# shellcheck source=benchmarks/_gpu_steps.sh
. "$(dirname "${BASH_SOURCE[0]}")/_gpu_steps.sh"

if [[ -n "${SMOKE:-}" ]]; then
  LLAMA=(configs/llama.py:tiny --config.data.seq_len=128 --config.train.batch_size=2
         --config.model.vocab_size=512 --config.model.dtype=bfloat16)
  GPT2=(configs/gpt2.py:tiny --config.train.steps=6 --config.train.log_every=2)
  VOCAB=512 STEPS=2 ROUNDS=1 IMPL=xla PARITY=dot_product
else
  LLAMA=(configs/llama.py:1b --config.data.seq_len=2048 --config.train.batch_size=8
         --config.model.remat=none --config.model.dtype=bfloat16)
  GPT2=(configs/gpt2.py:small --config.train.steps=200 --config.train.log_every=20
        --config.train.batch_size=32 --config.checkpoint.every_steps=100)
  VOCAB=8192 STEPS=5 ROUNDS=2 IMPL=cudnn PARITY=cudnn
fi

step 01_env 120 bash -c "nvidia-smi || true; $PY -c 'import jax, flax, optax, torch, transformers;
print(jax.__version__, flax.__version__, optax.__version__, torch.__version__,
transformers.__version__); print(jax.devices())'"

# First, as it is short: the attention kernel agrees with the reference (step 04 in the list).
step 04_attention_parity 180 env PYTHONPATH=".:${PYTHONPATH:-}" "$PY" benchmarks/gpu_parity.py \
  "$PARITY"

# The torch peers share the GPU with JAX: no preallocation of 90 % of it for JAX here.
step 02_llama_vs_torch 420 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" \
  -m transformer_jax.benchmark --config="${LLAMA[0]}" "${LLAMA[@]:1}" \
  --config.model.attention_impl="$IMPL" --steps="$STEPS" --rounds="$ROUNDS" \
  --compare=hf,hf_compile --profile

tok="runs/tokenizers/stdlib_$VOCAB.model"
[[ -f "$tok" ]] || "$PY" -m transformer_jax.tokenizer --corpus=stdlib --vocab_size="$VOCAB" \
  --out="$tok" > "$OUT/03_tokenizer.txt" 2>&1
for start in cold warm; do
  rm -rf "$WORK/gpt2_$start"
  step "03_gpt2_small_$start" 300 "$PY" -m transformer_jax.train --config="${GPT2[0]}" \
    "${GPT2[@]:1}" --workdir="$WORK/gpt2_$start" --config.data.tokenizer="$tok" \
    --config.model.vocab_size="$VOCAB"
  cat "$WORK/gpt2_$start/metrics.jsonl" >> "$OUT/03_gpt2_small_$start.txt" 2>&1
done
du -sh "$TJAX_CACHE_DIR" >> "$OUT/03_gpt2_small_warm.txt" 2>&1
