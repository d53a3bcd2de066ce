"""prefix_lm: a decoder's prefix LM. Each chunk is split at a uniform point; the prefix is attended
bidirectionally and not predicted, the rest causally. The batch gets a `prefix` key (1 in the
prefix), which the model takes as `prefix_BT`."""

import dataclasses

import numpy as np

from transformer_jax.data.objectives import common

NAME = "prefix_lm"
FAMILIES = ("decoder",)
SPLASH = "its mask"  # why Pallas splash attention cannot serve it
KEYS = ("inputs", "targets", "weights", "prefix")
PREFIX = True  # outside training too: a context (a prompt) is read as the prefix
CONTROL_PIECES = False  # needs no [MASK], sentinels or mode tokens (the clm tokenizer serves)


def resolve(s: common.Spec) -> common.Spec:
  return dataclasses.replace(s, target_len=0)


def corrupt(tokens_l: np.ndarray, rng: np.random.Generator, vocab, s) -> dict:
  """A uniformly random split point u in [1, len - 1]; tokens before u form the prefix (attended
  bidirectionally, not predicted), the rest is predicted causally. {"inputs", "targets" (next
  token), "weights", "prefix" (1 in the prefix)}."""
  del vocab, s
  tokens_l = np.asarray(tokens_l, dtype=np.int32)
  n = len(tokens_l)
  u = int(rng.integers(1, n)) if n >= 2 else n
  targets_l = np.zeros_like(tokens_l)
  targets_l[:-1] = tokens_l[1:]
  t_l = np.arange(n)
  weights_l = ((t_l >= u - 1) & (t_l < n - 1)).astype(np.float32)  # predicts tokens u..n-1
  return {"inputs": tokens_l, "targets": targets_l, "weights": weights_l,
          "prefix": (t_l < u).astype(np.int32)}


def length_struct(s) -> dict:
  return common.decoder_lengths(s, KEYS)


def from_packed(s, row: dict) -> dict:
  del s
  return common.decoder_row(row, ints=("prefix",))


def loss(s) -> common.Loss:
  del s
  return common.Loss(inputs=(("prefix", "prefix_BT"),))
