"""Corpus cleaning: language -> quality -> exact dedup -> near dedup, streamed.

Documents come from data/corpus.py's `iter_documents` (so binary files, empty documents, invalid
UTF-8 and documents too long to hold are handled and counted there) in batches. The per-document
halves of the stages (`Stage.analyze`: hashing, language id, quality rules, MinHash signatures)
run on --workers processes, at most 2 batches per worker in flight; the main process takes the
results in corpus order and runs each stage's `decide` until one removes the document (so a
removal is counted once, by its first failing stage, and the result is the same for any
--workers). The stages are listed once, in STAGES; a new stage is a module with a `Stage` class,
its FLAGS and a `from_flags`, added there.
"""

import collections
import multiprocessing
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Iterator

from transformer_jax.config import ConfigError
from transformer_jax.config import paths as paths_lib
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data.clean import dedup
from transformer_jax.data.clean import language
from transformer_jax.data.clean import output
from transformer_jax.data.clean import quality
from transformer_jax.data.clean import report

BATCH_DOCUMENTS = 64  # documents per batch sent to a worker ...
BATCH_CHARS = 4_000_000  # ... or fewer, when they reach this many characters


def _dedup_kinds(flags: dict) -> set:
  kinds = {k for k in flags["dedup"].split(",") if k and k != "none"}
  if kinds - {"exact", "near"}:
    raise ConfigError(f"--dedup={flags['dedup']!r}: expected exact, near, exact,near or none")
  return kinds


def _exact(flags):
  return dedup.Exact() if "exact" in _dedup_kinds(flags) else None


def _language(flags):
  langs = tuple(x for x in flags["languages"].split(",") if x)
  if langs in (("none",), ()):
    return None
  return language.Language(() if langs == ("all",) else langs, flags["min_language_score"])


def _quality(flags):
  sets = tuple(x for x in flags["quality"].split(",") if x)
  if sets in (("none",), ()):
    return None
  return quality.Quality(sets, *quality.limits_from_flags(flags))


def _near(flags):
  if "near" not in _dedup_kinds(flags):
    return None
  return dedup.Near(flags["near_threshold"], flags["num_perm"], flags["ngram"], flags["seed"])


# The stages in the order they run: name -> its builder (None when its flags turn it off). Both
# dedups come after quality, whose C4 rules may rewrite a page: they key on the text written.
STAGES = {"language": _language, "quality": _quality, "exact_duplicate": _exact,
          "near_duplicate": _near}

FLAGS = {  # the stages' flags: name -> default
    "dedup": "exact,near",  # exact, near, both, or none
    "near_threshold": 0.8, "num_perm": 128, "ngram": 5, "seed": 0,  # MinHash / LSH
    "languages": "all",  # comma-separated codes to keep; all (tag only); none (stage off)
    "min_language_score": 0.65,
    "quality": "gopher",  # gopher, c4, gopher,c4 or none
    **quality.limit_flags(),
}


def build_stages(flags: dict) -> list:
  """The enabled stages, in order; ConfigError for a bad stage flag."""
  try:
    stages = [build(flags) for build in STAGES.values()]
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return [s for s in stages if s is not None]


def _batches(docs) -> Iterator[list[tuple[str, str]]]:
  batch, chars = [], 0
  for item in docs:
    batch.append(item)
    chars += len(item[1])
    if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
      yield batch
      batch, chars = [], 0
  if batch:
    yield batch


def analyze_batch(stages, batch) -> list[dict]:
  """Every stage's `analyze` on each document of a batch, stopping at a failure; the results
  without the text (unless a stage rewrote it: "new_text")."""
  results = []
  for doc_id, text in batch:  # (corpus.py made any lone surrogate U+FFFD: valid UTF-8)
    doc = {"id": doc_id, "text": text, "bytes": len(text.encode("utf-8"))}
    for stage in stages:
      if doc.get("failed"):
        break
      stage.analyze(doc)
    del doc["text"]
    results.append(doc)
  return results


_WORKER_STAGES = []


def _init_worker(stages) -> None:
  for s in (signal.SIGTERM, signal.SIGHUP):  # a forked worker inherits clean's handlers, and
    signal.signal(s, signal.SIG_DFL)  # the pool's terminate() must end it
  _WORKER_STAGES[:] = stages


