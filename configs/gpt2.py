"""GPT-2 shapes (Radford et al. 2019): `configs/gpt2.py:SIZE` with SIZE one of
tiny | bench_cpu | small | medium | large | xl.

  python -m transformer_jax.train --config=configs/gpt2.py:small --workdir=runs/gpt2_small
  python -m transformer_jax.benchmark --config=configs/gpt2.py:bench_cpu --steps=10

The full sizes keep GPT-2's batch (512 x 1024 tokens) on any devices: train.microbatches=0 splits
it into the fewest microbatches whose train step fits the device's memory. The vocabulary is
GPT-2's 50257 rounded up to 50304 (a multiple of 128) for fast matmuls; any
tokenizer up to that size fits. `bench_cpu` is the reference CPU benchmark shape of
benchmarks/RESULTS.md (with train.cpu_onednn on); `tiny` is what the tests use. The full sizes
pack rows by concatenation (data.packing=concat: no padding, documents continue across rows), as
GPT-2 was trained.
"""

from transformer_jax.config import base

# name: (num_layers, d_model, num_heads, vocab_size, seq_len, batch_size)
SIZES = {
    "tiny": (2, 64, 4, 8192, 64, 8),
    "bench_cpu": (6, 384, 6, 8192, 256, 8),
    "small": (12, 768, 12, 50304, 1024, 512),
    "medium": (24, 1024, 16, 50304, 1024, 512),
    "large": (36, 1280, 20, 50304, 1024, 512),
    "xl": (48, 1600, 25, 50304, 1024, 512),
}


def get_config(arg=None):
  size = arg or "small"
  if size not in SIZES:
    raise KeyError(f"unknown gpt2 size {size!r}; one of {', '.join(SIZES)}")
  layers, d, heads, vocab, seq, batch = SIZES[size]
  c = base.get_config()
  c.model.update(num_layers=layers, d_model=d, num_heads=heads, vocab_size=vocab, max_len=seq,
                 position="learned", norm="layernorm", norm_position="pre", activation="gelu",
                 tie_embeddings=True, dropout_rate=0.0)
  c.data.seq_len = seq
  c.train.batch_size = batch
  c.optimizer.update(learning_rate=6e-4, warmup_steps=2000, weight_decay=0.1, grad_clip=1.0)
  c.train.steps = 100_000
  if size in ("tiny", "bench_cpu"):
    c.optimizer.update(learning_rate=1e-3, warmup_steps=10)
    c.train.steps = 100
    c.checkpoint.every_steps = 50
    c.eval.update(every_steps=50, batches=2)
    # bench_cpu is a throughput recipe: oneDNN's dots on x86-64, 1.08-1.09x per step, for a
    # compile at every start (benchmarks/RESULTS.md, "XLA:CPU oneDNN dots")
    c.train.cpu_onednn = size == "bench_cpu"
  else:  # GPT-2's own layout: documents concatenated into full rows (data/packing.py)
    c.model.dtype = "bfloat16"
    c.data.packing = "concat"
    # The published batch on any number of devices: the fewest microbatches whose step fits
    # the device (training/fit.py; 4 of 128 rows for small on one H100, 1 on a CPU)
    c.train.microbatches = 0
  return c
