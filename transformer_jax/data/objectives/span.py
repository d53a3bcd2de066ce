"""span: T5's span corruption, encoder-decoder. round(len * data.noise_density) noise tokens in
round(noise / data.mean_span_length) spans placed like T5's `random_spans_noise_mask` (the chunk
starts with kept tokens, ends with noise); the i-th span becomes the sentinel <extra_id_i> in the
inputs, which end with eos (T5's, and so a source at inference: objectives.source_ids); targets =
<extra_id_0> span_0 <extra_id_1> span_1 ... eos. data.target_len = 0 picks the
longest decoder sequence of a chunk whose inputs fill seq_len (T5's `random_spans_helper`)."""

import dataclasses

from transformer_jax.data.objectives import common
from transformer_jax.data.objectives import spans

NAME = "span"
FAMILIES = ("encdec",)
SOURCE_EOS = True  # Every encoder input ends with eos.
CONTINUATION_AS_SPAN = True  # Evaluation asks for a continuation as span <extra_id_0>.


def check(d):
  spans.check(d)


def rows_changed(d) -> str:
  del d
  return common.SPAN_ROWS_CHANGED


def modes(s) -> list:
  return [(s.noise_density, s.mean_span_length)]


def worst_lengths(s, length: int) -> tuple[int, int]:
  """The longest (encoder, decoder) sequences a chunk of `length` tokens can give."""
  return spans.worst_lengths(length, modes(s))


def resolve(s: common.Spec) -> common.Spec:
  if not s.target_len:
    s = dataclasses.replace(s, target_len=common.longest_target(s, worst_lengths))
  return common.with_chunk(s, worst_lengths)


def sentinels(s) -> int:
  return spans.max_spans(s.chunk_len, modes(s))


def corrupt(tokens_l, rng, vocab, s) -> dict:
  return spans.span_corruption(tokens_l, rng, vocab, s.noise_density, s.mean_span_length)
