"""Encoder-only Transformer with a masked-LM head (BERT) from the shared layer library."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.models import attention
from transformer_jax.models import layers
from transformer_jax.models import ops
from transformer_jax.models import stack
from transformer_jax.models.layers import ModelConfig


class EncoderLM(nn.Module):
  """Bidirectional attention within each packed segment; returns fp32 MLM logits [B, T, V] (or,
  with `hidden`, the encoder's final hidden states [B, T, D] that the `logits` method maps to
  them). BERT's head: dense + GELU + norm, then the tied embedding with an output bias."""
  cfg: ModelConfig
  INPUTS = ("inputs", "segment_ids", "positions")
  TARGETS = ("targets", "weights")

  def setup(self):
    """The head's modules and parameters (in setup, so `logits` can run on its own); the
    relative table is made first, keeping this scope's parameter init order (and values)."""
    c = self.cfg
    self.embed = layers.Embedder(c)
    self.rel_table = relative_table(self, c)
    self.mlm_dense_DE = layers.param(self, "mlm_dense", (c.d_model, c.d_model), ("embed", "mlp"),
                                     nn.initializers.normal(c.init_std))
    if c.use_bias:
      self.mlm_dense_bias_E = layers.param(self, "mlm_dense_bias", (c.d_model,), ("mlp",),
                                           nn.initializers.zeros)
    self.mlm_norm = layers.Norm(c)
    if c.use_bias:
      self.mlm_bias_V = layers.param(self, "mlm_bias", (c.vocab_size,), ("vocab",),
                                     nn.initializers.zeros)
    if c.sentence_head:  # BERT's pooler (dense + tanh) and 2-way sentence-pair classifier
      init, zeros = nn.initializers.normal(c.init_std), nn.initializers.zeros
      self.pooler_DE = layers.param(self, "pooler", (c.d_model, c.d_model), ("embed", "mlp"),
                                    init)
      self.pooler_bias_E = layers.param(self, "pooler_bias", (c.d_model,), ("mlp",), zeros)
      self.sentence_EC = layers.param(self, "sentence", (c.d_model, 2), ("mlp", None), init)
      self.sentence_bias_C = layers.param(self, "sentence_bias", (2,), (None,), zeros)

  @nn.compact
  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, types_BT=None, *,
               deterministic=True, decode=False, hidden=False):
    del decode  # nothing to cache: every position sees every other
    c = self.cfg
    segment_ids_BT, positions_BT = layers.default_positions(segment_ids_BT, positions_BT,
                                                            *tokens_BT.shape)
    mask_BTS = attention.mask(segment_ids_BT, segment_ids_BT, causal=False)
    x_BTD = nn.Dropout(c.dropout_rate)(self.embed.embed(tokens_BT, positions_BT, types_BT),
                                       deterministic)
    x_BTD = stack.apply_blocks(c, x_BTD, positions_BT, mask_BTS, deterministic, False,
                               causal=False, rel_table=self.rel_table,
                               segment_ids_BT=segment_ids_BT)
    if c.norm_position == "pre":
      x_BTD = layers.Norm(c, name="final_norm")(x_BTD)
    return x_BTD if hidden else self.logits(x_BTD)

  def logits(self, x_BTD):
    """The MLM head alone (callable as model.apply(..., method="logits")): dense + GELU + norm
    before the (tied) output projection, plus the output bias."""
    c = self.cfg
    h_BTD = ops.dense(x_BTD, self.mlm_dense_DE.astype(c.compute_dtype))
    if c.use_bias:
      h_BTD = h_BTD + layers.lead(self.mlm_dense_bias_E, h_BTD)
    act = ops.gelu if c.activation != "gelu_exact" else (
        lambda u: jax.nn.gelu(u, approximate=False))  # BERT's erf GELU, as the MLP's
    logits_BTV = self.embed.logits(self.mlm_norm(act(h_BTD)))
    if c.use_bias:
      logits_BTV = logits_BTV + layers.lead(self.mlm_bias_V, logits_BTV)
    return logits_BTV

  def sentence_logits(self, x_BTD):
    """The sentence-pair head (model.sentence_head) at every position, fp32 [B, T, 2]; a pair's
    prediction is the one at its [CLS] (first) token (model.apply(..., method=...))."""
    dt = self.cfg.compute_dtype
    pooled_BTE = ops.dense(x_BTD, self.pooler_DE.astype(dt))
    pooled_BTE = jnp.tanh(pooled_BTE + layers.lead(self.pooler_bias_E, pooled_BTE))
    logits_BTC = ops.dense(pooled_BTE, self.sentence_EC.astype(dt))
    return (logits_BTC + layers.lead(self.sentence_bias_C, logits_BTC)).astype(jnp.float32)


def relative_table(module, c: ModelConfig, name="relative_bias"):
  """A stack's shared T5 relative-position bias table [buckets, heads] (None otherwise)."""
  if c.position != "relative":
    return None
  return layers.param(module, name, (c.relative_buckets, c.num_heads), (None, "heads"),
                      nn.initializers.normal(c.init_std))
