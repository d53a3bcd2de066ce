"""A TFDS dataset of local text, written as ArrayRecord and read back without TensorFlow.

`TextCorpus` is a `tfds.core.GeneratorBasedBuilder` whose `BuilderConfig` is made on the fly
from the `data` section of a config (corpus, format, text_field, validation_fraction). The
config's name carries a short hash of everything that decides the written records (the
format, the field, the fraction and the corpus's absolute file paths with their sizes), so
different corpora, or a corpus whose files were added, removed or resized, never share a
directory (an edit that keeps a file's size is not noticed: delete the directory then):

  <data_dir>/text_corpus/<format>-<hash>/1.0.0/text_corpus-{train,validation}.array_record-*

Each example is `{"id": str, "text": str}`; `PairCorpus` (data.format a pair format: tsv,
jsonl_pairs, functions) writes `{"id", "source", "target"}` examples under pair_corpus/
instead. A document goes to "validation" when a hash of its text (`content_hash`: a long
document's first piece, a pair's source and target) falls below `validation_fraction`, so the
same file read through two globs (a mixture's overlapping sources: its id differs) and every
exact copy fall on one side (a hash of the id put them on both); if that leaves validation
empty while there are at least two documents (and the fraction is > 0), the document with the
smallest hash goes there instead. TFDS writes ArrayRecord with the `array_record` package and
reads it back with `as_data_source()`: no TensorFlow is imported on either path.

`TokenizedCorpus` (data.pretokenize, documents only) tokenizes such a text dataset once, when it
is prepared: examples `{"id": str, "tokens": int32 [bos] + ids + [eos]}` (bos/eos as data.add_bos
/ add_eos), in the text dataset's order (index i of a split is its document i), under
tokenized_corpus/<format>-<hash>/, where the hash also covers the SHA-256 of the tokenizer file's
content and add_bos/add_eos: a changed tokenizer file is a new dataset, never stale tokens.

A corpus "tfds:NAME[/CONFIG][:VERSION]" is a dataset of the TFDS catalog instead (e.g.
"tfds:wmt14_translate/de-en"): `prepare` downloads and prepares it as ArrayRecord, once, under
data.data_dir; its "train" split trains and its "validation" split (else "test") evaluates.
Documents are its data.text_field feature; pairs (data.objective=seq2seq) its data.source_field
and data.target_field features (for a translation dataset, language codes such as "de", "en").

data.data_dir may be a gs:// URL (config/paths.py): ArrayRecord writes local files only, so a
dataset is prepared in a local temporary folder (under TMPDIR) and uploaded, its JSON files last
(a folder with dataset_info.json counts as prepared); the shards are then read from the bucket by
ArrayRecord's own Cloud Storage client (its credentials: Application Default Credentials).
"""

import dataclasses
import glob
import hashlib
import importlib
import json
import os
import shutil
import tempfile
import time

from etils import epath
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import hf_tokenization
from transformer_jax.data import tokenization

SPLITS = ("train", "validation")
_VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
  """Which documents to read and how to split them."""
  corpus: str = corpus_lib.STDLIB
  format: str = "text"
  text_field: str = "text"
  validation_fraction: float = 0.02
  source_field: str = "source"
  target_field: str = "target"


def content_hash(text) -> float:
  """A stable number in [0, 1) for a document's (first piece's) text, or a pair's (source,
  target): the same file read through any glob, and every exact copy, falls on one side."""
  text = "\0".join(text) if isinstance(text, tuple) else text
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def _fingerprint(corpus: str, fmt: str, fields: tuple, validation_fraction: float) -> str:
  """A short hash of everything that decides the prepared records."""
  files = [(f.name, paths.abspath(f.path), f.size) for f in corpus_lib.corpus_files(corpus)]
  spec = {
      "version": _VERSION,
      "format": fmt,
      "text_field": fields[0] if fmt == "jsonl" else None,
      "validation_fraction": float(validation_fraction),
      "files": files,
      "split": "content",  # by the text's hash (any glob, exact copies on one side): anew
  }
  if fmt == "jsonl_pairs":  # Older names stay valid: the key only exists for this format.
    spec["pair_fields"] = list(fields[1:])
  return hashlib.sha256(json.dumps(spec).encode("utf-8")).hexdigest()[:12]


