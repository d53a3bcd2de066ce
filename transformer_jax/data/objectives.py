"""Pretraining objectives as deterministic, seeded numpy transforms (`data.objective`).

  clm      causal LM (GPT): applied to each packed row (`causal_lm`); the default.
  prefix_lm  a decoder's prefix LM: each chunk is split at a uniform point; the prefix is
           attended bidirectionally and not predicted, the rest causally (adds a `prefix` key).
  mlm      masked LM (BERT), encoder-only: each ordinary token is selected with probability
           data.mlm_rate; a selected token becomes [MASK] (80%), a random ordinary token (10%) or
           stays (10%). Specials (pad, bos, eos, control pieces) are never selected nor drawn.
           With data.sentence_pair (nsp or sop) each chunk (seq_len - 3 tokens) is cut at a
           random sentence end (the denoise rule below; else at a random token) into A and B and
           becomes [bos] A [eos] B [eos] (bos/eos as BERT's [CLS]/[SEP]) with token types 0 for
           [CLS] A [SEP] and 1 after, masked as above. sop (ALBERT): A and B swap places with
           probability 1/2 (label 1). nsp (BERT): with probability 1/2, B is replaced by the
           second part of the next chunk in the (shuffled) stream, cut to fit (label 1).
  span     T5 span corruption, encoder-decoder: round(len * data.noise_density) noise tokens in
           round(noise / data.mean_span_length) spans placed like T5's `random_spans_noise_mask`
           (the chunk starts with kept tokens, ends with noise); the i-th span becomes the sentinel
           <extra_id_i> in the inputs; targets = <extra_id_0> span_0 <extra_id_1> span_1 ... eos.
  denoise  BART, encoder-decoder: sentence permutation, then text infilling: spans with
           Poisson(data.poisson_lambda) lengths, 0 included (a 0-length span inserts a [MASK]),
           mask round(len * data.denoise_rate) tokens, each span one [MASK]; targets = the
           original chunk. Sentence rule: a sentence ends after a token whose piece contains a
           newline (so code is permuted line by line), or ends in ".", "!" or "?" when the next
           piece starts with a space; a leading bos and a trailing eos stay in place.
  seq2seq  sequence-to-sequence on (source, target) pairs (data.format tsv, jsonl_pairs or
           functions, or a TFDS catalog dataset): encoder inputs = [bos] source [eos], targets =
           target [eos] (bos/eos as data.add_bos/add_eos), each cut to seq_len / target_len (a
           cut target has no eos). No chunking and no randomness.
  ul2      UL2's mixture of denoisers, encoder-decoder: per chunk, with probabilities
           data.ul2_mix, R (span corruption with data.noise_density / data.mean_span_length), S
           (prefix LM: the target is a suffix of uniformly drawn length, inputs the prefix) or X
           (span corruption with data.ul2_x = (mean span length, noise density)); the mode token
           [R], [S] or [X] is prepended to the inputs and targets end with eos.

Every transform is a pure function of (token ids, a numpy Generator): the pipeline gives each
chunk a Generator seeded by (config.seed, split, data shard, chunk index) through grain's
`random_map`, so the same seed always makes the same examples. Mask, sentinels and mode tokens are
control pieces of the tokenizer (`python -m transformer_jax.tokenizer --special=...`, see
data/tokenizer.py): encoding text never produces them.

Packed rows (the train step reads these keys; int32 unless said, padding 0, segment ids count
the examples of a row from 1, positions restart at 0 in every example):
  clm, mlm  inputs, targets, weights (float32), segment_ids, positions: [seq_len]. For mlm the
            targets are the original tokens everywhere and weights are 1 only where selected.
            With sentence pairs also types, sentence_labels and sentence_weights (float32): the
            pair's label and weight 1 at its [CLS] position, 0 elsewhere.
  span, denoise, ul2
            encoder_inputs, encoder_segment_ids, encoder_positions: [seq_len];
            decoder_inputs, decoder_targets, decoder_weights (float32), decoder_segment_ids,
            decoder_positions: [target_len]. Example k of a row has segment id k in both the
            encoder and the decoder; decoder_inputs = [bos] + its targets[:-1] (bos is the
            decoder start id, restarting in every example); weights are 1 on every target token.

Lengths: documents are cut into chunks of `chunk_len` tokens, the longest such that the
examples of every chunk (tails included) fit seq_len / target_len in the worst case.
data.target_len = 0 picks: span, the longest decoder sequence of a chunk whose inputs fill seq_len
(T5's `random_spans_helper`); denoise, ul2 and seq2seq, seq_len.
"""

