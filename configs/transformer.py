"""The original Transformer (Vaswani et al. 2017): `configs/transformer.py:SIZE` with SIZE one of
tiny | base | big.

  bash launch/local.sh configs/transformer.py:tiny                # CPU, offline
  python -m transformer_jax.train --config=configs/transformer.py:base --workdir=runs/tf_base

Encoder-decoder with post-norm LayerNorm blocks, sinusoidal positions, one embedding table shared
by the encoder, the decoder and the output projection (embeddings scaled by sqrt(d_model)), ReLU
FFN, dropout 0.1 (big: 0.3), label smoothing 0.1, Adam (b2 0.98, eps 1e-9) with the
inverse-square-root schedule after 4000 warm-up steps, trained sequence-to-sequence
(data.objective=seq2seq):
  base, big: WMT 2014 English -> German from the TFDS catalog ("tfds:wmt14_translate/de-en",
             downloaded and prepared once; source "en", target "de") with a 37000-piece shared
             vocabulary, as in the paper (which batches by ~25000 tokens; here 128 rows of 256).
  tiny:      offline, pairs from this Python's standard library: a function's `def` line and
             docstring -> its body (data.format=functions).
Any local pairs work too: --config.data.corpus='pairs/*.tsv' --config.data.format=tsv (or
jsonl_pairs with data.source_field / data.target_field), and a tokenizer trained on them.
"""

from transformer_jax.config import base

# name: (layers, d_model, num_heads, d_ff, vocab, seq, batch, dropout, lr)
SIZES = {
    "tiny": (2, 128, 4, 512, 8192, 128, 16, 0.0, 2e-3),
    "base": (6, 512, 8, 2048, 37000, 256, 128, 0.1, 1e-3),
    "big": (6, 1024, 16, 4096, 37000, 256, 128, 0.3, 1e-3),
}


def get_config(arg=None):
  size = arg or "base"
  if size not in SIZES:
    raise KeyError(f"unknown transformer size {size!r}; one of {', '.join(SIZES)}")
  layers, d, heads, d_ff, vocab, seq, batch, dropout, lr = SIZES[size]
  c = base.get_config()
  c.model.update(family="encdec", num_layers=layers, d_model=d, num_heads=heads, d_ff=d_ff,
                 vocab_size=vocab, max_len=seq, position="sinusoidal", sinusoidal_variant="paper",
                 norm="layernorm", norm_position="post", activation="relu", tie_embeddings=True,
                 scale_embeddings=True, dropout_rate=dropout, init_std=d ** -0.5)
  if size == "tiny":
    c.data.update(corpus="stdlib", format="functions",
                  tokenizer="runs/tokenizers/stdlib_functions_8192.model")
  else:
    c.data.update(corpus="tfds:wmt14_translate/de-en", source_field="en", target_field="de",
                  tokenizer="runs/tokenizers/wmt14_en_de_37000.model")
  c.data.update(objective="seq2seq", seq_len=seq)
  c.train.update(batch_size=batch, steps=100_000, label_smoothing=0.1)
  c.optimizer.update(learning_rate=lr, schedule="rsqrt", warmup_steps=4000, b1=0.9, b2=0.98,
                     eps=1e-9, weight_decay=0.0, grad_clip=0.0)
  if size == "tiny":
    base.cpu_sized(c)
  return c
