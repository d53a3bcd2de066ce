"""denoise: BART, encoder-decoder. Sentence permutation (vocab.py's rule), then text infilling:
spans with Poisson(data.poisson_lambda) lengths, 0 included (a 0-length span inserts a [MASK]),
mask round(len * data.denoise_rate) tokens, each span one [MASK]; targets = the original chunk.
data.target_len = 0 means seq_len."""

import dataclasses

import numpy as np

from transformer_jax.data.objectives import common
from transformer_jax.data.objectives import vocab as vocab_lib
from transformer_jax.data.objectives.vocab import Vocab

NAME = "denoise"
FAMILIES = ("encdec",)


def check(d):
  common.fraction("denoise_rate", d.denoise_rate)
  if d.poisson_lambda <= 0:
    raise common.ConfigError(f"data.poisson_lambda={d.poisson_lambda} must be > 0")


def worst_lengths(s, length: int) -> tuple[int, int]:
  del s
  return length, length


def resolve(s: common.Spec) -> common.Spec:
  s = dataclasses.replace(s, target_len=s.target_len or s.seq_len)
  return common.with_chunk(s, worst_lengths)


def missing_tokens(s, tok) -> list:
  del s
  return ["[MASK]"] if tok.mask_id < 0 else []


def poisson_span_lengths(num_masked: int, lam: float, rng: np.random.Generator) -> np.ndarray:
  """Poisson(lam) span lengths summing to num_masked (the last one cut), in random order, with
  at most num_masked spans (surplus 0-length ones dropped, so masking never lengthens a chunk)."""
  lengths, total = [], 0
  while total < num_masked:
    lengths.append(min(int(rng.poisson(lam)), num_masked - total))
    total += lengths[-1]
  lengths = np.asarray(lengths, dtype=np.int64)
  surplus = len(lengths) - num_masked
  if surplus > 0:
    lengths = np.delete(lengths, np.flatnonzero(lengths == 0)[:surplus])
  return rng.permutation(lengths)


def text_infilling(tokens_l: np.ndarray, rng: np.random.Generator, mask_id: int, rate: float,
                   lam: float) -> np.ndarray:
  """BART's text infilling: round(len * rate) tokens in Poisson-length spans, one [MASK] each
  (0-length spans insert one); spans are placed uniformly at random, never adjacent."""
  tokens_l = np.asarray(tokens_l, dtype=np.int32)
  n = len(tokens_l)
  lengths = poisson_span_lengths(int(round(n * rate)), lam, rng)
  kept = n - int(lengths.sum())
  while len(lengths) > 1 and kept < len(lengths) - 1:  # Too little room between spans: merge.
    lengths = np.append(lengths[:-2], lengths[-2] + lengths[-1])
  k = len(lengths)
  if not k:
    return tokens_l.copy()
  free = kept - (k - 1)  # Kept tokens beyond the one between every two spans ...
  cuts = np.sort(rng.choice(free + k, size=k, replace=False))  # ... cut into k + 1 gaps.
  gaps = np.diff(np.concatenate([[-1], cuts, [free + k]])) - 1
  gaps[1:-1] += 1
  parts, start = [], 0
  for gap, length in zip(gaps, lengths):
    parts += [tokens_l[start:start + gap], [mask_id]]
    start += gap + length
  return np.concatenate(parts + [tokens_l[start:]]).astype(np.int32)


def denoise(tokens_l: np.ndarray, rng: np.random.Generator, vocab: Vocab, rate: float,
            lam: float, permute: bool = True) -> dict:
  """BART: sentence permutation, text infilling; the targets are the original chunk."""
  corrupted_l = vocab_lib.permute_sentences(tokens_l, rng, vocab) if permute else tokens_l
  return common.encoder_decoder(text_infilling(corrupted_l, rng, vocab.mask_id, rate, lam),
                                tokens_l, vocab.start_id)


def corrupt(tokens_l, rng, vocab: Vocab, s: common.Spec) -> dict:
  return denoise(tokens_l, rng, vocab, s.denoise_rate, s.poisson_lambda, s.sentence_permutation)