import dataclasses

import grain
import numpy as np

from transformer_jax.config import ConfigError

ENCODER_DECODER = ("span", "denoise", "ul2", "seq2seq")
UL2_MODES = ("R", "S", "X")
_PACKED = "inputs"  # The chunk feature (and clm's packed feature).
_ENCODER_KEYS = ("encoder_inputs",)
_DECODER_KEYS = ("decoder_inputs", "decoder_targets")
_PAIR_KEYS = ("types", "sentence_labels", "sentence_weights")  # mlm with sentence pairs
_MAX_CHUNK_FACTOR = 64  # chunk_len search stops at this many times seq_len.


# ------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Spec:
  """The objective and its resolved lengths (from config.data; see `spec`)."""
  objective: str
  seq_len: int
  target_len: int  # 0 for clm and mlm
  chunk_len: int
  mlm_rate: float = 0.15
  noise_density: float = 0.15
  mean_span_length: float = 3.0
  denoise_rate: float = 0.3
  poisson_lambda: float = 3.0
  sentence_permutation: bool = True
  ul2_mix: tuple = (0.5, 0.25, 0.25)
  ul2_x: tuple = (32.0, 0.5)
  sentence_pair: str = ""  # mlm: "", "nsp" or "sop"

  @property
  def span_modes(self) -> list[tuple[float, float]]:
    """(noise density, mean span length) of every span-corruption mode the objective uses."""
    if self.objective == "span":
      return [(self.noise_density, self.mean_span_length)]
    if self.objective == "ul2":
      return [(self.noise_density, self.mean_span_length), (self.ul2_x[1], self.ul2_x[0])]
    return []


def _check_params(d) -> None:
  """One-line ConfigErrors for out-of-range objective parameters."""
  def fraction(key, value):
    if not 0.0 < value < 1.0:
      raise ConfigError(f"data.{key}={value} must be in (0, 1)")
  if d.objective == "mlm":
    fraction("mlm_rate", d.mlm_rate)
  if d.objective in ("span", "ul2"):
    fraction("noise_density", d.noise_density)
    if d.mean_span_length < 1:
      raise ConfigError(f"data.mean_span_length={d.mean_span_length} must be >= 1")
  if d.objective == "denoise":
    fraction("denoise_rate", d.denoise_rate)
    if d.poisson_lambda <= 0:
      raise ConfigError(f"data.poisson_lambda={d.poisson_lambda} must be > 0")
  pair = d.get("sentence_pair", "")
  if pair not in ("", "nsp", "sop"):
    raise ConfigError(f"data.sentence_pair={pair!r} must be '', 'nsp' or 'sop'")
  if pair and d.objective != "mlm":
    raise ConfigError(f"data.sentence_pair={pair!r} is for data.objective='mlm', not "
                      f"{d.objective!r}")
  if pair and d.seq_len < 5:
    raise ConfigError(f"data.seq_len={d.seq_len} is too short for sentence pairs (>= 5)")
  if d.objective == "ul2":
    mix = tuple(d.ul2_mix)
    if len(mix) != 3 or min(mix) < 0 or not np.isclose(sum(mix), 1.0):
      raise ConfigError(f"data.ul2_mix={mix} must be 3 probabilities (R, S, X) summing to 1")
    if len(d.ul2_x) != 2 or d.ul2_x[0] < 1 or not 0 < d.ul2_x[1] < 1:
      raise ConfigError(f"data.ul2_x={tuple(d.ul2_x)} must be (mean span length >= 1, "
                        f"noise density in (0, 1))")


