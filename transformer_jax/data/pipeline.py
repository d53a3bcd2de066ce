"""The grain input pipeline for language-model pretraining.

Training, per process:

  TFDS ArrayRecord source (train split); data.pretokenize (documents): token ids written once,
       when the dataset is prepared (tfds_text.TokenizedCorpus), so the tokenize step is skipped
    -> one logical data shard's documents (every S-th, from shard k; S = data.shards)
    -> global shuffle, reshuffled every epoch, repeated forever     (seed: config.seed)
    -> tokenize: [bos] + ids + [eos]                                 (grain map step)
       (seq2seq: each (source, target) pair becomes one example, cut to length; no chunking)
    -> data.packing = "concat" (clm only) instead of the next four steps: the documents, in
       stream order, concatenated and cut into full rows of seq_len (packing.py: no padding; a
       document's tail continues as a new segment in the next row)
    -> chunk: documents longer than the chunk length (seq_len for clm and mlm) become chunks of
       that length, each its own segment
    -> objective, per chunk (all but clm): a seeded random map          (objectives/)
    -> window shuffle of chunks (mixes the chunks of long documents)
    -> first-fit packing into rows of seq_len (and target_len for the decoder features of
       encoder-decoder objectives; grain's FirstFitPackIterDataset)
    -> batches of train.batch_size // S rows
    -> the batch format; clm: causal LM targets and weights of the packed rows (`causal_lm`)
    -> this process's shards, concatenated (`ShardedBatches`): shard k fills rows
       k * B/S .. (k + 1) * B/S of every global batch of B rows, whoever reads it, so the data
       order is the same for any number of processes (and a checkpoint restores on any number)

Every batch is a dict of numpy arrays shaped [rows, seq_len]: for clm and mlm `inputs`,
`targets`, `segment_ids`, `positions` (int32) and `weights` (float32). Segment ids count the
packed segments of a row from 1 (0 is padding); positions restart at 0 in every segment; padding
tokens are 0. Encoder-decoder objectives (span, denoise, ul2) give `encoder_*` [rows, seq_len]
and `decoder_*` [rows, target_len] features instead (objectives/ documents every format).
"""

import functools
import itertools
import os
import sys
import zlib

from absl import flags
import grain
import numpy as np

from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import hf_tokenization
from transformer_jax.data import objectives
from transformer_jax.data.objectives import seq2seq
from transformer_jax.data import mixture as mixture_lib
from transformer_jax.data import packing as packing_lib
from transformer_jax.data import tfds_text
from transformer_jax.data import tokenization as tokenizer_lib

_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)
# Pretokenized records are cheap to read: more threads and a deeper buffer only cost GIL time.
_TOKEN_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)
_CHUNK_SHUFFLE_WINDOW = 512  # Chunks shuffled together before packing.
_MIN_PACKING_BINS = 64  # Rows packed at once; more bins leave less padding.
_PREFETCH_BATCHES = 2  # Batches computed ahead in a thread (num_workers = 0).
_PACKED = objectives.common.CHUNK  # The chunk feature; packing adds its segment ids, positions.
PACKINGS = ("first_fit", "concat")


# ------------------------------------------------------------------------------ checks


def _command_flags(config) -> dict:
  """create_command's corpus keywords for the tokenizer `config` trains with."""
  d = config.data
  return dict(corpus=d.corpus, vocab_size=config.model.vocab_size, fmt=d.format,
              text_field=d.text_field, source_field=d.source_field,
              target_field=d.target_field, data_dir=d.data_dir,
              special=objectives.special_for(d))


def load_tokenizer(config) -> tokenizer_lib.Tokenizer:
  """The tokenizer of `config.data.tokenizer` (ConfigError with the command to make it)."""
  return tokenizer_lib.load(config.data.tokenizer, **_command_flags(config))


