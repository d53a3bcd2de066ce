"""T5's span corruption, which the span objective and UL2's R and X denoisers share: how many
noise tokens and spans a chunk gets, where they go (`random_spans_noise_mask`), sentinels in the
inputs and the spans in the targets (`sentinel_corruption`)."""

import numpy as np

from transformer_jax.data.objectives import common
from transformer_jax.data.objectives.vocab import Vocab


def span_counts(length: int, density: float, mean: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of span corruption on `length` tokens (T5's rule)."""
  if length < 2:
    return 0, 0
  noise = min(max(int(round(length * density)), 1), length - 1)
  return noise, min(max(int(round(noise / mean)), 1), noise, length - noise)


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
  """Lengths (each >= 1) of a uniformly random split of num_items into num_segments."""
  first_l = np.zeros(num_items, dtype=bool)
  first_l[1 + rng.choice(num_items - 1, num_segments - 1, replace=False)] = True
  return np.bincount(np.cumsum(first_l), minlength=num_segments)


def random_spans_noise_mask(length: int, density: float, mean: float,
                            rng: np.random.Generator) -> np.ndarray:
  """T5's noise mask: bool [length], span_counts(...) spans, alternating kept/noise, kept first."""
  noise, spans = span_counts(length, density, mean)
  if not spans:
    return np.zeros(length, dtype=bool)
  noise_lengths = _random_segmentation(noise, spans, rng)
  kept_lengths = _random_segmentation(length - noise, spans, rng)
  lengths = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
  return np.repeat(np.arange(2 * spans) % 2 == 1, lengths)


def sentinel_corruption(tokens_l: np.ndarray, noise_l: np.ndarray,
                        vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets): the i-th noise span of the inputs becomes sentinel i; targets are
  sentinel i + span i for every span. Both end with eos, as T5's (seqio appends one to each
  feature after the corruption)."""
  tokens_l = np.asarray(tokens_l, dtype=np.int32)
  starts_l = noise_l & ~np.concatenate([[False], noise_l[:-1]])
  span_l = np.cumsum(starts_l) - 1
  sentinels = vocab.sentinel_ids[:int(starts_l.sum())]
  inputs = np.where(starts_l, vocab.sentinel_ids[np.maximum(span_l, 0)], tokens_l)
  inputs = np.append(inputs[~noise_l | starts_l], vocab.eos_id)
  targets = np.insert(tokens_l[noise_l], np.flatnonzero(starts_l[noise_l]), sentinels)
  return inputs.astype(np.int32), np.append(targets, vocab.eos_id).astype(np.int32)


def without_final_eos(tokens_l, vocab: Vocab) -> np.ndarray:
  """A chunk without the eos that ends its document (data.add_eos): the corruption appends its
  own, and T5's text holds none (a document's last chunk put `</s> </s>` in its targets)."""
  tokens_l = np.asarray(tokens_l, dtype=np.int32)
  return tokens_l[:-1] if len(tokens_l) and tokens_l[-1] == vocab.eos_id else tokens_l


def span_corruption(tokens_l: np.ndarray, rng: np.random.Generator, vocab: Vocab,
                    density: float, mean: float) -> dict:
  """T5's span corruption of one chunk (an encoder-decoder example)."""
  tokens_l = without_final_eos(tokens_l, vocab)
  noise_l = random_spans_noise_mask(len(tokens_l), density, mean, rng)
  return common.encoder_decoder(*sentinel_corruption(tokens_l, noise_l, vocab), vocab.start_id)


def worst_lengths(length: int, modes) -> tuple[int, int]:
  """The longest (encoder, decoder) sequences span corruption in any of `modes` ((density, mean
  span length) pairs) can make of a chunk of `length` tokens."""
  enc = dec = 0
  for density, mean in modes:
    noise, spans = span_counts(length, density, mean)
    enc, dec = max(enc, length - noise + spans + 1), max(dec, noise + spans + 1)
  return enc, dec


def max_spans(chunk_len: int, modes) -> int:
  """The most noise spans (sentinels) one chunk can need."""
  return max((span_counts(chunk_len, d, m)[1] for d, m in modes), default=0)


def check(d):
  """data.noise_density and data.mean_span_length (span, and UL2's R)."""
  common.fraction("noise_density", d.noise_density)
  if d.mean_span_length < 1:
    raise common.ConfigError(f"data.mean_span_length={d.mean_span_length} must be >= 1")
