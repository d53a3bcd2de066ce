"""GPT-3 shapes (Brown et al. 2020, table 2.1): `configs/gpt3.py:SIZE` with SIZE one of
xl | 2.7b | 6.7b | 175b.

  python -m transformer_jax.aot --config=configs/gpt3.py:175b --topology=v5p-1024

GPT-2's architecture at GPT-3's sizes: learned positions, pre-LayerNorm, GELU, 4x MLP, biases,
tied embeddings, 2048-token context; the vocabulary is 50257 rounded up to 50304. All layers use
dense attention (GPT-3 alternated dense and locally banded sparse layers). Batch sizes and peak
learning rates are the paper's (0.5M to 3.2M tokens per batch; 300B tokens: 286k steps for xl
and 2.7b, 143k for 6.7b, 95k for 175b; cosine to 10% over the first 260B, warmup over the first
375M: 358 steps for xl and 2.7b, 179 for 6.7b, 119 for 175b; AdamW b2 0.95, eps 1e-8, weight
decay 0.1, clipping 1.0).

Layers are scanned (model.scan_layers), parameters and optimizer state sharded over every chip
(mesh.fsdp=-1), bfloat16 compute with fp32 parameters, the batch split into the fewest
microbatches that fit (train.microbatches=0). Which slices they fit: benchmarks/RESULTS.md
"TPU pods, ahead-of-time from CPU".
"""

from transformer_jax.config import base

# name: (num_layers, d_model, num_heads, head_dim, batch_size, learning_rate, remat); xl's 24
# heads of 128 are wider (3072) than its model width, as in the paper.
SIZES = {
    "xl": (24, 2048, 24, 128, 512, 2.0e-4, "none"),
    "2.7b": (32, 2560, 32, 80, 512, 1.6e-4, "none"),
    "6.7b": (32, 4096, 32, 128, 1024, 1.2e-4, "full"),
    "175b": (96, 12288, 96, 128, 1536, 0.6e-4, "full"),
}
# The paper's token counts: the training run, the cosine decay (then 10 % to the end), warmup.
TRAIN_TOKENS, DECAY_TOKENS, WARMUP_TOKENS = 300e9, 260e9, 375e6


def get_config(arg=None):
  size = arg or "175b"
  if size not in SIZES:
    raise KeyError(f"unknown gpt3 size {size!r}; one of {', '.join(SIZES)}")
  layers, d, heads, head_dim, batch, lr, remat = SIZES[size]
  c = base.get_config()
  c.model.update(num_layers=layers, d_model=d, num_heads=heads, head_dim=head_dim,
                 vocab_size=50304, max_len=2048,
                 position="learned", norm="layernorm", norm_position="pre", activation="gelu",
                 use_bias=True, tie_embeddings=True, dropout_rate=0.0, dtype="bfloat16",
                 remat=remat, scan_layers=True)
  c.data.seq_len = 2048
  c.train.batch_size = batch
  steps = lambda tokens: round(tokens / (batch * c.data.seq_len))
  c.train.steps = steps(TRAIN_TOKENS)
  c.optimizer.update(learning_rate=lr, schedule="cosine", warmup_steps=steps(WARMUP_TOKENS),
                     decay_steps=steps(DECAY_TOKENS), min_lr_ratio=0.1,
                     b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.train.microbatches = 0  # the paper's batch on any slice: as few as fit (training/fit.py)
  return c