def _check_tokenizer(config) -> None:
  tok = load_tokenizer(config)
  path, model_vocab = config.data.tokenizer, config.model.vocab_size
  if tok.vocab_size > model_vocab:
    raise ConfigError(f"model.vocab_size={model_vocab} is smaller than the vocabulary of "
                      f"{path} ({tok.vocab_size}); set model.vocab_size >= {tok.vocab_size}")
  if 0 < config.model.output_vocab < tok.vocab_size:  # ids past it could never be predicted
    raise ConfigError(f"model.output_vocab={config.model.output_vocab} is smaller than the "
                      f"vocabulary of {path} ({tok.vocab_size}); set it to 0 or >= "
                      f"{tok.vocab_size}")
  for flag, special, value in (("add_bos", "bos", tok.bos_id), ("add_eos", "eos", tok.eos_id)):
    if config.data[flag] and value < 0:
      raise ConfigError(f"data.{flag} is set but {path} has no {special} token")
  _check_objective_tokens(config, tok)


def _check_objective_tokens(config, tok) -> None:
  """The pieces data.objective needs; ConfigError with the command that makes them."""
  d = config.data
  s = objectives.spec(d)
  needed = objectives.missing_tokens(s, tok)
  if needed:
    hf = hf_tokenization.is_hf(d.tokenizer)  # the SentencePiece command cannot write there
    stem, ext = os.path.splitext(d.tokenizer)
    # a new path: workdirs trained with the file at data.tokenizer go on reading it
    out = tokenizer_lib.SENTENCEPIECE_PATH if hf else f"{stem}_special{ext or '.model'}"
    command = tokenizer_lib.create_command(
        out, **dict(_command_flags(config), special=objectives.control_pieces(s)))
    make = (f"add them to its {hf_tokenization.FILE} (special added tokens), or set "
            f"data.tokenizer={out} and make that with: " if hf else
            f"set data.tokenizer={out} (the file at {d.tokenizer} stays as other runs read "
            f"it) and make that with: ")
    raise ConfigError(f"data.objective={s.objective!r} needs {', '.join(needed)}, which "
                      f"data.tokenizer={d.tokenizer!r} lacks; {make}{command}")


def _check_pairs(config) -> None:
  """Pairs (a pair format or a catalog dataset's two fields) exactly when the objective is
  seq2seq; the corpus exists."""
  d = config.data
  seq2seq = objectives.flag(d, "PAIRS")
  if tfds_text.is_catalog(d):
    tfds_text.check_catalog_fields(d, seq2seq)
    return
  if seq2seq != (d.format in corpus_lib.PAIR_FORMATS):
    raise ConfigError(
        f"data.format={d.format!r} holds {'documents' if seq2seq else 'pairs'}: data.objective="
        f"{d.objective!r} needs " + (f"one of {', '.join(corpus_lib.PAIR_FORMATS)}" if seq2seq
                                     else "data.objective='seq2seq' (or a document format)"))
  corpus_lib.corpus_files(d.corpus)


def validate(config, process_count: int = 1) -> None:
  """Cheap checks of the data config before anything is compiled; raises ConfigError."""
  d = config.data
  if d.seq_len < 2:
    raise ConfigError(f"data.seq_len={d.seq_len} must be >= 2")
  batch = config.train.batch_size
  if process_count < 1:
    raise ConfigError(f"process_count={process_count} must be >= 1")
  if batch < 1 or batch % process_count:
    raise ConfigError(f"train.batch_size={batch} must be a positive multiple of the process "
                      f"count ({process_count})")
  if d.shards < 0 or d.shards and batch % d.shards:
    raise ConfigError(f"data.shards={d.shards} must be 0 (one per process) or divide "
                      f"train.batch_size={batch}")
  if d.num_workers < 0:
    raise ConfigError(f"data.num_workers={d.num_workers} must be >= 0")
  if d.data_dir and "://" not in d.data_dir and os.path.isfile(d.data_dir):
    raise ConfigError(f"data.data_dir={d.data_dir} is a file: give a folder for the prepared "
                      "data (a NotADirectoryError when TFDS wrote there)")
  if d.num_workers > (os.cpu_count() or 1):  # (1000 swapped the host out: a process each)
    raise ConfigError(f"data.num_workers={d.num_workers} is more than this host's "
                      f"{os.cpu_count()} CPUs: grain starts a process (with its own copy of the "
                      "pipeline) per worker and data shard")
  if not 0.0 <= d.validation_fraction < 1.0:
    raise ConfigError(f"data.validation_fraction={d.validation_fraction} must be in [0, 1)")
  if not isinstance(d.pretokenize, bool):
    raise ConfigError(f"data.pretokenize={d.pretokenize!r} must be True or False")
  if d.packing not in PACKINGS:
    raise ConfigError(f"data.packing={d.packing!r} is unknown; use one of {', '.join(PACKINGS)}")
  objectives.spec(d)  # the objective's parameters (its model family: objectives.check)
  if d.packing == "concat" and not objectives.flag(d, "CONCAT"):
    raise ConfigError(f"data.packing='concat' packs causal LM rows only; data.objective="
                      f"{d.objective!r} needs data.packing='first_fit'")
  sources = mixture_lib.sources(config)
  for src in sources or [None]:
    where = f"data.mixture source {src.name!r}: " if src else ""
    try:
      corpus_lib.check_format(src.config.data.format if src else d.format)
      _check_pairs(src.config if src else config)
    except ConfigError as e:
      raise ConfigError(f"{where}{e}") from None
  _check_tokenizer(config)


