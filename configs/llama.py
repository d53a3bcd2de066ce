"""Llama shapes: `configs/llama.py:SIZE` with SIZE one of tiny | 1b | 7b | 13b | 70b, and each as
SIZE_long: 8x its context by llama3 RoPE scaling (`long_context` below).

  python -m transformer_jax.aot --config=configs/llama.py:7b --topology=v5p-8
  python -m transformer_jax.train --config=configs/llama.py:7b --workdir=runs/llama7b

7b, 13b and 70b are Llama 2's (Touvron et al. 2023, table 1 and appendix A): vocabulary 32000,
4096-token context, multi-head attention except 70b's grouped-query attention with 8 KV heads,
SwiGLU widths 11008 / 13824 / 28672, rotary positions (theta 10^4), pre-RMSNorm (eps 1e-5), no
biases, untied output projection; AdamW b2 0.95, eps 1e-5, weight decay 0.1, clipping 1.0, 2000
warmup steps, cosine to 10%, 4M tokens per batch (1024 x 4096). 1b is Llama 3.2 1B's shape (16
layers, width 2048, 32 heads / 8 KV heads, SwiGLU 8192, theta 5e5, tied embeddings) with Llama 2's
32000-token vocabulary and a 4096-token context (Llama 3.2 itself: 128256 tokens). `tiny` is a
CPU-sized model of the same family for tests.

Big sizes scan their layers (model.scan_layers: compile time independent of depth), shard
parameters and optimizer state over every chip (mesh.fsdp=-1), compute in bfloat16 with fp32
parameters and split the batch into the fewest microbatches that fit (train.microbatches=0).
Which slices they fit: benchmarks/RESULTS.md "TPU pods, ahead-of-time from CPU".
"""

from transformer_jax.config import base

# name: (num_layers, d_model, num_heads, num_kv_heads, d_ff, vocab, seq_len, batch, lr, remat)
SIZES = {
    "tiny": (2, 64, 4, 2, 172, 8192, 64, 8, 1e-3, "none"),
    "1b": (16, 2048, 32, 8, 8192, 32000, 4096, 256, 3e-4, "none"),
    "7b": (32, 4096, 32, 32, 11008, 32000, 4096, 1024, 3e-4, "full"),
    "13b": (40, 5120, 40, 40, 13824, 32000, 4096, 1024, 3e-4, "full"),
    "70b": (80, 8192, 64, 8, 28672, 32000, 4096, 1024, 1.5e-4, "full"),
}


def get_config(arg=None):
  size = arg or "7b"
  if size.endswith("_long") and size[:-len("_long")] in SIZES:
    return long_context(get_config(size[:-len("_long")]))
  if size not in SIZES:
    raise KeyError(f"unknown llama size {size!r}; one of {', '.join(SIZES)} (each also as "
                   f"SIZE_long)")
  layers, d, heads, kv_heads, d_ff, vocab, seq, batch, lr, remat = SIZES[size]
  c = base.get_config()
  c.model.update(num_layers=layers, d_model=d, num_heads=heads, num_kv_heads=kv_heads, d_ff=d_ff,
                 vocab_size=vocab, max_len=seq, position="rotary", rope_theta=10000.0,
                 norm="rmsnorm", norm_position="pre", norm_eps=1e-5, activation="swiglu",
                 use_bias=False, tie_embeddings=False, dropout_rate=0.0, remat=remat)
  c.data.seq_len = seq
  c.train.batch_size = batch
  c.train.steps = 500_000
  c.optimizer.update(learning_rate=lr, schedule="cosine", warmup_steps=2000, min_lr_ratio=0.1,
                     b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, grad_clip=1.0)
  if size == "1b":
    c.model.update(rope_theta=500000.0, tie_embeddings=True)
  if size == "tiny":
    c.optimizer.update(warmup_steps=10)
    c.train.steps = 100
    c.checkpoint.every_steps = 50
    c.eval.update(every_steps=50, batches=2)
  else:
    c.model.update(dtype="bfloat16", scan_layers=True)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.train.microbatches = 0  # the published batch anywhere: as few as fit (training/fit.py)
  return c


def long_context(c, factor: int = 8):
  """`SIZE_long`: continued pretraining of a SIZE model at `factor` times its context, as Llama
  3.1 extended 8k to 128k: RoPE scaled by the llama3 rule from the pretraining context, rows of
  the new length (packed), a short run at a lower learning rate, and (past one device's memory)
  the sequence split over chips with ring attention. Import or restore the short-context model's
  parameters first (e.g. `python -m transformer_jax.convert import` of a Llama checkpoint, or
  `checkpoint.on_mismatch=params` on a workdir of ours); `tiny_long` runs on a CPU."""
  original = c.data.seq_len
  c.model.update(rope_scaling="llama3", rope_factor=float(factor), rope_original_max_len=original,
                 rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, max_len=original * factor)
  c.data.seq_len = original * factor
  c.train.batch_size = max(c.train.batch_size // factor, 8 if c.model.num_layers <= 2 else 16)
  c.train.steps = min(c.train.steps, 1000 if c.model.num_layers > 2 else 100)
  c.optimizer.update(learning_rate=c.optimizer.learning_rate / 10, warmup_steps=10)
  if c.model.num_layers > 2:  # pods: 8 chips along the sequence per row
    c.mesh.update(sequence=8)
  return c
