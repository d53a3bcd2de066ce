"""Encoder-decoder Transformer (the original Transformer, T5) from the shared layer library."""

import flax.linen as nn

from transformer_jax.models import attention
from transformer_jax.models import layers
from transformer_jax.models import stack
from transformer_jax.models.encoder import relative_table
from transformer_jax.models.layers import ModelConfig


class Stack(nn.Module):
  """The encoder's or the decoder's blocks (+ the final norm of a pre-norm stack); the decoder's
  blocks also attend to the encoder's output."""
  cfg: ModelConfig
  causal: bool
  num_layers: int

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BTS, deterministic, decode, encoded_BSD=None,
               cross_mask_BTS=None, segment_ids_BT=None):
    c = self.cfg
    x_BTD = stack.apply_blocks(c, x_BTD, positions_BT, mask_BTS, deterministic, decode,
                               causal=self.causal, num_layers=self.num_layers,
                               encoded_BSD=encoded_BSD, cross_mask_BTS=cross_mask_BTS,
                               rel_table=relative_table(self, c), segment_ids_BT=segment_ids_BT)
    if c.norm_position == "pre":
      x_BTD = layers.Norm(c, name="final_norm")(x_BTD)
    return x_BTD


class EncoderDecoder(nn.Module):
  """Sequence-to-sequence over packed rows: encoder and decoder rows are packed alike (segment k
  of a decoder row belongs to segment k of its encoder row), encoder attention is bidirectional
  within a segment, decoder self-attention causal within a segment, cross-attention to the same
  segment only. One embedding table serves both sides (and the output when tied)."""
  cfg: ModelConfig
  INPUTS = ("encoder_inputs", "decoder_inputs", "encoder_segment_ids", "encoder_positions",
            "decoder_segment_ids", "decoder_positions")
  TARGETS = ("decoder_targets", "decoder_weights")

  def setup(self):
    c = self.cfg
    self.embed = layers.Embedder(c)
    self.encoder = Stack(c, causal=False, num_layers=c.num_layers)
    self.decoder = Stack(c, causal=True, num_layers=c.num_decoder_layers or c.num_layers)
    self.dropout = nn.Dropout(c.dropout_rate)
    self.decode_offset = layers.DecodeOffset()

  def __call__(self, encoder_inputs, decoder_inputs, encoder_segment_ids=None,
               encoder_positions=None, decoder_segment_ids=None, decoder_positions=None, *,
               deterministic=True, decode=False, hidden=False):
    encoded_BSD = self.encode(encoder_inputs, encoder_segment_ids, encoder_positions,
                              deterministic=deterministic)
    return self.decode(encoded_BSD, encoder_segment_ids, decoder_inputs, decoder_segment_ids,
                       decoder_positions, deterministic=deterministic, decode=decode,
                       hidden=hidden)

  def encode(self, tokens_BS, segment_ids_BS=None, positions_BS=None, *, deterministic=True):
    segment_ids_BS, positions_BS = layers.default_positions(segment_ids_BS, positions_BS,
                                                            *tokens_BS.shape)
    mask_BSS = attention.mask(segment_ids_BS, segment_ids_BS, causal=False)
    x_BSD = self.dropout(self.embed.embed(tokens_BS, positions_BS), deterministic)
    return self.encoder(x_BSD, positions_BS, mask_BSS, deterministic, False,
                        segment_ids_BT=segment_ids_BS)

  def decode(self, encoded_BSD, encoder_segment_ids_BS, tokens_BT, segment_ids_BT=None,
             positions_BT=None, *, deterministic=True, decode=False, hidden=False):
    """Logits [B, T, V] for decoder tokens given the encoder's output (with `hidden`, the
    decoder's final hidden states [B, T, D] that `logits` maps to them); with `decode` the
    decoder's self-attention keys/values are cached (one code path for the prompt and each new
    token)."""
    b, t = tokens_BT.shape
    offset = self.decode_offset(t) if decode and positions_BT is None else 0
    segment_ids_BT, positions_BT = layers.default_positions(segment_ids_BT, positions_BT, b, t)
    positions_BT = positions_BT + offset
    encoder_segment_ids_BS, _ = layers.default_positions(encoder_segment_ids_BS, None,
                                                         *encoded_BSD.shape[:2])
    mask_BTT = attention.mask(segment_ids_BT, segment_ids_BT, causal=True)
    cross_BTS = attention.mask(segment_ids_BT, encoder_segment_ids_BS, causal=False)
    x_BTD = self.dropout(self.embed.embed(tokens_BT, positions_BT), deterministic)
    x_BTD = self.decoder(x_BTD, positions_BT, mask_BTT, deterministic, decode, encoded_BSD,
                         cross_BTS, segment_ids_BT)
    return x_BTD if hidden else self.logits(x_BTD)

  def logits(self, x_BTD):
    """The output head alone (callable as model.apply(..., method="logits"))."""
    return self.embed.logits(x_BTD)