# --------------------------------------------------------------------------- transforms


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(path: str) -> tokenizer_lib.Tokenizer:
  return tokenizer_lib.load(path)


class Tokenize(grain.transforms.Map):
  """{field: bytes|str} -> {"tokens": int32 [bos] + ids + [eos]}; loads the model lazily."""

  def __init__(self, tokenizer_path: str, add_bos: bool, add_eos: bool, field: str = "text"):
    self._path = paths.abspath(tokenizer_path)  # Workers may not share our cwd.
    self._add_bos = add_bos
    self._add_eos = add_eos
    self._field = field

  def map(self, element):
    tok = _cached_tokenizer(self._path)  # Once per process (worker), on first use.
    text = element[self._field]
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    ids = tok.encode(text)
    if self._add_bos:
      ids = [tok.bos_id] + ids
    if self._add_eos:
      ids = ids + [tok.eos_id]
    return {"tokens": np.asarray(ids, dtype=np.int32)}


class TokenizePair(grain.transforms.Map):
  """A {source, target} record -> an encoder-decoder example (objectives/seq2seq.py)."""

  def __init__(self, tokenizer_path: str, fields: tuple[str, str], data_cfg, target_len: int):
    self._path = paths.abspath(tokenizer_path)
    self._fields = fields
    self._options = dict(add_bos=data_cfg.add_bos, add_eos=data_cfg.add_eos,
                         seq_len=data_cfg.seq_len, target_len=target_len)

  def map(self, element):
    tok = _cached_tokenizer(self._path)
    source, target = (element[f].decode("utf-8") if isinstance(element[f], bytes) else element[f]
                      for f in self._fields)
    return seq2seq.example(tok.encode(source), tok.encode(target), bos_id=tok.bos_id,
                           eos_id=tok.eos_id, start_id=objectives.decoder_start(tok),
                           **self._options)


def _doc_tokens(element) -> dict:
  """A pretokenized record -> {"tokens"}: a writable copy of its int32 ids."""
  return {"tokens": np.array(element["tokens"], dtype=np.int32)}


class ChunkTokens(grain.experimental.FlatMapTransform):
  """{"tokens"} -> [{"inputs": tokens[i:i + chunk_len]}, ...]; nothing for an empty document.
  With `documents`, each chunk also says which document it came from ("document": a CRC-32 of
  the document's tokens; equal documents share it)."""

  max_fan_out = 1 << 20  # Only bounds MapDataset flat maps; this one runs on an IterDataset.

  def __init__(self, chunk_len: int, documents: bool = False):
    self._chunk_len, self._documents = chunk_len, documents

  def flat_map(self, element):
    tokens = element["tokens"]
    n = self._chunk_len
    chunks = [{_PACKED: tokens[i:i + n]} for i in range(0, len(tokens), n)]
    if self._documents:
      document = zlib.crc32(np.ascontiguousarray(tokens, np.int32).tobytes())
      for chunk in chunks:
        chunk[objectives.DOCUMENT] = document
    return chunks


# ---------------------------------------------------------------------------- datasets