def _analyze_in_worker(batch) -> list[dict]:
  return analyze_batch(_WORKER_STAGES, batch)


def _start_method() -> str:
  """fork, unless JAX is loaded in this process (a library caller's, the tests'): its threads
  make a forked child liable to deadlock. Then forkserver (spawn where there is none)."""
  methods = multiprocessing.get_all_start_methods()
  if "fork" in methods and "jax" not in sys.modules:
    return "fork"
  return "forkserver" if "forkserver" in methods else "spawn"


def _analyzed(batches, stages, workers: int):
  """(batch, its analysis) in order; workers > 1: a process pool, 2 batches/worker in flight."""
  if workers <= 1:
    for batch in batches:
      yield batch, analyze_batch(stages, batch)
    return
  context = multiprocessing.get_context(_start_method())
  with context.Pool(workers, initializer=_init_worker, initargs=(stages,)) as pool:
    pending = collections.deque()
    for batch in batches:
      pending.append((batch, pool.apply_async(_analyze_in_worker, (batch,))))
      if len(pending) >= 2 * workers:
        done, result = pending.popleft()
        yield done, result.get()
    while pending:
      done, result = pending.popleft()
      yield done, result.get()


# What a compressed file's name ends with: read as a binary file (skipped), as corpus.py reads it.
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4", ".zip", ".7z")


def _check_corpus(corpus: str) -> list:
  """The corpus's files; ConfigError if every one is compressed (each was skipped as a binary
  file, and the run wrote nothing, exit 0)."""
  files = corpus_lib.corpus_files(corpus)
  if all(f.path.lower().endswith(COMPRESSED) for f in files):
    raise ConfigError(f"--corpus={corpus!r} matches only compressed files (e.g. {files[0].path}),"
                      f" which clean does not read: decompress them first")
  return files


def _check_out(corpus: str, files: list, out: str) -> None:
  """ConfigError if OUT holds files of the corpus, in it or below it (its shards and removed/
  samples would be replaced)."""
  if paths_lib.is_remote(out):
    real_out, real = out.rstrip("/") + "/", lambda p: p
  else:
    real_out, real = os.path.join(os.path.realpath(out), ""), os.path.realpath
  for f in files:  # (a local folder holds no bucket's files)
    same_kind = paths_lib.is_remote(f.path) == paths_lib.is_remote(out)
    if same_kind and real(f.path).startswith(real_out):
      raise ConfigError(f"--out={out} holds files of --corpus={corpus!r} ({f.path}); write the "
                        f"cleaned corpus to another directory")


def run(corpus: str, fmt: str, text_field: str, out: str, stages: list, workers: int = 1,
        samples: int = 50, shard_mb: float = 256.0, plots: bool = True) -> dict:
  """Cleans `corpus` into OUT (shards, removed/ samples, report.md), replacing an earlier run's
  output there once complete (output.py); returns the summary. A gs:// OUT is written in a local
  temporary folder (under TMPDIR), then uploaded."""
  if fmt not in corpus_lib.DOC_FORMATS:
    raise ConfigError(f"--format={fmt!r}: expected one of {', '.join(corpus_lib.DOC_FORMATS)}")
  if workers < 1:
    raise ConfigError(f"--workers={workers} must be >= 1")
  try:
    _check_out(corpus, _check_corpus(corpus), out)
    args = (corpus, fmt, text_field, stages, workers, samples, shard_mb, plots)
    if not paths_lib.is_remote(out):
      return _clean(out, *args)
    with tempfile.TemporaryDirectory(prefix="clean-") as local:
      summary = _clean(local, *args)
      output.upload(local, out, STAGES)
    return summary
  except ConfigError as e:  # (the corpus reader's, in train's keys: data.corpus, ...)
    raise ConfigError(_in_flags(str(e))) from None


def _in_flags(message: str) -> str:
  """A corpus reader's message in clean's flags: data.corpus -> --corpus, data.text_field ->
  --text_field."""
  for key in ("corpus", "text_field"):
    if message.startswith(f"data.{key}"):
      return f"--{key}" + message[len(f"data.{key}"):]
  return message


def _clean(out, *args) -> dict:
  """Cleans into OUT: into a new folder in it, put in place of OUT's earlier output once the
  run is complete (output.staged)."""
  with output.staged(out, STAGES) as staging:
    return _clean_into(staging, *args)


