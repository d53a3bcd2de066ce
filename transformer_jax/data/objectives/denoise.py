"""denoise: BART (Lewis et al. 2020, section 2.2), encoder-decoder. In order, each optional:
sentence permutation (vocab.py's rule; data.sentence_permutation), document rotation (the chunk
rotated to begin at a uniformly chosen token; data.document_rotation), then one noising of
round(len * data.denoise_rate) tokens (data.denoise_noise): `infill` (text infilling, BART's
default: spans with Poisson(data.poisson_lambda) lengths, 0 included (a 0-length span inserts a
[MASK]), each span one [MASK]), `mask` (token masking: that many random tokens become [MASK], as
BERT) or `delete` (token deletion: that many random tokens removed, so the model must find
where). A document's bos and eos (on its first and last chunk) are left in place, as fairseq
does. The targets are the original chunk; data.target_len = 0 means seq_len."""

import dataclasses

import numpy as np

from transformer_jax.data.objectives import common
from transformer_jax.data.objectives import vocab as vocab_lib
from transformer_jax.data.objectives.vocab import Vocab

NAME = "denoise"
FAMILIES = ("encdec",)
# Evaluation's frame: as a chunk's targets are the whole chunk, the decoder is given the
# context (its source, framing included, the source's rebuilt text) before a continuation is
# scored or generated; with infilling the source ends with one [MASK] (a span of any length
# was taken from there).
REBUILDS_SOURCE = True


def source_tail(d, tok) -> list:
  """What an evaluation source ends with: [MASK] after infilling (the continuation is missing
  text); nothing after token masking (a [MASK] stood for one token) or deletion."""
  return [tok.mask_id] if d.denoise_noise == "infill" and tok.mask_id >= 0 else []


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
  return ["[MASK]"] if tok.mask_id < 0 and s.denoise_noise != "delete" else []


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


def token_masking(tokens_l: np.ndarray, rng: np.random.Generator, mask_id: int,
                  rate: float) -> np.ndarray:
  """round(len * rate) tokens, chosen uniformly without replacement, replaced by [MASK]."""
  out = np.array(tokens_l, dtype=np.int32)
  out[rng.choice(len(out), size=int(round(len(out) * rate)), replace=False)] = mask_id
  return out


def token_deletion(tokens_l: np.ndarray, rng: np.random.Generator, rate: float) -> np.ndarray:
  """The chunk without round(len * rate) tokens chosen uniformly without replacement."""
  n = len(tokens_l)
  gone = rng.choice(n, size=int(round(n * rate)), replace=False)
  return np.delete(np.asarray(tokens_l, dtype=np.int32), gone)


def document_rotation(tokens_l: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """The chunk rotated to begin with a token chosen uniformly at random."""
  return np.roll(np.asarray(tokens_l, dtype=np.int32), -int(rng.integers(len(tokens_l))))


def denoise(tokens_l: np.ndarray, rng: np.random.Generator, vocab: Vocab, rate: float,
            lam: float, permute: bool = True, noise: str = "infill",
            rotate: bool = False) -> dict:
  """BART's noising (the module docstring) of the chunk's body: a document's bos and eos stay
  where they are, never masked, deleted or rotated (fairseq's word_starts and rolling noise);
  the targets are the original chunk."""
  permuted_l = vocab_lib.permute_sentences(tokens_l, rng, vocab) if permute else tokens_l
  permuted_l = np.asarray(permuted_l, dtype=np.int32)
  head, tail = vocab_lib.body(permuted_l, vocab)
  body_l = permuted_l[head:tail]
  if len(body_l):
    if rotate:
      body_l = document_rotation(body_l, rng)
    if noise == "mask":
      body_l = token_masking(body_l, rng, vocab.mask_id, rate)
    elif noise == "delete":
      body_l = token_deletion(body_l, rng, rate)
    else:
      body_l = text_infilling(body_l, rng, vocab.mask_id, rate, lam)
  corrupted_l = np.concatenate([permuted_l[:head], body_l, permuted_l[tail:]]).astype(np.int32)
  return common.encoder_decoder(corrupted_l, tokens_l, vocab.start_id)


def corrupt(tokens_l, rng, vocab: Vocab, s: common.Spec) -> dict:
  return denoise(tokens_l, rng, vocab, s.denoise_rate, s.poisson_lambda, s.sentence_permutation,
                 s.denoise_noise, s.document_rotation)
