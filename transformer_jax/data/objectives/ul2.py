"""ul2: UL2's mixture of denoisers, encoder-decoder. Per chunk, with probabilities data.ul2_mix,
R (span corruption with data.noise_density / data.mean_span_length), S (prefix LM: the target is a
suffix of uniformly drawn length, inputs the prefix) or X (span corruption with data.ul2_x =
(mean span length, noise density)); the mode token [R], [S] or [X] is prepended to the inputs;
inputs and targets end with eos (as T5's). data.target_len = 0 means seq_len."""

import dataclasses

import numpy as np

from transformer_jax.data.objectives import common
from transformer_jax.data.objectives import spans
from transformer_jax.data.objectives.vocab import Vocab

NAME = "ul2"
FAMILIES = ("encdec",)
UL2_MODES = ("R", "S", "X")
SOURCE_EOS = True  # Every encoder input ends with eos.


def check(d):
  spans.check(d)
  mix = tuple(d.ul2_mix)
  numbers = all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in mix)
  if len(mix) != 3 or not numbers or min(mix) < 0 or not np.isclose(sum(mix), 1.0):
    raise common.ConfigError(f"data.ul2_mix={mix} must be 3 probabilities (R, S, X) summing to 1")
  if len(d.ul2_x) != 2 or d.ul2_x[0] < 1 or not 0 < d.ul2_x[1] < 1:
    raise common.ConfigError(f"data.ul2_x={tuple(d.ul2_x)} must be (mean span length >= 1, "
                             f"noise density in (0, 1))")


def rows_changed(d) -> str:
  del d
  return common.SPAN_ROWS_CHANGED


def modes(s) -> list:
  """(noise density, mean span length) of R and X."""
  return [(s.noise_density, s.mean_span_length), (s.ul2_x[1], s.ul2_x[0])]


def _prefix_bounds(s: common.Spec, length: int) -> tuple[int, int]:
  """UL2's S: the [lo, hi] range of suffix (target) lengths of a chunk of `length` tokens."""
  lo = max(1, length - (s.seq_len - 2))  # The prefix, [S] and eos fit seq_len ...
  hi = min(max(length - 1, 1), s.target_len - 1)  # ... the suffix and eos target_len.
  return lo, hi


def worst_lengths(s, length: int) -> tuple[int, int]:
  """The longest (encoder, decoder) sequences a chunk of `length` tokens can give."""
  enc, dec = spans.worst_lengths(length, modes(s))
  lo, hi = _prefix_bounds(s, length)
  if lo > hi:
    return s.seq_len + 1, s.target_len + 1  # Does not fit.
  return max(enc, length - lo + 1) + 1, max(dec, hi + 1)


def resolve(s: common.Spec) -> common.Spec:
  s = dataclasses.replace(s, target_len=s.target_len or s.seq_len)
  return common.with_chunk(s, worst_lengths)


def sentinels(s) -> int:
  return spans.max_spans(s.chunk_len, modes(s))


def missing_tokens(s, tok) -> list:
  del s
  return ["the mode tokens [R] [S] [X]"] if min(tok.mode_ids) < 0 else []


def source_head(tok) -> list[int]:
  """What a source starts with outside training (scoring, generation, inspect): training put a
  mode token before every encoder input, and a context -> continuation request is the S (prefix
  LM) denoiser's task."""
  return [tok.mode_ids[UL2_MODES.index("S")]]


def prefix_lm(tokens_l: np.ndarray, rng: np.random.Generator, vocab: Vocab, lo: int,
              hi: int) -> dict:
  """Inputs the prefix + eos, targets the rest + eos; the suffix length is uniform in
  [lo, hi]."""
  tokens_l = np.asarray(tokens_l, dtype=np.int32)
  split = len(tokens_l) - int(rng.integers(lo, hi + 1))
  return common.encoder_decoder(np.append(tokens_l[:split], vocab.eos_id),
                                np.append(tokens_l[split:], vocab.eos_id), vocab.start_id)


def ul2(tokens_l: np.ndarray, rng: np.random.Generator, vocab: Vocab, s: common.Spec) -> dict:
  """UL2: one of R, S, X (probabilities s.ul2_mix), its mode token prepended to the inputs."""
  tokens_l = spans.without_final_eos(tokens_l, vocab)  # each denoiser appends its own
  mode = int(rng.choice(len(UL2_MODES), p=np.asarray(s.ul2_mix) / sum(s.ul2_mix)))
  if UL2_MODES[mode] == "S":
    example = prefix_lm(tokens_l, rng, vocab, *_prefix_bounds(s, len(tokens_l)))
  else:
    density, mean = modes(s)[mode // 2]
    example = spans.span_corruption(tokens_l, rng, vocab, density, mean)
  example["encoder_inputs"] = np.concatenate(
      [[vocab.mode_ids[mode]], example["encoder_inputs"]]).astype(np.int32)
  return example


corrupt = ul2
