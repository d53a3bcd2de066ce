"""Pretraining objectives (`data.objective`), one module each, registered in OBJECTIVES below:

  clm        causal LM (GPT), the default; decoder
  prefix_lm  a decoder's prefix LM (bidirectional prefix, causal rest)
  mlm        BERT's masked LM, optionally with NSP / SOP sentence pairs; encoder
  span       T5's span corruption; encoder-decoder
  denoise    BART's sentence permutation + text infilling; encoder-decoder
  ul2        UL2's mixture of R, S and X denoisers; encoder-decoder
  seq2seq    (source, target) pairs; encoder-decoder

An objective module declares NAME and FAMILIES (the model families it trains) and `resolve(spec)`
(its lengths), and where it differs from the defaults: `check(data)` (its parameters' one-line
errors), `corrupt(chunk, rng, vocab, spec)` (its seeded per-chunk transform) or `examples(...)` (a
transform over the chunk stream), `missing_tokens(spec, tokenizer)` and `sentinels(spec)` (the
control pieces it needs), `length_struct(spec)` and `from_packed(spec, row)` (its packed features
and batch format; default: the encoder-decoder one), `loss(spec)` (what the train step adds to the
model call and to the token loss), `rows_changed(data)` (the changes to its rows from before data
positions recorded a version: pipeline.rows_warning) and ROWS_CHANGES ({pipeline.ROWS_VERSION:
what changed its rows at that version}), and the flags PAIRS (reads pairs, not
documents), CONTROL_PIECES, CONCAT (data.packing=concat can make its rows), SENTENCE_PAIRS and
SPLASH (why Pallas splash attention cannot serve it). Pipeline, train step, sampler, tokenizer
command and benchmark ask this package; none of them compares objective names.

Every transform is a pure function of (token ids, a numpy Generator): the pipeline gives each
chunk a Generator seeded by (config.seed, split, data shard, chunk index) through grain's
`random_map`, so the same seed always makes the same examples. Mask, sentinels and mode tokens are
control pieces of the tokenizer (`python -m transformer_jax.tokenizer --special=...`, see
data/tokenization.py): encoding text never produces them.

Packed rows (the train step reads these keys; int32 unless said, padding 0, segment ids count
the examples of a row from 1, positions restart at 0 in every example): decoder and encoder
objectives give inputs, targets, weights (float32), segment_ids, positions [seq_len] (+ their own
keys: prefix_lm's prefix, mlm's sentence-pair keys); encoder-decoder ones encoder_inputs,
encoder_segment_ids, encoder_positions [seq_len] and decoder_inputs, decoder_targets,
decoder_weights (float32), decoder_segment_ids, decoder_positions [target_len]. Example k of a row
has segment id k in both the encoder and the decoder; decoder_inputs = [bos] + its targets[:-1].

Lengths: documents are cut into chunks of `chunk_len` tokens, the longest such that the examples
of every chunk (tails included) fit seq_len / target_len in the worst case.
"""

import numpy as np

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.data.objectives import clm, denoise, mlm, prefix_lm, seq2seq, span, ul2
from transformer_jax.data.objectives import common
from transformer_jax.data.objectives.common import Loss, Spec
from transformer_jax.data.objectives.vocab import Vocab, decoder_start

OBJECTIVES = {m.NAME: m for m in (clm, prefix_lm, mlm, span, denoise, ul2, seq2seq)}
SENTENCE_PAIR_KINDS = ("", "nsp", "sop")
MIN_SENTINELS = 100  # a tokenizer made for these objectives has at least this many sentinels

__all__ = ["OBJECTIVES", "Loss", "Spec", "Vocab", "decoder_start"]


def get(name: str):
  """The objective module called `name`."""
  if name not in OBJECTIVES:
    raise ConfigError(f"data.objective={name!r} is not one of {', '.join(OBJECTIVES)}")
  return OBJECTIVES[name]


def rows_changed(d, saved: int | None = None) -> str:
  """The changes to config.data `d`'s rows since a data position of rows version `saved` was
  written (None: one from before positions recorded a version: those made before then too),
  when and what they changed, or "": its module's `rows_changed(d)` and ROWS_CHANGES."""
  module = get(d.objective)
  before = [getattr(module, "rows_changed", lambda d: "")(d)] if saved is None else []
  later = [what for version, what in sorted(getattr(module, "ROWS_CHANGES", {}).items())
           if version > (saved or 1)]
  return "; ".join(filter(None, before + later))


def for_family(family: str) -> list[str]:
  """The objectives that train a model family, the default first."""
  return [n for n, m in OBJECTIVES.items() if family in m.FAMILIES]


