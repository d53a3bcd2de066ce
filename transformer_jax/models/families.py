"""The model families by `model.family`, and the dummy inputs that initialise any of them.

Every family returns fp32 logits [B, T, V]; with `hidden=True` it returns its final hidden states
[B, T, D] instead, and its `logits` method (`model.apply(..., x_BTD, method="logits")`) is the
output head alone, so a loss can form the logits a few tokens at a time (train.loss_chunk).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.models.decoder import DecoderLM
from transformer_jax.models.encdec import EncoderDecoder
from transformer_jax.models.encoder import EncoderLM
from transformer_jax.models.layers import ModelConfig

FAMILIES = {"decoder": DecoderLM, "encoder": EncoderLM, "encdec": EncoderDecoder}


def for_inference(model):
  """The model as sampling, beam search and scoring run it: an MoE's experts drop nothing. With
  model.expert_capacity_factor, what a token keeps depends on its row's length, and a batch's
  rows are padded to the longest: a score would depend on the other rows, and a prompt's prefill
  would drop tokens that the one-token steps after it never drop. Same parameters."""
  if not model.cfg.expert_capacity_factor:
    return model
  return type(model)(dataclasses.replace(model.cfg, expert_capacity_factor=0.0))


def build_model(config):
  """The model of a config (its `model` section's family, with resolved sizes)."""
  return FAMILIES[config.model.family](ModelConfig.from_config(config.model))


def init_inputs(model, length: int = 8) -> list:
  """Token arrays for `model.init`: an encoder-decoder takes a source and a target."""
  return [jnp.zeros((1, length), jnp.int32)] * (2 if isinstance(model, EncoderDecoder) else 1)


def abstract_params(model, length: int = 8):
  """The parameters' shapes and dtypes (unboxed), without computing anything."""
  return nn.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), *init_inputs(model, length))["params"]))