def spec(d) -> Spec:
  """The Spec of config.data `d`: checks the parameters and resolves target_len and chunk_len."""
  _check_params(d)
  s = Spec(d.objective, d.seq_len, d.target_len, d.seq_len, d.mlm_rate, d.noise_density,
           d.mean_span_length, d.denoise_rate, d.poisson_lambda, bool(d.sentence_permutation),
           tuple(d.ul2_mix), tuple(d.ul2_x), d.get("sentence_pair", ""))
  if s.sentence_pair:  # Room for [CLS] A [SEP] B [SEP].
    return dataclasses.replace(s, target_len=0, chunk_len=s.seq_len - 3)
  if s.objective not in ENCODER_DECODER:
    return dataclasses.replace(s, target_len=0)
  if not s.target_len:
    target = _longest_target(s) if s.objective == "span" else s.seq_len
    s = dataclasses.replace(s, target_len=target)
  if s.objective == "seq2seq":
    return s  # Pairs are cut, not chunked.
  chunk = _longest_chunk(s)
  if chunk < 1:
    raise ConfigError(f"data.target_len={s.target_len} is too short for data.objective="
                      f"{s.objective!r}")
  return dataclasses.replace(s, chunk_len=chunk)


def span_counts(length: int, density: float, mean: float) -> tuple[int, int]:
  """(noise tokens, noise spans) of span corruption on `length` tokens (T5's rule)."""
  if length < 2:
    return 0, 0
  noise = min(max(int(round(length * density)), 1), length - 1)
  return noise, min(max(int(round(noise / mean)), 1), noise, length - noise)


def _prefix_bounds(s: Spec, length: int) -> tuple[int, int]:
  """UL2's S: the [lo, hi] range of suffix (target) lengths of a chunk of `length` tokens."""
  lo = max(1, length - (s.seq_len - 1))  # The prefix and [S] fit seq_len ...
  hi = min(max(length - 1, 1), s.target_len - 1)  # ... the suffix and eos target_len.
  return lo, hi


def worst_lengths(s: Spec, length: int) -> tuple[int, int]:
  """The longest (encoder, decoder) sequences a chunk of `length` tokens can give."""
  if s.objective == "denoise":
    return length, length
  enc = dec = 0
  for density, mean in s.span_modes:
    noise, spans = span_counts(length, density, mean)
    enc, dec = max(enc, length - noise + spans), max(dec, noise + spans + 1)
  if s.objective == "ul2":
    lo, hi = _prefix_bounds(s, length)
    if lo > hi:
      return s.seq_len + 1, s.target_len + 1  # Does not fit.
    enc, dec = max(enc, length - lo) + 1, max(dec, hi + 1)
  return enc, dec


def _fits(s: Spec, length: int, target: bool = True) -> bool:
  enc, dec = worst_lengths(s, length)
  return enc <= s.seq_len and (not target or dec <= s.target_len)


def _longest_chunk(s: Spec, target: bool = True) -> int:
  length = 0
  while length < _MAX_CHUNK_FACTOR * s.seq_len and _fits(s, length + 1, target):
    length += 1
  return length


def _longest_target(s: Spec) -> int:
  return max(worst_lengths(s, n)[1] for n in range(1, _longest_chunk(s, target=False) + 1))


def max_spans(s: Spec) -> int:
  """The most noise spans (sentinels) one chunk can need."""
  return max((span_counts(s.chunk_len, d, m)[1] for d, m in s.span_modes), default=0)


def length_struct(s: Spec) -> dict:
  """The packed features and their lengths."""
  if s.objective == "clm":
    return {_PACKED: s.seq_len}
  if s.objective == "mlm":
    return {k: s.seq_len for k in ("inputs", "targets", "weights") + _PAIR_KEYS * bool(
        s.sentence_pair)}
  if s.objective == "prefix_lm":
    return {k: s.seq_len for k in ("inputs", "targets", "weights", "prefix")}
  return {**{k: s.seq_len for k in _ENCODER_KEYS}, **{k: s.target_len for k in _DECODER_KEYS}}