def _pretokenized(config) -> bool:
  """Whether documents are read as token ids (data.pretokenize; never pairs)."""
  return config.data.pretokenize and not objectives.flag(config.data, "PAIRS")


def _documents(config, split: str) -> grain.MapDataset:
  """One split's records: text (or pairs), or token ids when pretokenized."""
  source = tfds_text.data_source(config.data, split, tokenized=_pretokenized(config))
  return grain.MapDataset.source(source)


def _tokenize(docs: grain.MapDataset, config) -> grain.IterDataset:
  d = config.data
  if _pretokenized(config):
    return docs.map(_doc_tokens).to_iter_dataset(_TOKEN_READ_OPTIONS)
  if objectives.flag(d, "PAIRS"):
    target_len = objectives.spec(d).target_len
    docs = docs.map(TokenizePair(d.tokenizer, tfds_text.pair_fields(d), d, target_len))
  else:
    field = tfds_text.text_key(d)
    docs = docs.map(Tokenize(d.tokenizer, d.add_bos, d.add_eos, field))
  return docs.to_iter_dataset(_READ_OPTIONS)


def chunk_and_pack(ds: grain.IterDataset, config, num_bins: int, seed: int | None,
                   objective_seed: int, batch_size: int = 0) -> grain.IterDataset:
  """Chunks token sequences, applies the objective and packs them into rows in the batch format
  (batch_size > 0: batches of that many rows, the last partial one dropped); seed=None keeps the
  order (eval); objective_seed seeds the objective's random map."""
  ds = packed_rows(ds, config, num_bins, seed, objective_seed)
  return to_batches(ds, objectives.spec(config.data), batch_size)


def packed_rows(ds: grain.IterDataset, config, num_bins: int, seed: int | None,
                objective_seed: int) -> grain.IterDataset:
  """Token sequences -> packed rows (grain's packed format, before the objective's batch
  format): concatenated and cut (data.packing=concat) or chunked, objective, first-fit."""
  s = objectives.spec(config.data)
  if config.data.packing == "concat":
    return packing_lib.ConcatRows(ds, s.seq_len)
  return _first_fit(ds, config, s, num_bins, seed, objective_seed)


def to_batches(rows: grain.IterDataset, s, batch_size: int = 0) -> grain.IterDataset:
  """Packed rows -> the objective's batch format (batch_size > 0: batches of that many rows,
  the last partial one dropped); a mixture's source index passes through."""
  if batch_size:  # Before the format: it works on whole batches (one numpy call per key).
    rows = rows.batch(batch_size, drop_remainder=True)
  return rows.map(functools.partial(_batch_format, s))


def _batch_format(s, row: dict) -> dict:
  row = dict(row)
  source = row.pop(mixture_lib.SOURCE_KEY, None)
  out = objectives.from_packed(s, row)
  if source is not None:
    out[mixture_lib.SOURCE_KEY] = source
  return out


def _first_fit(ds, config, s, num_bins, seed, objective_seed) -> grain.IterDataset:
  """Chunks, objective, chunk shuffle and first-fit packing (grain's packed row format)."""
  if not objectives.flag(s, "PAIRS"):  # Pairs arrive as examples, cut to length.
    ds = grain.experimental.FlatMapIterDataset(ds, ChunkTokens(s.chunk_len,
                                                               objectives.document_ids(s)))
  vocab = (objectives.Vocab.from_tokenizer(load_tokenizer(config))
           if objectives.needs_vocab(s) else None)

  def shuffle(chunks):  # Mixes the chunks of long documents (not for eval: seed None).
    return grain.experimental.WindowShuffleIterDataset(chunks, window_size=_CHUNK_SHUFFLE_WINDOW,
                                                       seed=seed)
  ds = objectives.examples(ds, s, vocab, objective_seed, None if seed is None else shuffle)
  return grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=objectives.length_struct(s), num_packing_bins=num_bins,
      seed=seed or 0, shuffle_bins=seed is not None)


def shard_count(config, readers: int = 1) -> int:
  """data.shards, or (0) one shard per distinct reader of the batch (normally a process)."""
  return config.data.shards or readers


