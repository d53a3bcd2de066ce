"""seq2seq: sequence-to-sequence on (source, target) pairs (data.format tsv, jsonl_pairs or
functions, or a TFDS catalog dataset): encoder inputs = [bos] source [eos], targets = target [eos]
(bos/eos as data.add_bos/add_eos), each cut to seq_len / target_len (a cut source keeps its
eos, as T5 and objectives.source_ids frame it; a cut target has none). No chunking and no
randomness: the pipeline tokenizes each pair into one example (`example`).
data.target_len = 0 means seq_len."""

import dataclasses

import numpy as np

from transformer_jax.data.objectives import common

NAME = "seq2seq"
FAMILIES = ("encdec",)
PAIRS = True  # reads (source, target) pairs, not documents
CONTROL_PIECES = False
ROWS_CHANGES = {  # pipeline.ROWS_VERSION: what changed the rows then (objectives.rows_changed)
    2: "2026-12-08: a source cut to seq_len keeps its eos (it was cut off: inference framed the "
       "cut source with one)"}


def resolve(s: common.Spec) -> common.Spec:
  return dataclasses.replace(s, target_len=s.target_len or s.seq_len)  # pairs are cut, not chunked


def example(source_ids, target_ids, *, bos_id: int, eos_id: int, start_id: int, add_bos: bool,
            add_eos: bool, seq_len: int, target_len: int) -> dict:
  """One (source, target) pair of token ids as an encoder-decoder example (the module docstring);
  `start_id` (vocab.decoder_start) starts the decoder."""
  bos, eos = [bos_id] * bool(add_bos), [eos_id] * bool(add_eos)
  inputs = bos + list(source_ids)[:max(seq_len - len(bos) - len(eos), 0)] + eos
  targets = (list(target_ids) + eos)[:target_len]
  return {"encoder_inputs": np.asarray(inputs[:seq_len], np.int32),
          # the targets shifted right, as long as they are (none for an empty target: one start
          # alone would shift every later pair packed in the row against its targets)
          "decoder_inputs": np.asarray(([start_id] + targets)[:len(targets)], np.int32),
          "decoder_targets": np.asarray(targets, np.int32)}
