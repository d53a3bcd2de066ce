"""seq2seq: sequence-to-sequence on (source, target) pairs (data.format tsv, jsonl_pairs or
functions, or a TFDS catalog dataset): encoder inputs = [bos] source [eos], targets = target [eos]
(bos/eos as data.add_bos/add_eos), each cut to seq_len / target_len (a cut target has no eos). No
chunking and no randomness: the pipeline tokenizes each pair into one example (`example`).
data.target_len = 0 means seq_len."""

import dataclasses

import numpy as np

from transformer_jax.data.objectives import common

NAME = "seq2seq"
FAMILIES = ("encdec",)
PAIRS = True  # reads (source, target) pairs, not documents
CONTROL_PIECES = False


def resolve(s: common.Spec) -> common.Spec:
  return dataclasses.replace(s, target_len=s.target_len or s.seq_len)  # pairs are cut, not chunked


def example(source_ids, target_ids, *, bos_id: int, eos_id: int, start_id: int, add_bos: bool,
            add_eos: bool, seq_len: int, target_len: int) -> dict:
  """One (source, target) pair of token ids as an encoder-decoder example (the module docstring);
  `start_id` (vocab.decoder_start) starts the decoder."""
  inputs = ([bos_id] if add_bos else []) + list(source_ids) + ([eos_id] if add_eos else [])
  targets = (list(target_ids) + ([eos_id] if add_eos else []))[:target_len]
  return {"encoder_inputs": np.asarray(inputs[:seq_len], np.int32),
          # the targets shifted right, as long as they are (none for an empty target: one start
          # alone would shift every later pair packed in the row against its targets)
          "decoder_inputs": np.asarray(([start_id] + targets)[:len(targets)], np.int32),
          "decoder_targets": np.asarray(targets, np.int32)}