def check(config, sequence: int | None = None) -> Spec:
  """Every check of data.objective against the rest of the config (its model family, attention
  kernel, sequence axis (`sequence`: the mesh's, else read from mesh.*) and sentence head) and
  of its parameters; returns its Spec."""
  d, m = config.data, config.model
  sequence = config_lib.sequence_size(config.mesh) if sequence is None else sequence
  obj = get(d.objective)
  if m.family not in obj.FAMILIES:
    raise ConfigError(f"data.objective={d.objective!r} does not train model.family={m.family!r}; "
                      f"use one of {', '.join(for_family(m.family))}")
  if m.attention_impl == "splash" and getattr(obj, "SPLASH", None):
    raise ConfigError(f"model.attention_impl=splash cannot serve data.objective={obj.NAME} "
                      f"({obj.SPLASH}); use auto, xla or dot_product")
  if sequence > 1 and getattr(obj, "SPLASH", None):  # ring attention: segments too
    raise ConfigError(f"a sequence axis of {sequence} (ring attention) cannot serve "
                      f"data.objective={obj.NAME} ({obj.SPLASH}); use mesh.sequence=1")
  resolved = spec(d)
  if m.family == "encdec" and m.position == "learned" and resolved.target_len > m.max_len:
    raise ConfigError(f"model.max_len={m.max_len} is shorter than the decoder's "
                      f"{resolved.target_len} tokens (data.target_len, learned positions: the "
                      f"rows past it read no position and the loss is NaN); set "
                      f"data.target_len <= {m.max_len}")
  if bool(d.sentence_pair) != bool(m.sentence_head):
    raise ConfigError(f"data.sentence_pair={d.sentence_pair!r} and model.sentence_head="
                      f"{m.sentence_head} go together: set both (an encoder with "
                      f"data.objective=mlm and --config.model.sentence_head=true) or neither")
  return resolved


def spec(d) -> Spec:
  """The Spec of config.data `d`: checks the objective's parameters, resolves its lengths."""
  obj = get(d.objective)
  if d.sentence_pair not in SENTENCE_PAIR_KINDS:
    raise ConfigError(f"data.sentence_pair={d.sentence_pair!r} must be '', 'nsp' or 'sop'")
  if d.sentence_pair and not getattr(obj, "SENTENCE_PAIRS", False):
    raise ConfigError(f"data.sentence_pair={d.sentence_pair!r} is for data.objective='mlm', not "
                      f"{d.objective!r}")
  if d.sentence_pair and d.seq_len < 5:
    raise ConfigError(f"data.seq_len={d.seq_len} is too short for sentence pairs (>= 5)")
  if hasattr(obj, "check"):
    obj.check(d)
  return obj.resolve(Spec.from_data(d))


def flag(d_or_spec, name: str, default=False):
  """An objective's flag (PAIRS, CONTROL_PIECES, CONCAT, ...) for config.data or a Spec."""
  return getattr(get(d_or_spec.objective), name, default)


def source_ids(d, tok, ids: list, head: bool = True, max_len: int = 0,
               cut_start: bool = True) -> list:
  """An encoder-decoder's source as training framed it: bos first with data.add_bos (a pair's
  source, or a document's start: a context is one), after UL2's mode token (its `source_head`;
  with not `head`, the one `ids` start with, if any); eos after it with data.add_eos for a
  (source, target) pair objective (seq2seq.example), and where every training input ended with
  one (SOURCE_EOS: span, ul2). With `max_len`, `ids` lose their start (or with not `cut_start`
  their end) to fit it, the framing none of its tokens."""
  frame = flag(d, "PAIRS")
  mode = getattr(get(d.objective), "source_head", None)
  if head:
    head = mode(tok) if mode else []
  else:  # a prompt that names its own mode token keeps it first, before the bos (as training)
    named = bool(mode and ids and ids[0] in getattr(tok, "mode_ids", ()))
    head, ids = list(ids[:1]) * named, ids[named:]
  eos = (d.add_eos and frame) or flag(d, "SOURCE_EOS")
  # bos: a pair's source, or a document's start (the pipeline's Tokenize put it there)
  before = head + [tok.bos_id] * bool(d.add_bos and tok.bos_id >= 0)
  after = [tok.eos_id] * bool(eos)
  room = max(max_len - len(before) - len(after), 1)
  if max_len and len(ids) > room:
    ids = ids[len(ids) - room:] if cut_start else ids[:room]
  return before + ids + after


def encoder_decoder(s) -> bool:
  return "encdec" in get(s.objective).FAMILIES


def sentinels(s: Spec) -> int:
  """The most sentinels one chunk can need."""
  obj = get(s.objective)
  return obj.sentinels(s) if hasattr(obj, "sentinels") else 0


def control_pieces(s: Spec) -> str:
  """The tokenizer command's --special for these objectives: every objective's pieces in one
  file, with the sentinels `s` needs (at least MIN_SENTINELS)."""
  return f"mask,sentinels:{max(sentinels(s), MIN_SENTINELS)},ul2"