def _clean_into(out, corpus, fmt, text_field, stages, workers, samples, shard_mb, plots) -> dict:
  start, cpu_start = time.time(), _cpu_seconds()
  skipped = corpus_lib.SkipCounts()
  docs = corpus_lib.iter_documents(corpus, fmt, text_field, skipped)
  shards, removed_samples = output.Shards(out, shard_mb), output.Samples(out, samples)
  tally = collections.Counter()
  removed = {name: 0 for name in STAGES}
  kept = _Kept(stages, shards, removed, removed_samples)
  for batch, results in _analyzed(_batches(docs), stages, workers):
    for (_, text), doc in zip(batch, results):
      doc["text"] = doc.pop("new_text", text)
      tally["documents_in"] += 1
      tally["bytes_in"] += doc["bytes"]
      tally["pieces"] += bool(corpus_lib.PIECE.search(doc["id"]))
      kept.next_document(doc)
      for stage in stages:
        removal = stage.decide(doc)
        if removal is not None:
          removed[stage.name] += 1 + kept.drop_if(stage.removes_document(removal, len(kept.held)))
          removed_samples.write(stage.name, doc, removal)
          break
      else:
        kept.held.append(doc)
  kept.next_document(None)
  written = shards.close()
  seconds = time.time() - start
  summary = _summary(tally, removed, shards, skipped, stages, workers, seconds)
  summary["shards"] = len(written)
  summary["cpu_seconds"] = {k: round(v - cpu_start[k], 2) for k, v in _cpu_seconds().items()}
  report.write(out, summary, stages, plots)
  summary["seconds"] = round(time.time() - start, 3)
  return summary


class _Kept:
  """Holds the kept pieces ID#k of the document being read until its last one is judged: a later
  piece that fails quality removes the earlier ones too, the stages then judge the pieces
  together (C4's page rule), and only then are they written (and remembered by the dedup
  stages, which remember written documents only)."""

  def __init__(self, stages, shards, removed: dict, samples):
    self.stages, self.shards, self.held = stages, shards, []
    self.removed, self.samples = removed, samples

  def next_document(self, doc) -> None:
    """Writes the held pieces once `doc` (None: the end) starts another document."""
    if self.held and (doc is None or corpus_lib.document_of(doc["id"])
                      != corpus_lib.document_of(self.held[0]["id"])):
      for stage in self.stages:
        removal = stage.judge_pieces(self.held)
        if removal is not None:
          self.removed[stage.name] += len(self.held)
          whole = {**self.held[0], "id": corpus_lib.document_of(self.held[0]["id"])}
          self.samples.write(stage.name, whole, removal)
          self.held.clear()
          return
      for piece in self.held:
        for stage in self.stages:
          stage.keep(piece)
        self.shards.write(piece)
      self.held.clear()

  def drop_if(self, whole_document: bool) -> int:
    """Drops the held pieces if the removal takes the whole document; returns how many."""
    dropped = len(self.held) if whole_document else 0
    if dropped:
      self.held.clear()
    return dropped


def _cpu_seconds() -> dict:
  """User + system CPU seconds of this process ("main") and of its ended children ("workers")."""
  own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
  return {"main": own.ru_utime + own.ru_stime, "workers": children.ru_utime + children.ru_stime}


def _summary(tally, removed, shards, skipped, stages, workers, seconds) -> dict:
  summary = {
      "documents_in": tally["documents_in"], "documents_out": shards.documents,
      "records_out": shards.records,
      "removed": removed, "seconds": round(seconds, 3), "workers": workers,
      "documents_per_s": round(tally["documents_in"] / max(seconds, 1e-9), 1),
      "mb_per_s": round(tally["bytes_in"] / 1e6 / max(seconds, 1e-9), 3),
      "mb_in": round(tally["bytes_in"] / 1e6, 3), "mb_out": round(shards.bytes / 1e6, 3),
      "bad": {"binary_files": skipped.binary_files, "empty_documents": skipped.empty_docs,
              "invalid_utf8_documents": skipped.invalid_utf8_docs,
              "pieces_of_long_documents": tally["pieces"]},
      "stages": [s.name for s in stages],
  }
  for stage in stages:
    summary.update(stage.summary())
  return summary
