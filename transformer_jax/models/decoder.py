"""Decoder-only Transformer language model (GPT-2 / Llama shapes) from the shared layer library."""

import flax.linen as nn

from transformer_jax.config import ConfigError
from transformer_jax.models import attention
from transformer_jax.models import layers
from transformer_jax.models import stack
from transformer_jax.models.encoder import relative_table
from transformer_jax.models.layers import ModelConfig


class DecoderLM(nn.Module):
  """Causal LM over packed rows: attention is block-diagonal over `segment_ids` and positions are
  per-segment. Returns fp32 logits [B, T, V] (or, with `hidden`, the final hidden states [B, T, D]
  that the `logits` method maps to them)."""
  cfg: ModelConfig
  INPUTS = ("inputs", "segment_ids", "positions")  # batch keys, in call order
  TARGETS = ("targets", "weights")

  def setup(self):
    self.embed = layers.Embedder(self.cfg)  # the head's modules live in setup: see `logits`

  def logits(self, x_BTD):
    """The output head alone (callable as model.apply(..., method="logits"))."""
    return self.embed.logits(x_BTD)

  @nn.compact
  def __call__(self, tokens_BT, segment_ids_BT=None, positions_BT=None, *, prefix_BT=None,
               deterministic=True, decode=False, hidden=False):
    """`prefix_BT` (1 = in its segment's prefix) makes a prefix LM: every position also sees the
    whole prefix of its segment, so the prefix is attended bidirectionally."""
    c = self.cfg
    b, t = tokens_BT.shape
    offset = layers.DecodeOffset(name="decode_offset")(t) if decode and positions_BT is None else 0
    segment_ids_BT, positions_BT = layers.default_positions(segment_ids_BT, positions_BT, b, t)
    positions_BT = positions_BT + offset
    mask_BTS = attention.mask(segment_ids_BT, segment_ids_BT, causal=True)
    if prefix_BT is not None:
      if not decode and attention.sequence_axis():  # the ring reads segments, not this mask
        raise ConfigError("a prefix LM cannot run with a sequence axis (ring attention builds "
                          "its mask from segment ids: the targets would see the future); use "
                          "mesh.sequence=1")
      mask_BTS |= (attention.mask(segment_ids_BT, segment_ids_BT, causal=False)
                   & (prefix_BT[:, None, :] > 0))

    x_BTD = self.embed.embed(tokens_BT, positions_BT)
    x_BTD = nn.Dropout(c.dropout_rate)(x_BTD, deterministic)
    x_BTD = stack.apply_blocks(c, x_BTD, positions_BT, mask_BTS, deterministic, decode,
                               causal=prefix_BT is None, segment_ids_BT=segment_ids_BT,
                               rel_table=relative_table(self, c))  # position=relative: T5's bias
    if c.norm_position == "pre":
      x_BTD = layers.Norm(c, name="final_norm")(x_BTD)
    return x_BTD if hidden else self.logits(x_BTD)
