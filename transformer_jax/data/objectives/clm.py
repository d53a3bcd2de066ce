"""clm: causal LM (GPT), the default. Applied to each packed row, not per chunk: predict each next
token of the same segment. Documents may also be concatenated into full rows
(data.packing=concat)."""

import dataclasses

import numpy as np

from transformer_jax.data.objectives import common

NAME = "clm"
FAMILIES = ("decoder",)
CONTROL_PIECES = False  # needs no [MASK], sentinels or mode tokens
CONCAT = True  # data.packing=concat can make its rows


def resolve(s: common.Spec) -> common.Spec:
  return dataclasses.replace(s, target_len=0)


def length_struct(s) -> dict:
  return {common.CHUNK: s.seq_len}


def causal_lm(row: dict) -> dict:
  """The causal-LM objective on one packed row: predict each next token of the same segment.

  Args:
    row: {"inputs", "inputs_segment_ids", "inputs_positions"}, each int32 [seq_len] (or a batch
      of rows, [rows, seq_len]: the same, row by row).

  Returns:
    {"inputs", "targets", "weights", "segment_ids", "positions"}: targets[t] = inputs[t + 1]
    (0 at the end), weights[t] = 1.0 iff segment_ids[t + 1] == segment_ids[t] != 0.
  """
  inputs = np.asarray(row[common.CHUNK], dtype=np.int32)
  segments = np.asarray(row[f"{common.CHUNK}_segment_ids"], dtype=np.int32)
  targets = np.zeros_like(inputs)
  targets[..., :-1] = inputs[..., 1:]
  weights = np.zeros(inputs.shape, dtype=np.float32)
  weights[..., :-1] = (segments[..., 1:] == segments[..., :-1]) & (segments[..., :-1] != 0)
  return {
      "inputs": inputs,
      "targets": targets,
      "weights": weights,
      "segment_ids": segments,
      "positions": np.asarray(row[f"{common.CHUNK}_positions"], dtype=np.int32),
  }


def from_packed(s, row: dict) -> dict:
  del s
  return causal_lm(row)