def make_builder_config(
    corpus: str, fmt: str, text_field: str, validation_fraction: float,
    source_field: str = "source", target_field: str = "target",
) -> TextCorpusConfig:
  """A builder config named `<format>-<hash>`; raises ConfigError for a bad corpus/format."""
  corpus_lib.check_format(fmt)
  if not 0.0 <= validation_fraction < 1.0:
    raise ConfigError(f"data.validation_fraction={validation_fraction} must be in [0, 1)")
  digest = _fingerprint(corpus, fmt, (text_field, source_field, target_field),
                        validation_fraction)
  return TextCorpusConfig(
      name=f"{fmt}-{digest}",
      version=_VERSION,
      description=f"corpus={corpus!r} format={fmt} validation_fraction={validation_fraction}",
      corpus=corpus,
      format=fmt,
      text_field=text_field,
      validation_fraction=float(validation_fraction),
      source_field=source_field,
      target_field=target_field,
  )


class _LocalInfo(tfds.core.DatasetInfo):
  """A local corpus's DatasetInfo: nothing to look up in TFDS's bucket of catalog metadata. (Its
  lookup, at each construction of a builder not yet prepared, left an empty folder in the
  temporary directory every time, even with that bucket off, as it is by default.)"""

  def initialize_from_bucket(self) -> None:
    pass


def held_out_split(docs, fraction: float) -> tuple[list, int, bool]:
  """(held-out (id, text) pieces, documents seen, whether the fallback chose them) of (id, text)
  pieces: whole documents (every piece `ID#k` of a long one) go to one side: those whose
  content_hash is under the fraction; else, with 2 or more documents, the one of smallest hash;
  never every document (the one of largest hash goes back)."""
  held_out, num_docs, held_hash = [], 0, {}
  first, first_hash, last, h = [], 1.0, None, 1.0  # The pieces of the document of smallest hash.
  for doc_id, text in docs:
    document = corpus_lib.document_of(doc_id)
    if document != last:  # a document's pieces come one after another: its first one's text
      num_docs += 1
      h = content_hash(text)
    if h < first_hash or (h == first_hash and document == last):
      first = (first if h == first_hash else []) + [(doc_id, text)]
      first_hash = h
    if h < fraction:
      held_out.append((doc_id, text))
      held_hash[document] = h
    last = document
  fallback = not held_out and num_docs >= 2 and fraction > 0
  if fallback:
    held_out = first
    held_hash = {corpus_lib.document_of(first[0][0]): first_hash}
  held_docs = {corpus_lib.document_of(i) for i, _ in held_out}
  if held_docs and len(held_docs) == num_docs:  # Keep at least one training document.
    back = max(held_docs, key=held_hash.__getitem__)
    held_out = [(i, t) for i, t in held_out if corpus_lib.document_of(i) != back]
  return held_out, num_docs, fallback


class TextCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents of a local corpus as {"id", "text"} examples in train/validation splits.

  Not registered in the TFDS catalog (configs are made on the fly, and the generic name
  must not collide with catalog datasets): build it with `prepare()` below.
  """

  name = "text_corpus"
  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: "First release."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10's default needs the `importlib_resources` backport on Python >= 3.9 for
    # builders defined in a package; this file's path is what it would compute anyway.
    return epath.Path(__file__)

  def _create_builder_config(self, builder_config, version):
    # Every config here is made on the fly; TFDS would warn "Using custom data configuration"
    # each time a builder is constructed.
    if isinstance(builder_config, (TextCorpusConfig, TokenizedCorpusConfig)):
      return builder_config
    return super()._create_builder_config(builder_config, version)

  DESCRIPTION = "Local text documents for language-model pretraining."
  FEATURES = ("text",)  # besides "id"; Text features unless _features says otherwise
  DISABLE_SHUFFLING = False

  def _features(self) -> dict:
    return {k: tfds.features.Text() for k in ("id",) + self.FEATURES}

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalInfo(builder=self, description=self.DESCRIPTION,
                      features=tfds.features.FeaturesDict(self._features()),
                      disable_shuffling=self.DISABLE_SHUFFLING)

  def _documents(self, skipped=None):
    cfg = self.builder_config
    return corpus_lib.iter_documents(cfg.corpus, cfg.format, cfg.text_field, skipped=skipped)

  def _validation_docs(self) -> list[tuple[str, str]]:
    """One pass over the corpus: the (small) validation split (held_out_split's), kept in
    memory."""
    fraction = self.builder_config.validation_fraction
    skipped = corpus_lib.SkipCounts()
    held_out, num_docs, fallback = held_out_split(self._documents(skipped), fraction)
    if num_docs == 0:
      raise ConfigError(f"data.corpus={self.builder_config.corpus!r} holds no non-empty documents")
    held_docs = {corpus_lib.document_of(i) for i, _ in held_out}
    unit = "pairs" if isinstance(self, PairCorpus) else "documents"
    pieces = (f", {len(held_out)} pieces" if len(held_out) != len(held_docs) else "")
    print(f"{num_docs} {unit} ({len(held_docs)} held out for validation{pieces}); skipped "
          f"{skipped.binary_files} binary files and {skipped.empty_docs} empty documents; "
          f"{skipped.invalid_utf8_docs} documents had invalid UTF-8 (replaced by U+FFFD)"
          + (f"; {skipped.unparsable_files} Python files did not parse"
             if skipped.unparsable_files else "")
          + (f"; no document hashed under data.validation_fraction={fraction}, so the one of "
             f"smallest hash is held out (a document added later may take its place)"
             if fallback else ""), flush=True)
    return held_out

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    held_out = self._validation_docs()
    held_out_ids = frozenset(doc_id for doc_id, _ in held_out)
    train = ((i, t) for i, t in self._documents() if i not in held_out_ids)
    splits = {"train": self._generate_examples(train)}
    if held_out:  # TFDS cannot write an empty split; `data_source` serves it as [].
      splits["validation"] = self._generate_examples(iter(held_out))
    return splits

  def _generate_examples(self, docs):
    for doc_id, text in docs:
      yield doc_id, {"id": doc_id, "text": text}


class PairCorpus(TextCorpus, skip_registration=True):
  """(source, target) pairs of a local corpus as {"id", "source", "target"} examples; split into
  train/validation like TextCorpus, by a hash of the pair id."""

  name = "pair_corpus"
  DESCRIPTION = "Local source/target text pairs for sequence-to-sequence training."
  FEATURES = ("source", "target")

  def _documents(self, skipped=None):
    cfg = self.builder_config
    pairs = corpus_lib.iter_pairs(cfg.corpus, cfg.format, cfg.source_field, cfg.target_field,
                                  skipped=skipped)
    return ((pair_id, (source, target)) for pair_id, source, target in pairs)

  def _generate_examples(self, docs):
    for pair_id, (source, target) in docs:
      yield pair_id, {"id": pair_id, "source": source, "target": target}


@dataclasses.dataclass(eq=False)
class TokenizedCorpusConfig(tfds.core.BuilderConfig):
  """Which text dataset to tokenize (its data config as JSON), and how."""
  text_data: str = "{}"
  text_field: str = "text"
  tokenizer: str = ""
  tokenizer_sha256: str = ""
  add_bos: bool = True
  add_eos: bool = True


_ENCODE_BATCH = 256  # Documents SentencePiece encodes at once, on every core,
_ENCODE_CHARS = 4 << 20  # or fewer when they hold more characters than this.
_TEXT_KEYS = ("corpus", "format", "text_field", "source_field", "target_field", "data_dir",
              "validation_fraction")


class TokenizedCorpus(TextCorpus, skip_registration=True):
  """The documents of a text dataset (`builder`) as {"id", "tokens"} examples, tokenized once;
  written in the text dataset's order (no TFDS shuffling). Build it with `prepare(...,
  tokenized=True)`."""

  name = "tokenized_corpus"
  DESCRIPTION = "Token ids of a text dataset's documents for language-model pretraining."
  DISABLE_SHUFFLING = True  # Index i is the text dataset's document i.

  def _features(self) -> dict:
    return {"id": tfds.features.Text(),
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding="bytes")}

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    proto = paths.path(tokenization.tokenizer_file(cfg.tokenizer)).read_bytes()  # or gs://
    if hashlib.sha256(proto).hexdigest() != cfg.tokenizer_sha256:
      raise ConfigError(f"data.tokenizer={cfg.tokenizer!r} changed while being read; run again")
    text_cfg = ml_collections.ConfigDict(json.loads(cfg.text_data))
    sources = {split: data_source(text_cfg, split) for split in SPLITS}
    return {split: self._generate_examples((source, proto))
            for split, source in sources.items() if len(source)}  # TFDS cannot write empty ones.

  def _generate_examples(self, docs):
    source, proto = docs
    cfg = self.builder_config
    tok = tokenization.parse(proto, cfg.tokenizer)
    bos, eos = [tok.bos_id] * cfg.add_bos, [tok.eos_id] * cfg.add_eos
    for first, records in _batches(source, cfg.text_field):
      texts = [_text(r[cfg.text_field]) for r in records]
      for i, (record, ids) in enumerate(zip(records, tok.encode_batch(texts))):
        doc_id = _text(record["id"]) if "id" in record else str(first + i)
        yield first + i, {"id": doc_id, "tokens": np.asarray(bos + ids + eos, np.int32)}


def _batches(source, field: str):
  """(first index, records) of consecutive records, at most _ENCODE_BATCH of them and about
  _ENCODE_CHARS characters (the encoder's id lists take ~36 bytes a token)."""
  records, chars = [], 0
  for i in range(len(source)):
    records.append(source[i])
    chars += len(records[-1][field])
    if len(records) == _ENCODE_BATCH or chars >= _ENCODE_CHARS:
      yield i + 1 - len(records), records
      records, chars = [], 0
  if records:
    yield len(source) - len(records), records


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def tokenizer_sha256(path: str) -> str:
  """The SHA-256 of a tokenizer file's content."""
  return hashlib.sha256(paths.path(tokenization.tokenizer_file(path)).read_bytes()).hexdigest()


def tokenizer_identity(path: str, whole_config: bool = False) -> str:
  """A SHA-256 of what decides a tokenizer's ids: its file's content, and for a Hugging Face
  tokenizer the special tokens that the tokenizer_config.json (and special_tokens_map.json)
  beside it name (bos, eos, pad, ...; `whole_config`: all of that config, as stops 37-39 hashed
  it, so that a chat template or add_bos_token changed the identity). A Hugging Face one's is
  never its file's plain SHA-256, even with no config beside it: resume takes that as a
  workdir's from before stop 37, so a config added later would have gone unseen."""
  return _identity(tokenizer_sha256(path), path, whole_config)


def _identity(sha: str, path: str, whole_config: bool) -> str:
  """tokenizer_identity from the file's SHA-256 `sha`."""
  if hf_tokenization.is_hf(path):
    config = hf_tokenization.config_beside(path)
    if not whole_config:
      config = {k: v for k, v in config.items() if k in hf_tokenization.SPECIAL_KEYS}
    sha = hashlib.sha256((sha + json.dumps(config, sort_keys=True)).encode("utf-8")).hexdigest()
  return sha


def matches_identity(recorded: str, path: str) -> bool:
  """Whether a workdir's recorded tokenizer identity is the tokenizer at `path`'s: its
  tokenizer_identity, the whole-config one of stops 37-39, or its file's plain SHA-256 (what a
  workdir from before stop 37 holds)."""
  sha = tokenizer_sha256(path)  # (read once)
  return recorded in (_identity(sha, path, False), _identity(sha, path, True), sha)


def tokenized_builder(data_cfg) -> TokenizedCorpus:
  """The builder of `data_cfg`'s documents tokenized with data.tokenizer; prepares nothing."""
  text = builder(data_cfg)
  field = text_key(data_cfg)
  sha = tokenizer_sha256(data_cfg.tokenizer)
  spec = {"version": _VERSION, "text": text.info.full_name, "text_field": field,
          "tokenizer_sha256": sha, "add_bos": bool(data_cfg.add_bos),
          "add_eos": bool(data_cfg.add_eos)}
  if hf_tokenization.is_hf(data_cfg.tokenizer):  # not the datasets that read special names
    spec["special_names"] = "text"
    spec["encoding"] = "untruncated"  # records of files saved with truncation on were cut
    # bos/eos (baked into the records) come from tokenizer_config.json beside tokenizer.json
    spec["tokenizer_config"] = hf_tokenization.config_beside(data_cfg.tokenizer)
  digest = hashlib.sha256(json.dumps(spec).encode("utf-8")).hexdigest()[:12]
  fmt = "tfds" if is_catalog(data_cfg) else data_cfg.format
  config = TokenizedCorpusConfig(
      name=f"{fmt}-{digest}", version=_VERSION,
      description=f"{text.info.full_name} tokenized with {data_cfg.tokenizer} ({sha[:12]})",
      text_data=json.dumps({k: data_cfg.get(k) for k in _TEXT_KEYS if k in data_cfg}),
      text_field=field, tokenizer=paths.abspath(data_cfg.tokenizer), tokenizer_sha256=sha,
      add_bos=bool(data_cfg.add_bos), add_eos=bool(data_cfg.add_eos))
  return TokenizedCorpus(config=config, data_dir=data_cfg.data_dir or None,
                         file_format="array_record")


def is_catalog(data_cfg) -> bool:
  return data_cfg.corpus.startswith(corpus_lib.TFDS_PREFIX)


def text_key(data_cfg) -> str:
  """The record key of a document's text."""
  return data_cfg.text_field if is_catalog(data_cfg) else "text"


def pair_fields(data_cfg) -> tuple[str, str]:
  """The record keys of a pair's source and target."""
  if is_catalog(data_cfg):
    return data_cfg.source_field, data_cfg.target_field
  return "source", "target"


# TFDS's older catalog sections (WMT among them) register their datasets only when imported.
_LEGACY_SECTIONS = ("translate", "text", "summarization", "question_answering")


def _catalog_builder(name: str, data_dir: str):
  kwargs = dict(data_dir=data_dir or None, file_format="array_record")
  try:
    try:
      return tfds.builder(name, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
      for section in _LEGACY_SECTIONS:
        importlib.import_module(f"tensorflow_datasets.{section}")
      return tfds.builder(name, **kwargs)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"data.corpus={corpus_lib.TFDS_PREFIX}{name}: {first_line}") from None


def _builder_config(data_cfg) -> TextCorpusConfig:
  """The builder config of a file corpus (not a catalog dataset)."""
  return make_builder_config(data_cfg.corpus, data_cfg.format, data_cfg.text_field,
                             data_cfg.validation_fraction, data_cfg.get("source_field", "source"),
                             data_cfg.get("target_field", "target"))


def builder(data_cfg):
  """The builder for `data_cfg` (a config's `data` section); prepares nothing."""
  if is_catalog(data_cfg):
    return _catalog_builder(data_cfg.corpus[len(corpus_lib.TFDS_PREFIX):], data_cfg.data_dir)
  cls = PairCorpus if data_cfg.format in corpus_lib.PAIR_FORMATS else TextCorpus
  return cls(config=_builder_config(data_cfg), data_dir=data_cfg.data_dir or None,
             file_format="array_record")


def corpus_identity(data_cfg) -> str:
  """What names the prepared documents: a catalog dataset's name, else the builder config's
  name (the format and a hash of the files' names and sizes, and the split): another one means
  another document order under the same data.corpus glob."""
  return data_cfg.corpus if is_catalog(data_cfg) else _builder_config(data_cfg).name


def check_catalog_fields(data_cfg, seq2seq: bool) -> None:
  """ConfigError unless a catalog dataset has the features the objective reads."""
  features = builder(data_cfg).info.features
  keys = [("source_field", data_cfg.source_field), ("target_field", data_cfg.target_field)]
  for key, field in keys if seq2seq else [("text_field", data_cfg.text_field)]:
    if field not in features:
      raise ConfigError(f"data.{key}={field!r} is not a feature of {data_cfg.corpus} (it has "
                        f"{', '.join(features.keys())})")


def documents(corpus: str, fmt: str = "text", text_field: str = "text", skipped=None,
              source_field: str = "source", target_field: str = "target", data_dir: str = ""):
  """(id, text) documents of any corpus: files (corpus.iter_documents) or, for "tfds:NAME", a
  catalog dataset's train split (catalog_documents)."""
  if corpus.startswith(corpus_lib.TFDS_PREFIX):
    return catalog_documents(corpus, text_field, source_field, target_field, data_dir)
  return corpus_lib.iter_documents(corpus, fmt, text_field, skipped, source_field, target_field)


def catalog_documents(corpus: str, text_field: str, source_field: str, target_field: str,
                      data_dir: str = ""):
  """(id, text) documents of a catalog dataset's train split (prepared under `data_dir`, "" =
  TFDS's default):
  its text_field feature, or else both of source_field and target_field (to train a tokenizer)."""
  data_cfg = ml_collections.ConfigDict(dict(corpus=corpus, data_dir=data_dir, text_field=text_field,
                                            source_field=source_field, target_field=target_field))
  source = data_source(data_cfg, "train")
  features = builder(data_cfg).info.features
  fields = [text_field] if text_field in features else [source_field, target_field]
  for i in range(len(source)):
    record = source[i]
    for field in fields:
      text = record[field]
      yield f"{i}:{field}", text.decode("utf-8") if isinstance(text, bytes) else text


def prepare(data_cfg, tokenized: bool = False) -> TextCorpus:
  """Writes the ArrayRecord files for `data_cfg` (tokenized: its documents' token ids, see
  TokenizedCorpus) unless they already exist; returns the builder. A data.data_dir on gs:// is
  prepared in a local temporary folder and uploaded (ArrayRecord writes local files only; it
  reads gs:// shards itself)."""
  make = tokenized_builder if tokenized else builder
  b = make(data_cfg)
  remote = paths.is_remote(b.data_dir)
  if _checked(remote, data_cfg, b.is_prepared):
    return b
  if not data_cfg.corpus.startswith(corpus_lib.TFDS_PREFIX) and data_cfg.format not in (
      "text", "lines"):  # a format mistake is its one line, before the progress lines
    next(iter(corpus_lib.iter_documents(data_cfg.corpus, data_cfg.format, data_cfg.text_field,
                                        None, data_cfg.source_field, data_cfg.target_field)),
         None)
  what = f"tokenized with {data_cfg.tokenizer}" if tokenized else "ArrayRecord"
  print(f"preparing {data_cfg.corpus} as {what} under {b.data_dir} (once)", flush=True)
  if not remote:
    return _prepare_here(b, lambda: make(data_cfg))
  _checked(remote, data_cfg, lambda: paths.check_writable(b.data_dir))  # before the work
  with tempfile.TemporaryDirectory(prefix="tfds-") as tmp:
    # The same dataset (config, version) with a local data_dir: its files' names are the same.
    local = type(b)(config=b.builder_config, version=str(b.version), data_dir=tmp,
                    file_format="array_record")
    local = _prepare_here(local, lambda: None)
    # The JSON files last: TFDS takes a folder with dataset_info.json for a prepared one.
    _checked(remote, data_cfg, lambda: paths.upload(
        local.data_dir, b.data_dir, last=("features.json", "dataset_info.json")))
  return make(data_cfg)


def _checked(remote: bool, data_cfg, fn):
  """fn(); on gs://, a storage error (a missing bucket, no access, no server) is one line."""
  if not remote:
    return fn()
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"data.data_dir={data_cfg.data_dir!r} is not usable: "
                      f"{paths.why(e, data_cfg.data_dir)}") from None


def _prepare_here(b, again):
  """Prepares builder `b` in its (local) data_dir; `again()` rebuilds it after a failure that
  another process's finished preparation may explain (None: no such retry)."""
  _remove_stale_incomplete(b.data_dir)
  try:
    tfds.disable_progress_bar()
    b.download_and_prepare()
  except RuntimeError as e:  # TFDS's writer wraps a Ctrl-C in a RuntimeError
    if _interrupted(e):
      raise KeyboardInterrupt from None  # one line (cli.run); the next run prepares it again
    raise
  except OSError:
    # Another process may have finished the same dataset first (TFDS writes to a temporary
    # directory and renames it): use theirs.
    b = again()
    if b is None or not b.is_prepared():
      raise
  return b


STALE_INCOMPLETE_S = 3600  # an unfinished preparation untouched this long is a dead one's


def _interrupted(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, KeyboardInterrupt):
      return True
    e = e.__cause__ or e.__context__
  return False


def _remove_stale_incomplete(data_dir) -> None:
  """Removes the `incomplete.*` folders that a killed preparation left beside `data_dir` (TFDS
  renames one to `data_dir` when it finishes, and removes it on an exception, but not on a
  kill), once nothing in them has changed for STALE_INCOMPLETE_S: a live preparation of another
  process keeps writing into its own."""
  parent = os.path.dirname(os.fspath(data_dir).rstrip("/"))
  for path in glob.glob(os.path.join(parent, "incomplete.*")):
    times = [os.path.getmtime(os.path.join(root, f)) for root, _, files in os.walk(path)
             for f in files] + [os.path.getmtime(path)]
    if time.time() - max(times) > STALE_INCOMPLETE_S:
      shutil.rmtree(path, ignore_errors=True)
      print(f"removed {path}, left by an unfinished preparation", flush=True)


def data_source(data_cfg, split: str, tokenized: bool = False):
  """A random-access source (len, [i] -> {"id": bytes, "text": bytes}, or the pair / catalog
  features; tokenized: {"id": bytes, "tokens": int32 array}) of one split."""
  if split not in SPLITS:
    raise ConfigError(f"split={split!r} is unknown; expected one of {', '.join(SPLITS)}")
  prepared = prepare(data_cfg, tokenized)
  if (split == "validation" and is_catalog(data_cfg) and not tokenized
      and split not in prepared.info.splits):
    split = "test"  # Catalog datasets without a validation split evaluate on test.
  if split not in prepared.info.splits:
    return []  # A one-document corpus has no validation split.
  return prepared.as_data_source(split=split)
