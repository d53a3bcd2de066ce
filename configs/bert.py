"""BERT shapes (Devlin et al. 2019): `configs/bert.py:SIZE` with SIZE one of tiny | base | large.

  bash launch/local.sh configs/bert.py:tiny                       # CPU, the embedded corpus
  python -m transformer_jax.train --config=configs/bert.py:base --workdir=runs/bert_base

Encoder-only, trained with masked LM (data.objective=mlm: 15% of tokens selected, 80% -> [MASK],
10% -> a random token, 10% kept): learned positions, token-type embeddings, a LayerNorm after the
embeddings, post-norm blocks (LayerNorm eps 1e-12), GELU, tied output embedding with a bias after
BERT's dense + GELU + LayerNorm transform. BERT's 30522-token WordPiece vocabulary is rounded up
to 30592 (a multiple of 64) for any SentencePiece model up to that size; the tokenizer needs the
[MASK] piece (`python -m transformer_jax.tokenizer ... --special=mask,sentinels:100,ul2`, which
launch/local.sh runs for you). BERT's next-sentence prediction (or ALBERT's sentence order) is
`--config.data.sentence_pair=nsp|sop --config.model.sentence_head=true`: a pooler + 2-way head
on each pair's [CLS], its mean loss added to the MLM loss.
"""

from transformer_jax.config import base

# name: (num_layers, d_model, num_heads, vocab_size, seq_len, batch_size, dropout)
SIZES = {
    "tiny": (2, 128, 4, 8192, 128, 16, 0.0),
    "base": (12, 768, 12, 30592, 512, 256, 0.1),
    "large": (24, 1024, 16, 30592, 512, 256, 0.1),
}


def get_config(arg=None):
  size = arg or "base"
  if size not in SIZES:
    raise KeyError(f"unknown bert size {size!r}; one of {', '.join(SIZES)}")
  layers, d, heads, vocab, seq, batch, dropout = SIZES[size]
  c = base.get_config()
  c.model.update(family="encoder", num_layers=layers, d_model=d, num_heads=heads,
                 vocab_size=vocab, max_len=seq, position="learned", type_vocab_size=2,
                 embed_norm=True, norm="layernorm", norm_position="post", norm_eps=1e-12,
                 activation="gelu_exact", tie_embeddings=True, dropout_rate=dropout)  # erf
  c.data.update(objective="mlm", seq_len=seq,
                tokenizer="runs/tokenizers/stdlib_8192_special.model")
  c.train.batch_size = batch
  c.train.steps = 1_000_000
  c.optimizer.update(learning_rate=1e-4, schedule="linear", warmup_steps=10_000, min_lr_ratio=0.0,
                     b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, grad_clip=1.0)
  if size == "tiny":
    base.cpu_sized(c)
    c.optimizer.learning_rate = 1e-3
  else:
    c.model.dtype = "bfloat16"
  return c
