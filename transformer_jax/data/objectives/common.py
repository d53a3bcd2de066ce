"""What every objective module shares: the resolved settings (`Spec`), how its loss is made of the
model's outputs (`Loss`), the length searches, and the row formats of the two model shapes
(decoder-only / encoder-only rows, and encoder-decoder rows)."""

import dataclasses

import grain
import numpy as np

from transformer_jax.config import ConfigError

_MAX_CHUNK_FACTOR = 64  # chunk_len search stops at this many times seq_len.
CHUNK = "inputs"  # The chunk feature (and clm's packed feature).
DOCUMENT = "document"  # A chunk's document, where the objective asks (objectives.document_ids)
# The span corruption's changes before positions recorded a rows version (objectives.rows_changed)
SPAN_ROWS_CHANGED = ("e13c3d6 and 9e75a62 (2026-12-05 14:00 and 15:44 UTC: every encoder input "
                     "ends with eos, and a document's eos is left out of the corruption)")


@dataclasses.dataclass(frozen=True)
class Spec:
  """The objective and its resolved lengths (from config.data; see objectives.spec)."""
  objective: str
  seq_len: int
  target_len: int  # 0 for the decoder-only and encoder-only objectives
  chunk_len: int
  mlm_rate: float
  noise_density: float
  mean_span_length: float
  denoise_rate: float
  poisson_lambda: float
  sentence_permutation: bool
  ul2_mix: tuple
  ul2_x: tuple
  sentence_pair: str  # mlm: "", "nsp" or "sop"
  denoise_noise: str  # denoise: infill | mask | delete (BART's noising of the tokens)
  document_rotation: bool  # denoise: rotate each chunk to start at a random token

  @classmethod
  def from_data(cls, d) -> "Spec":
    return cls(d.objective, d.seq_len, d.target_len, d.seq_len, d.mlm_rate, d.noise_density,
               d.mean_span_length, d.denoise_rate, d.poisson_lambda, bool(d.sentence_permutation),
               tuple(d.ul2_mix), tuple(d.ul2_x), d.sentence_pair, d.denoise_noise,
               bool(d.document_rotation))


@dataclasses.dataclass(frozen=True)
class Loss:
  """How the train step feeds a batch to the model and what it adds to the token loss:
  `inputs` maps batch keys to the model's keyword arguments (a prefix LM's `prefix`, BERT's token
  types); `sentence` adds the sentence-pair head's loss (NSP / SOP)."""
  inputs: tuple = ()  # ((batch key, model keyword), ...)
  sentence: bool = False


class Corrupt(grain.transforms.RandomMap):
  """{"inputs": chunk} -> `corrupt(chunk, rng, vocab, spec)` (an objective's example), with
  grain's seeded Generator."""

  def __init__(self, corrupt, s: Spec, vocab):
    self._corrupt, self._spec, self._vocab = corrupt, s, vocab

  def random_map(self, element, rng: np.random.Generator):
    return self._corrupt(element[CHUNK], rng, self._vocab, self._spec)


def fraction(key: str, value: float):
  if not 0.0 < value < 1.0:
    raise ConfigError(f"data.{key}={value} must be in (0, 1)")


def longest_chunk(s: Spec, worst, target: bool = True) -> int:
  """The longest chunk whose worst-case example (`worst(s, length)` -> (encoder, decoder)
  lengths) fits seq_len (and target_len when `target`)."""
  def fits(length):
    enc, dec = worst(s, length)
    return enc <= s.seq_len and (not target or dec <= s.target_len)
  length = 0
  while length < _MAX_CHUNK_FACTOR * s.seq_len and fits(length + 1):
    length += 1
  return length


def with_chunk(s: Spec, worst) -> Spec:
  """`s` with chunk_len = longest_chunk; a target_len too short for one token is an error."""
  chunk = longest_chunk(s, worst)
  if chunk < 1:
    raise ConfigError(f"data.target_len={s.target_len} is too short for data.objective="
                      f"{s.objective!r}")
  return dataclasses.replace(s, chunk_len=chunk)


def longest_target(s: Spec, worst) -> int:
  """The longest decoder sequence of a chunk whose inputs fill seq_len (T5's
  random_spans_helper)."""
  return max(worst(s, n)[1] for n in range(1, longest_chunk(s, worst, target=False) + 1))


# ------------------------------------------------------------------------------ row formats
# A packed row is grain's `{key}`, `{key}_segment_ids`, `{key}_positions` per packed feature, or a
# batch of rows (each [rows, length]); the objective turns it into its batch format.

def decoder_lengths(s: Spec, keys) -> dict:
  return {k: s.seq_len for k in keys}


def decoder_row(row: dict, ints=(), floats=()) -> dict:
  """inputs, targets, weights, segment_ids, positions (+ `ints`, `floats`) of a packed row whose
  objective made its targets and weights per chunk (mlm, prefix_lm)."""
  int32 = lambda key: np.asarray(row[key], dtype=np.int32)
  out = {"inputs": int32("inputs"), "targets": int32("targets"),
         "weights": np.asarray(row["weights"], dtype=np.float32),
         "segment_ids": int32("inputs_segment_ids"), "positions": int32("inputs_positions")}
  out.update({k: int32(k) for k in ints})
  out.update({k: np.asarray(row[k], dtype=np.float32) for k in floats})
  return out


def encdec_lengths(s: Spec) -> dict:
  return {"encoder_inputs": s.seq_len, "decoder_inputs": s.target_len,
          "decoder_targets": s.target_len}


def encdec_row(row: dict) -> dict:
  """Encoder [seq_len] and decoder [target_len] features; weights 1 on every target token."""
  int32 = lambda key: np.asarray(row[key], dtype=np.int32)
  decoder_segments = int32("decoder_targets_segment_ids")
  return {"encoder_inputs": int32("encoder_inputs"),
          "encoder_segment_ids": int32("encoder_inputs_segment_ids"),
          "encoder_positions": int32("encoder_inputs_positions"),
          "decoder_inputs": int32("decoder_inputs"), "decoder_targets": int32("decoder_targets"),
          "decoder_weights": (decoder_segments != 0).astype(np.float32),
          "decoder_segment_ids": decoder_segments,
          "decoder_positions": int32("decoder_targets_positions")}


def encoder_decoder(inputs: np.ndarray, targets: np.ndarray, start_id: int) -> dict:
  """One encoder-decoder example: decoder inputs are the targets shifted right after bos."""
  targets = np.asarray(targets, dtype=np.int32)
  return {"encoder_inputs": np.asarray(inputs, dtype=np.int32),
          "decoder_inputs": np.concatenate([[start_id], targets[:-1]]).astype(np.int32),
          "decoder_targets": targets}