def seed_for(seed: int, split: str, shard: int = 0) -> int:
  """The random-map seed of one split's data shard."""
  words = [seed % 2**32, {"train": 1, "validation": 2}[split], shard]
  return int(np.random.SeedSequence(words).generate_state(1)[0])


# ---------------------------------------------------------------------------- vocabulary


def _piece_text(piece: str) -> str:
  """The text of a piece: "▁" is a space, "<0x0A>" the byte it names."""
  if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
    return chr(int(piece[3:5], 16))
  return piece.replace("\u2581", " ")


@dataclasses.dataclass(frozen=True, eq=False)
class Vocab:
  """What the transforms need to know about a tokenizer (plain numpy; pickles small)."""
  start_id: int  # decoder start: bos
  bos_id: int
  eos_id: int
  mask_id: int
  sentinel_ids: np.ndarray
  mode_ids: tuple
  normal: np.ndarray  # bool [vocab]: ordinary text pieces (maskable, random replacements)
  normal_ids: np.ndarray
  ends_line: np.ndarray  # bool [vocab]: the piece contains a newline
  ends_stop: np.ndarray  # bool [vocab]: the piece ends with . ! or ?
  starts_space: np.ndarray  # bool [vocab]: the piece starts with whitespace

  @classmethod
  def from_tokenizer(cls, tok) -> "Vocab":
    texts = [_piece_text(p) for p in tok.pieces()]
    normal = np.array([tok.is_normal(i) for i in range(tok.vocab_size)])
    flags = lambda f: normal & np.array([f(t) for t in texts], dtype=bool)
    return cls(start_id=tok.bos_id, bos_id=tok.bos_id, eos_id=tok.eos_id, mask_id=tok.mask_id,
               sentinel_ids=np.asarray(tok.sentinel_ids, np.int32), mode_ids=tuple(tok.mode_ids),
               normal=normal, normal_ids=np.flatnonzero(normal).astype(np.int32),
               ends_line=flags(lambda t: "\n" in t),
               ends_stop=flags(lambda t: t[-1:] in (".", "!", "?")),
               starts_space=flags(lambda t: t[:1].isspace()))


# ----------------------------------------------------------------------------- transforms


def causal_lm(row: dict) -> dict:
  """The causal-LM objective on one packed row: predict each next token of the same segment.

  Args:
    row: {"inputs", "inputs_segment_ids", "inputs_positions"}, each int32 [seq_len] (or a batch
      of rows, [rows, seq_len]: the same, row by row).

  Returns:
    {"inputs", "targets", "weights", "segment_ids", "positions"}: targets[t] = inputs[t + 1]
    (0 at the end), weights[t] = 1.0 iff segment_ids[t + 1] == segment_ids[t] != 0.
  """
  inputs = np.asarray(row[_PACKED], dtype=np.int32)
  segments = np.asarray(row[f"{_PACKED}_segment_ids"], dtype=np.int32)
  targets = np.zeros_like(inputs)
  targets[..., :-1] = inputs[..., 1:]
  weights = np.zeros(inputs.shape, dtype=np.float32)
  weights[..., :-1] = (segments[..., 1:] == segments[..., :-1]) & (segments[..., :-1] != 0)
  return {
      "inputs": inputs,
      "targets": targets,
      "weights": weights,
      "segment_ids": segments,
      "positions": np.asarray(row[f"{_PACKED}_positions"], dtype=np.int32),
  }


def decoder_prefix_lm(tokens_l: np.ndarray, rng: np.random.Generator) -> dict:
  """A decoder's prefix LM on one chunk: a uniformly random split point u in [1, len - 1];
  tokens before u form the prefix (attended bidirectionally, not predicted), the rest is
  predicted causally. {"inputs", "targets" (next token), "weights", "prefix" (1 in the prefix)}."""
  tokens_l = np.asarray(tokens_l, dtype=np.int32)
  n = len(tokens_l)
  u = int(rng.integers(1, n)) if n >= 2 else n
  targets_l = np.zeros_like(tokens_l)
  targets_l[:-1] = tokens_l[1:]
  t_l = np.arange(n)
  weights_l = ((t_l >= u - 1) & (t_l < n - 1)).astype(np.float32)  # predicts tokens u..n-1
  return {"inputs": tokens_l, "targets": targets_l, "weights": weights_l,
          "prefix": (t_l < u).astype(np.int32)}


