"""T5 v1.1 shapes (Raffel et al. 2020; the v1.1 checkpoints): `configs/t5.py:SIZE` with SIZE one
of tiny | small | base | large.

  bash launch/local.sh configs/t5.py:tiny                         # CPU, the embedded corpus
  python -m transformer_jax.train --config=configs/t5.py:base --workdir=runs/t5_base

Encoder-decoder trained with span corruption (data.objective=span: 15% noise density, mean span
length 3, each span replaced by a sentinel <extra_id_i>; 512 input and 114 target tokens):
bucketed relative position bias (32 buckets, max distance 128; bidirectional in the encoder,
causal in the decoder; one table per stack), pre-norm RMSNorm without bias (eps 1e-6), gated-GELU
FFN, no dense biases, unscaled attention logits, untied output projection. The encoder and the
decoder may have different depths (tiny: 2 and 1). T5 trained with Adafactor; here AdamW with the
inverse-square-root schedule. The tokenizer needs the sentinel pieces (launch/local.sh makes it).
"""

from transformer_jax.config import base

# name: (enc layers, dec layers, d_model, num_heads, head_dim, d_ff, vocab, seq, batch, lr)
SIZES = {
    "tiny": (2, 1, 128, 4, 32, 256, 8192, 128, 16, 3e-3),
    "small": (8, 8, 512, 6, 64, 1024, 32128, 512, 128, 1e-2),
    "base": (12, 12, 768, 12, 64, 2048, 32128, 512, 128, 1e-2),
    "large": (24, 24, 1024, 16, 64, 2816, 32128, 512, 128, 1e-2),
}


def get_config(arg=None):
  size = arg or "base"
  if size not in SIZES:
    raise KeyError(f"unknown t5 size {size!r}; one of {', '.join(SIZES)}")
  enc, dec, d, heads, head_dim, d_ff, vocab, seq, batch, lr = SIZES[size]
  c = base.get_config()
  c.model.update(family="encdec", num_layers=enc, num_decoder_layers=dec, d_model=d,
                 num_heads=heads, head_dim=head_dim, d_ff=d_ff, vocab_size=vocab, max_len=seq,
                 position="relative", relative_buckets=32, relative_max_distance=128,
                 norm="rmsnorm", norm_position="pre", norm_eps=1e-6, activation="geglu",
                 use_bias=False, tie_embeddings=False, query_scale=1.0, dropout_rate=0.0,
                 init_std=d ** -0.5)
  c.data.update(objective="span", seq_len=seq, noise_density=0.15, mean_span_length=3.0,
                tokenizer="runs/tokenizers/stdlib_8192_special.model")
  c.train.batch_size = batch
  c.train.steps = 524_288
  c.optimizer.update(learning_rate=lr, schedule="rsqrt", warmup_steps=10_000, weight_decay=0.0,
                     grad_clip=1.0)
  if size == "tiny":
    base.cpu_sized(c)
  else:
    c.model.dtype = "bfloat16"
  return c