def _check_rows(config, rows):
  """The global row range [start, stop) this process reads; whole shards only."""
  batch = config.train.batch_size
  start, stop = (0, batch) if rows is None else rows
  shards = shard_count(config, batch // max(stop - start, 1))
  if not 0 <= start < stop <= batch:
    raise ValueError(f"rows {rows} are not a range within train.batch_size={batch}")
  per = batch // shards
  if batch % shards or start % per or stop % per:
    raise ConfigError(f"data.shards={shards}: this process reads rows {start}..{stop} of each "
                      f"batch of {batch}, which is not a whole number of shards ({batch} / "
                      f"{shards} rows each); set data.shards to a multiple of the process count "
                      f"that divides train.batch_size")
  return shards, range(start // per, stop // per)


def train_dataset(config, shard: int = 0, num_shards: int = 1, num_epochs: int | None = None,
                  legacy_order: bool = False) -> grain.IterDataset:
  """One logical data shard's batches (train.batch_size // num_shards rows each) from its own
  documents (every num_shards-th, from `shard`; of each source of a data.mixture, whose rows are
  mixed by weight: mixture.py); `num_epochs=None` repeats forever. The config is not validated
  here (make_train_iterator does it once for all shards)."""
  if not 0 <= shard < num_shards:
    raise ValueError(f"shard={shard} is not in [0, {num_shards})")
  batch = config.train.batch_size // num_shards
  bins = max(batch, _MIN_PACKING_BINS)
  sources = mixture_lib.sources(config)
  if not sources:
    rows = _train_rows(config, config.seed, shard, num_shards, num_epochs, bins,
                       legacy_order=legacy_order)
  else:
    parts = {src.name: _train_rows(src.config, mixture_lib.source_seed(config.seed, src.name),
                                   shard, num_shards, num_epochs, bins,
                                   f"data.mixture source {src.name!r}: ", legacy_order).map(
                                       mixture_lib.tag(src.index)) for src in sources}
    rows = grain.IterDataset.mix(parts, mixture_lib.grain_proportions(sources))
  return to_batches(rows, objectives.spec(config.data), batch)


def _train_rows(config, seed: int, shard: int, num_shards: int, num_epochs, bins: int,
                where: str = "", legacy_order: bool = False) -> grain.IterDataset:
  """One source's packed training rows of one data shard."""
  docs = shard_documents(config, seed, shard, num_shards, num_epochs, where, legacy_order)
  return packed_rows(_tokenize(docs, config), config, bins,
                     seed=_order_seed(seed, shard, num_shards, legacy_order),
                     objective_seed=objectives.seed_for(seed, "train", shard))


def shard_documents(config, seed: int, shard: int, num_shards: int, num_epochs=None,
                    where: str = "", legacy_order: bool = False) -> grain.MapDataset:
  """One data shard's training documents (every num_shards-th stored one), shuffled anew every
  epoch, in an order of its own (_order_seed): with one seed, shard k read stored document
  S * pi(t) + k at step t, so stored neighbours always met in one batch."""
  docs = _documents(config, "train")[shard::num_shards]
  if len(docs) == 0:
    raise ConfigError(f"{where}data.corpus={config.data.corpus!r} has fewer training documents "
                      f"than data shards ({num_shards})")
  return docs.shuffle(seed=_order_seed(seed, shard, num_shards, legacy_order)).repeat(num_epochs)


# Unmarked positions of several shards were written by two orders: the raw seed for every shard
# (until 30cc40f) and the hashed one (30cc40f to dee6b9b). The file cannot tell which: the hashed.
LEGACY_SHARDS_WARNING = (
    "warning: the saved data position ({n} shards) has no order mark: saved before 2026-12-05 "
    "18:00 UTC (dee6b9b). It resumes in each shard's hashed order, which a run started before "
    "2026-12-05 06:06 UTC (30cc40f) did not read: such a run goes on with the same documents "
    "in another order")


# The version of the rows a config makes from its documents: bump it with any change that alters
# them, and name the change in the objective's ROWS_CHANGES. A saved data position records it
# (checkpoint.py), and a resume from an older one says so where its objective's rows changed.
ROWS_VERSION = 2


def rows_warning(data_cfg, saved_rows) -> str:
  """What a resume from a position saved with rows version `saved_rows` (None: unmarked, from
  before dee6b9b) is told, or "": its rows from here on are made another way."""
  if saved_rows is None:
    changes = objectives.rows_changed(data_cfg)
    return (f"warning: the saved data position has no version (saved before 2026-12-05 18:00 "
            f"UTC, dee6b9b), and data.objective={data_cfg.objective}'s rows changed at "
            f"{changes}: a run started before that goes on with rows made another way"
            ) if changes else ""
  if saved_rows > ROWS_VERSION:  # (written by newer code)
    return (f"warning: the saved data position indexes rows of version {saved_rows}; this code "
            f"makes version {ROWS_VERSION} (pipeline.ROWS_VERSION): the run goes on with rows "
            f"made another way")
  changes = objectives.rows_changed(data_cfg, saved_rows)
  return (f"warning: the saved data position indexes rows of version {saved_rows}, and "
          f"data.objective={data_cfg.objective}'s rows changed since then ({changes}): the run "
          f"goes on with rows made another way") if changes else ""


def _order_seed(seed: int, shard: int, num_shards: int, legacy: bool = False) -> int:
  """The seed of a shard's document order and packing: a hash of (seed, "order", shard). grain
  seeds epoch e with seed + e, so the raw seed s that one shard used to take read in epoch 1
  the order that seed s + 1 read in epoch 0 (a seed sweep's runs saw the same orders, one epoch
  apart). `legacy`: the raw seed, for a one-shard position saved before (checkpoint.py)."""
  return seed if legacy and num_shards == 1 else objectives.seed_for(seed, "order", shard)


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags, which only `absl.app.run` parses."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # Keep every flag at its default.


def _saved_workers(state) -> int:
  """How many grain worker processes a shard's saved position was written with: mp_prefetch's
  state cycles over one iterator per worker (`iterators_in_use_states`); the in-process
  pipeline's state has no such list."""
  in_use = state.get("iterators_in_use_states") if isinstance(state, dict) else None
  return len(in_use) if isinstance(in_use, list) else 0


class ShardedBatches:
  """This process's rows of every global batch: the batches of the logical data shards it reads,
  concatenated in shard order. Shard k always yields the same rows (rows k * B/S .. (k+1) * B/S
  of each global batch), so the global batches do not depend on how many processes read them.

  `get_state()` maps each shard (as a string) to its grain iterator state; `set_state` takes
  such a mapping (a superset is fine), so a checkpoint written by N processes restores on M.
  """

  def __init__(self, config, num_shards: int, shards):
    self.num_shards, self.shards, self._config = num_shards, list(shards), config
    self.legacy_order = False  # restored into the order from before the hashed seeds
    self.rows_version = ROWS_VERSION
    self.num_workers = config.data.num_workers
    self._iterators = [self._shard_iterator(config, k) for k in self.shards]

  def _shard_iterator(self, config, shard, legacy_order: bool = False):
    ds = train_dataset(config, shard, self.num_shards, legacy_order=legacy_order)
    workers = config.data.num_workers
    if workers > 0:
      _ensure_absl_flags_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    else:
      ds = grain.experimental.ThreadPrefetchIterDataset(ds,
                                                        prefetch_buffer_size=_PREFETCH_BATCHES)
    return iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    parts = [next(it) for it in self._iterators]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    return {str(k): it.get_state() for k, it in zip(self.shards, self._iterators)}

  def set_state(self, state: dict, legacy_order: bool = False,
                rows: int | None = ROWS_VERSION) -> None:
    """`legacy_order`: the position was saved before the order seeds were hashed (one shard's
    order then followed the raw seed), and is restored into that order. `rows`: the rows
    version it was saved with (None: unmarked)."""
    missing = [k for k in self.shards if str(k) not in state]
    if missing:
      raise ConfigError(f"the saved data position has no state for data shard(s) {missing} "
                        f"(of {self.num_shards})")
    warnings = [rows_warning(self._config.data, rows)]
    if legacy_order and self.num_shards > 1:
      warnings.append(LEGACY_SHARDS_WARNING.format(n=self.num_shards))
    for warning in filter(None, warnings):
      print(warning, file=sys.stderr, flush=True)
    for k, it in zip(self.shards, self._iterators):
      saved = _saved_workers(state[str(k)])
      if saved != self.num_workers:  # grain would take the state and fail steps later
        raise ConfigError(f"the checkpoint's data position was saved with data.num_workers="
                          f"{saved}, this run uses {self.num_workers}: set "
                          f"--config.data.num_workers={saved} to resume exactly")
      if legacy_order != self.legacy_order and self.num_shards == 1:
        self.close()
        self._iterators = [self._shard_iterator(self._config, k, legacy_order)]
        self.legacy_order, it = legacy_order, self._iterators[0]
      try:
        it.set_state(state[str(k)])
      except (KeyError, TypeError) as e:  # Another pipeline's state (e.g. data.packing changed).
        raise ConfigError(f"the saved data position of data shard {k} does not fit this input "
                          f"pipeline (data.packing or data.objective changed?): {e!r}") from None

  def close(self):
    for it in self._iterators:
      if hasattr(it, "close"):
        it.close()


def make_train_iterator(config, rows: tuple[int, int] | None = None) -> ShardedBatches:
  """An endless, checkpointable iterator over this process's rows [start, stop) of each global
  training batch (default: all of them). Validates the data config once."""
  validate(config)
  shards, mine = _check_rows(config, rows)
  return ShardedBatches(config, shards, mine)


def _eval_rows(config):
  """Packed, objective-applied rows of the whole validation split, in a fixed order."""
  docs = _documents(config, "validation")
  if len(docs) == 0:
    return iter(())
  rows = chunk_and_pack(_tokenize(docs, config), config,
                        max(config.train.batch_size, _MIN_PACKING_BINS), seed=None,
                        objective_seed=objectives.seed_for(config.seed, "validation"))
  return iter(rows)


def eval_batches(config, num_batches: int, rows: tuple[int, int] | None = None) -> list[dict]:
  """Up to `num_batches` validation batches, this process's rows [start, stop) of each (default
  all): the same on every call.

  The first num_batches * train.batch_size rows of the validation split are cut into global
  batches, so every process gets the same number of batches. The last batch is filled with
  weight-0 padding rows. The config is validated (once) by whoever made the training iterator.
  """
  global_batch = config.train.batch_size
  start, stop = (0, global_batch) if rows is None else rows
  rows_ = list(itertools.islice(_eval_rows(config), num_batches * global_batch))
  rows_ += [objectives.empty_row(objectives.spec(config.data))] * (-len(rows_) % global_batch)
  batches = []
  for first in range(0, len(rows_), global_batch):
    mine = rows_[first + start:first + stop]
    batches.append({k: np.stack([r[k] for r in mine]) for k in mine[0]})
  return batches


def planned_epochs(config, sample: int = 64) -> dict:
  """{source name ("" without a data.mixture): (training documents, their tokens, epochs the
  run's train.steps read)}, estimated: the tokens from an evenly spaced sample of `sample`
  documents, the run's reading as its rows' share of steps x batch x seq_len tokens (a row of
  a padded packing reads fewer). {} for encoder-decoder pair objectives (rows of examples)."""
  if objectives.flag(config.data, "PAIRS"):
    return {}
  sources = mixture_lib.sources(config) or [None]
  out = {}
  for src in sources:
    c, share = (config, 1.0) if src is None else (src.config, src.probability)
    docs = _documents(c, "train")
    if len(docs) == 0:
      continue
    picked = docs[::max(1, len(docs) // sample)]
    lengths = [len(e["tokens"]) for e in _tokenize(picked, c)]
    tokens = len(docs) * float(np.mean(lengths))
    read = share * config.train.steps * config.train.batch_size * config.data.seq_len
    out["" if src is None else src.name] = (len(docs), tokens, read / max(tokens, 1.0))
  return out


def eval_sets(config, num_batches: int, rows: tuple[int, int] | None = None) -> dict:
  """{"": eval_batches(...)}, or with a data.mixture each source's own: {name: up to
  num_batches batches of its validation split}."""
  sources = mixture_lib.sources(config)
  if not sources:
    return {"": eval_batches(config, num_batches, rows)}
  return {src.name: eval_batches(src.config, num_batches, rows) for src in sources}