def special_for(d) -> str:
  """The tokenizer command's --special for config.data `d` ("" for an objective without any)."""
  return control_pieces(spec(d)) if flag(d, "CONTROL_PIECES", True) else ""


def missing_tokens(s: Spec, tok) -> list[str]:
  """The pieces the objective needs that tokenizer `tok` lacks, in words."""
  obj = get(s.objective)
  missing = list(obj.missing_tokens(s, tok)) if hasattr(obj, "missing_tokens") else []
  if sentinels(s) > len(tok.sentinel_ids):
    missing.append(f"{sentinels(s)} sentinels <extra_id_0>.. (it has {len(tok.sentinel_ids)})")
  if encoder_decoder(s) and (decoder_start(tok) < 0 or tok.eos_id < 0):
    missing.append("a decoder start (bos, else pad) and eos")
  return missing


def worst_lengths(s: Spec, length: int) -> tuple[int, int]:
  """The longest (encoder, decoder) sequences a chunk of `length` tokens can give."""
  return get(s.objective).worst_lengths(s, length)


DOCUMENT = common.DOCUMENT  # the chunk key of its document, where document_ids(spec)


def document_ids(s: Spec) -> bool:
  """Whether the objective reads which document each chunk came from (its `document_ids(s)`:
  nsp draws a negative's B from another document)."""
  return bool(getattr(get(s.objective), "document_ids", lambda s: False)(s))


def needs_vocab(s: Spec) -> bool:
  obj = get(s.objective)
  return hasattr(obj, "corrupt") or hasattr(obj, "examples")


def examples(ds, s: Spec, vocab, seed: int, shuffle):
  """The chunk stream `ds` -> the objective's examples; `shuffle` (the chunk window shuffle, or
  None for eval: the stream's order) goes where the objective needs it."""
  obj = get(s.objective)
  if hasattr(obj, "examples"):
    return obj.examples(ds, s, vocab, seed, shuffle)
  if hasattr(obj, "corrupt"):
    ds = ds.random_map(common.Corrupt(obj.corrupt, s, vocab), seed=seed)
  return shuffle(ds) if shuffle else ds


def length_struct(s: Spec) -> dict:
  """The packed features and their lengths."""
  obj = get(s.objective)
  return obj.length_struct(s) if hasattr(obj, "length_struct") else common.encdec_lengths(s)


def from_packed(s: Spec, row: dict) -> dict:
  """A packed row (or a batch of them) in the batch format of the objective."""
  obj = get(s.objective)
  return obj.from_packed(s, row) if hasattr(obj, "from_packed") else common.encdec_row(row)


def empty_row(s: Spec) -> dict:
  """An all-padding row in the objective's format (weight 0 everywhere)."""
  row = {}
  for key, length in length_struct(s).items():
    row[key] = row[f"{key}_segment_ids"] = row[f"{key}_positions"] = np.zeros(length, np.int32)
  return from_packed(s, row)


def loss(s: Spec) -> Loss:
  obj = get(s.objective)
  return obj.loss(s) if hasattr(obj, "loss") else Loss()


def batch_spec(s: Spec, rows: int) -> dict:
  """{key: ((rows, length), dtype)} of the objective's batches."""
  return {k: ((rows, *v.shape), v.dtype) for k, v in empty_row(s).items()}


def synthetic_batch(s: Spec, rows: int, vocab_size: int, seed: int = 0) -> dict:
  """Random but well-formed batches of the objective's shape (benchmarks, AOT, tests): token ids
  in [3, vocab_size), one segment per row, positions from 0, every weight 1; a prefix LM's
  prefix covers the first half, sentence pairs put their label and weight on position 0."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, (shape, dtype) in batch_spec(s, rows).items():
    length = shape[1]
    if key.endswith("segment_ids"):
      value = np.ones(shape)
    elif key.endswith("positions"):
      value = np.broadcast_to(np.arange(length), shape)
    elif key == "prefix":
      value = np.broadcast_to(np.arange(length) < length // 2, shape)
    elif key == "types":
      value = np.broadcast_to(np.arange(length) >= length // 2, shape)
    elif key == "sentence_labels":
      value = np.zeros(shape) + rng.integers(0, 2, (rows, 1))
    elif key == "sentence_weights":
      value = np.broadcast_to(np.arange(length) == 0, shape)
    elif key.endswith("weights"):
      value = np.ones(shape)
    else:
      value = rng.integers(3, max(vocab_size, 4), shape)
    out[key] = np.array(value, dtype=dtype)
  return out


def default_for(family: str) -> str:
  return for_family(family)[0]


def seed_for(seed: int, split: str, shard: int = 0) -> int:
  """The random-map seed of one split's data shard ("order": its training documents' order)."""
  words = [seed % 2**32, {"train": 1, "validation": 2, "order": 3}[split], shard]
  return int(np.random.SeedSequence(words).generate_state(1)[0])