def mlm(tokens_l: np.ndarray, rng: np.random.Generator, vocab: Vocab, rate: float) -> dict:
  """BERT's masking of one chunk: {"inputs", "targets" (= tokens), "weights" (1 = selected)}."""
  tokens_l = np.asarray(tokens_l, dtype=np.int32)
  selected_l = vocab.normal[tokens_l] & (rng.random(tokens_l.shape) < rate)
  action_l = rng.random(tokens_l.shape)  # < 0.8: [MASK]; < 0.9: a random token; else kept.
  inputs_l = np.where(selected_l & (action_l < 0.8), vocab.mask_id, tokens_l).astype(np.int32)
  random_l = selected_l & (action_l >= 0.8) & (action_l < 0.9)
  inputs_l[random_l] = rng.choice(vocab.normal_ids, size=int(random_l.sum()))
  return {"inputs": inputs_l, "targets": tokens_l, "weights": selected_l.astype(np.float32)}


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
  sentinel i + span i for every span, then eos."""
  tokens_l = np.asarray(tokens_l, dtype=np.int32)
  starts_l = noise_l & ~np.concatenate([[False], noise_l[:-1]])
  span_l = np.cumsum(starts_l) - 1
  sentinels = vocab.sentinel_ids[:int(starts_l.sum())]
  inputs = np.where(starts_l, vocab.sentinel_ids[np.maximum(span_l, 0)], tokens_l)
  inputs = inputs[~noise_l | starts_l]
  targets = np.insert(tokens_l[noise_l], np.flatnonzero(starts_l[noise_l]), sentinels)
  return inputs.astype(np.int32), np.append(targets, vocab.eos_id).astype(np.int32)


def encoder_decoder(inputs: np.ndarray, targets: np.ndarray, vocab: Vocab) -> dict:
  """One encoder-decoder example: decoder inputs are the targets shifted right after bos."""
  targets = np.asarray(targets, dtype=np.int32)
  return {"encoder_inputs": np.asarray(inputs, dtype=np.int32),
          "decoder_inputs": np.concatenate([[vocab.start_id], targets[:-1]]).astype(np.int32),
          "decoder_targets": targets}


def seq2seq(source_ids, target_ids, *, bos_id: int, eos_id: int, add_bos: bool, add_eos: bool,
            seq_len: int, target_len: int) -> dict:
  """One (source, target) pair of token ids as an encoder-decoder example (the module docstring);
  bos also starts the decoder."""
  inputs = ([bos_id] if add_bos else []) + list(source_ids) + ([eos_id] if add_eos else [])
  targets = (list(target_ids) + ([eos_id] if add_eos else []))[:target_len]
  return {"encoder_inputs": np.asarray(inputs[:seq_len], np.int32),
          "decoder_inputs": np.asarray([bos_id] + targets[:-1], np.int32),
          "decoder_targets": np.asarray(targets, np.int32)}


def span_corruption(tokens_l: np.ndarray, rng: np.random.Generator, vocab: Vocab,
                    density: float, mean: float) -> dict:
  """T5's span corruption of one chunk (an encoder-decoder example)."""
  noise_l = random_spans_noise_mask(len(tokens_l), density, mean, rng)
  return encoder_decoder(*sentinel_corruption(tokens_l, noise_l, vocab), vocab)


def _body(tokens_l: np.ndarray, vocab: Vocab) -> tuple[int, int]:
  """[head, tail): the chunk without a leading bos and a trailing eos."""
  head = int(len(tokens_l) > 0 and tokens_l[0] == vocab.bos_id)
  return head, len(tokens_l) - int(len(tokens_l) > head and tokens_l[-1] == vocab.eos_id)


def _sentence_starts(body_l: np.ndarray, vocab: Vocab) -> np.ndarray:
  """Indices (> 0) where a new sentence of `body_l` starts (the rule: the module docstring)."""
  ends_l = vocab.ends_line[body_l]
  ends_l[:-1] |= vocab.ends_stop[body_l[:-1]] & vocab.starts_space[body_l[1:]]
  return np.flatnonzero(ends_l[:-1]) + 1


def permute_sentences(tokens_l: np.ndarray, rng: np.random.Generator,
                      vocab: Vocab) -> np.ndarray:
  """The chunk with its sentences in random order (the rule: the module docstring)."""
  tokens_l = np.asarray(tokens_l, dtype=np.int32)
  head, tail = _body(tokens_l, vocab)
  body_l = tokens_l[head:tail]
  sentences = np.split(body_l, _sentence_starts(body_l, vocab))
  order = rng.permutation(len(sentences))
  return np.concatenate([tokens_l[:head]] + [sentences[i] for i in order] + [tokens_l[tail:]])


def split_sentences(tokens_l: np.ndarray, rng: np.random.Generator,
                    vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
  """(A, B): the chunk's body cut at a random sentence start (else a random token)."""
  tokens_l = np.asarray(tokens_l, dtype=np.int32)
  body_l = tokens_l[slice(*_body(tokens_l, vocab))]
  starts = _sentence_starts(body_l, vocab)
  if len(starts):
    cut = int(rng.choice(starts))
  else:
    cut = int(rng.integers(1, len(body_l))) if len(body_l) >= 2 else len(body_l)
  return body_l[:cut], body_l[cut:]


def sentence_pair(tokens_l: np.ndarray, next_l: np.ndarray | None, rng: np.random.Generator,
                  vocab: Vocab, s: Spec) -> dict:
  """One mlm example with a sentence pair (the module docstring); `next_l`: the next chunk in
  the stream (nsp's random B), None for the last one."""
  a_l, b_l = split_sentences(tokens_l, rng, vocab)
  label = int(rng.random() < 0.5)
  if label and s.sentence_pair == "sop":
    a_l, b_l = b_l, a_l
  elif label and next_l is not None and len(next_l) > 1:
    other_l = split_sentences(next_l, rng, vocab)[1]
    b_l = other_l[:s.chunk_len - len(a_l)]
  else:
    label = 0  # nsp without a next chunk: keep the true B.
  cls, sep = [vocab.bos_id], [vocab.eos_id]
  tokens_l = np.concatenate([cls, a_l, sep, b_l, sep]).astype(np.int32)
  example = mlm(tokens_l, rng, vocab, s.mlm_rate)
  example["types"] = (np.arange(len(tokens_l)) > len(a_l) + 1).astype(np.int32)
  example["sentence_labels"] = np.zeros(len(tokens_l), np.int32)
  example["sentence_labels"][0] = label
  example["sentence_weights"] = (np.arange(len(tokens_l)) == 0).astype(np.float32)
  return example


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
  corrupted_l = permute_sentences(tokens_l, rng, vocab) if permute else tokens_l
  return encoder_decoder(text_infilling(corrupted_l, rng, vocab.mask_id, rate, lam), tokens_l,
                         vocab)


def prefix_lm(tokens_l: np.ndarray, rng: np.random.Generator, vocab: Vocab, lo: int,
              hi: int) -> dict:
  """Inputs a prefix, targets the rest + eos; the suffix length is uniform in [lo, hi]."""
  tokens_l = np.asarray(tokens_l, dtype=np.int32)
  split = len(tokens_l) - int(rng.integers(lo, hi + 1))
  return encoder_decoder(tokens_l[:split], np.append(tokens_l[split:], vocab.eos_id), vocab)


def ul2(tokens_l: np.ndarray, rng: np.random.Generator, vocab: Vocab, s: Spec) -> dict:
  """UL2: one of R, S, X (probabilities s.ul2_mix), its mode token prepended to the inputs."""
  mode = int(rng.choice(len(UL2_MODES), p=np.asarray(s.ul2_mix) / sum(s.ul2_mix)))
  if UL2_MODES[mode] == "S":
    example = prefix_lm(tokens_l, rng, vocab, *_prefix_bounds(s, len(tokens_l)))
  else:
    density, mean = s.span_modes[mode // 2]
    example = span_corruption(tokens_l, rng, vocab, density, mean)
  example["encoder_inputs"] = np.concatenate(
      [[vocab.mode_ids[mode]], example["encoder_inputs"]]).astype(np.int32)
  return example


def corrupt(tokens_l: np.ndarray, rng: np.random.Generator, vocab: Vocab, s: Spec) -> dict:
  """The objective `s.objective` (not clm) applied to one chunk."""
  if s.objective == "mlm":
    return mlm(tokens_l, rng, vocab, s.mlm_rate)
  if s.objective == "prefix_lm":
    return decoder_prefix_lm(tokens_l, rng)
  if s.objective == "span":
    return span_corruption(tokens_l, rng, vocab, s.noise_density, s.mean_span_length)
  if s.objective == "denoise":
    return denoise(tokens_l, rng, vocab, s.denoise_rate, s.poisson_lambda,
                   s.sentence_permutation)
  if s.objective == "ul2":
    return ul2(tokens_l, rng, vocab, s)
  raise ValueError(f"no per-chunk transform for objective {s.objective!r}")


class SentencePairs(grain.transforms.RandomMap):
  """[chunk, next chunk] (or [last chunk]) -> [its sentence-pair example, the next's]: each
  chunk's nsp partner is the other."""

  def __init__(self, s: Spec, vocab: Vocab):
    self._spec, self._vocab = s, vocab

  def random_map(self, elements, rng: np.random.Generator):
    chunks = [e[_PACKED] for e in elements]
    partners = chunks[1:] + chunks[:1] if len(chunks) > 1 else [None]
    return [sentence_pair(c, p, rng, self._vocab, self._spec) for c, p in zip(chunks, partners)]


class Corrupt(grain.transforms.RandomMap):
  """{"inputs": chunk} -> the objective's example (`corrupt`), with grain's seeded Generator."""

  def __init__(self, s: Spec, vocab: Vocab):
    self._spec, self._vocab = s, vocab

  def random_map(self, element, rng: np.random.Generator):
    return corrupt(element[_PACKED], rng, self._vocab, self._spec)


# -------------------------------------------------------------------------------- packed rows


def from_packed(s: Spec, row: dict) -> dict:
  """A packed row (grain's `{key}`, `{key}_segment_ids`, `{key}_positions`), or a batch of them
  (each [rows, length]), in the batch format of the objective (the module docstring)."""
  if s.objective == "clm":
    return causal_lm(row)
  int32 = lambda key: np.asarray(row[key], dtype=np.int32)
  if s.objective in ("mlm", "prefix_lm"):
    out = {"inputs": int32("inputs"), "targets": int32("targets"),
           "weights": np.asarray(row["weights"], dtype=np.float32),
           "segment_ids": int32("inputs_segment_ids"), "positions": int32("inputs_positions")}
    if s.objective == "prefix_lm":
      out["prefix"] = int32("prefix")
    if s.sentence_pair:
      out.update(types=int32("types"), sentence_labels=int32("sentence_labels"),
                 sentence_weights=np.asarray(row["sentence_weights"], dtype=np.float32))
    return out
  decoder_segments = int32("decoder_targets_segment_ids")
  return {"encoder_inputs": int32("encoder_inputs"),
          "encoder_segment_ids": int32("encoder_inputs_segment_ids"),
          "encoder_positions": int32("encoder_inputs_positions"),
          "decoder_inputs": int32("decoder_inputs"), "decoder_targets": int32("decoder_targets"),
          "decoder_weights": (decoder_segments != 0).astype(np.float32),
          "decoder_segment_ids": decoder_segments,
          "decoder_positions": int32("decoder_targets_positions")}


def empty_row(s: Spec) -> dict:
  """An all-padding row in the objective's format (weight 0 everywhere)."""
  row = {}
  for key, length in length_struct(s).items():
    row[key] = row[f"{key}_segment_ids"] = row[f"{key}_positions"] = np.zeros(length, np.int32)
  return from_packed(s, row)
