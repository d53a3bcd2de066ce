"""What the cleaner writes: the kept documents as JSONL shards, and samples of removed ones.

  OUT/part-00000.jsonl, ...   {"id", "text"[, "language", "language_score"]} per line, a new
                              shard after every `shard_mb` MB (read them back with
                              data.corpus=OUT/*.jsonl data.format=jsonl). The kept pieces ID#k of
                              a document over 1 MiB are one record, id ID, their texts joined
                              in order (language: its first kept piece's), so that training
                              reads them as one document again (its pieces on one side of the
                              validation split); the record is written piece by piece.
  OUT/removed/REASON.jsonl    the first `samples` documents removed for each reason, with the
                              rule and its measured value (text cut at SAMPLE_CHARS)

A run writes all of it (report.md and plots/ too) in OUT/.clean-run/ (`staged`); an earlier run's
output stays in OUT, untouched and readable, until the new one is complete. Only then, with
OUT/clean.unfinished there (corpus.UNFINISHED: the corpus reader refuses a folder holding it),
are the earlier run's files removed, the new ones moved in, report.md last, and the marker
removed: a run killed or failed at any point leaves no shards that OUT/*.jsonl reads as the
cleaned corpus. Only the cleaner's own names (`own_files`) are ever removed or replaced: other
files in OUT, OUT/removed/ and OUT/plots/ are left alone.
"""

import contextlib
import functools
import glob
import json
import os
import shutil
import threading

from transformer_jax.config import paths
from transformer_jax.data import corpus as corpus_lib

SHARD_PATTERN = "part-{:05d}.jsonl"
SHARD_GLOB = SHARD_PATTERN.replace("{:05d}", "[0-9]" * 5)
PARTIAL = ".partial"  # an older version's shard until its run ended (removed as the run's own)
STAGING = ".clean-run"  # the run's output until it is complete (hidden: no glob of OUT reads it)
UNFINISHED = corpus_lib.UNFINISHED
_MOVING = "clean is moving its output here; if it stopped, re-run it\n"  # (UNFINISHED's text)
SAMPLE_CHARS = 20_000
_FIELDS = ("id", "text", "language", "language_score")


def own_files(stages) -> list[str]:
  """Globs (relative to OUT) of what a clean run writes there, for stage names `stages`: its
  report, shards (and .partial ones), and each stage's samples and plot."""
  return (["report.md", SHARD_GLOB, SHARD_GLOB + PARTIAL] + [f"removed/{s}.jsonl" for s in stages]
          + [f"plots/{s}.png" for s in stages])


def _found(out: str, patterns) -> list[str]:
  """The files of OUT (local or gs://) that match `patterns`, as names relative to OUT."""
  if paths.is_remote(out):
    fs, base = paths.filesystem(out), out.rstrip("/")
    root = base.split("://", 1)[1] + "/"
    return sorted(n[len(root):] for p in patterns for n in fs.glob(f"{base}/{p}"))
  return sorted(os.path.relpath(n, out) for p in patterns for n in glob.glob(os.path.join(out, p)))


def earlier(out: str, stages) -> list[str]:
  """The files (relative to OUT) of an earlier, complete clean run in OUT; none where OUT holds
  UNFINISHED (a run stopped while moving its output in: nothing whole to keep)."""
  if paths.exists(paths.join(out, UNFINISHED)):
    return []
  return [n for n in _found(out, own_files(stages)) if not n.endswith(PARTIAL)]


@contextlib.contextmanager
def staged(out: str, stages):
  """Yields a new, empty OUT/STAGING (what a killed run left there removed) with removed/ in it,
  for the run's output; once the block ends, puts it in place of OUT's earlier output (`commit`).
  An exception removes it: OUT is as it was (an OUT this run made, gone again)."""
  staging, made = os.path.join(out, STAGING), not os.path.exists(out)
  if os.path.isdir(staging):
    shutil.rmtree(staging)
  os.makedirs(os.path.join(staging, "removed"))
  try:
    yield staging
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    if made:
      with contextlib.suppress(OSError):  # (only while empty)
        os.rmdir(out)
    raise
  commit(out, staging, stages)


MOVING = threading.Event()  # set while commit or upload moves a run's output into OUT


def _moving(move):
  """commit and upload: MOVING is set while they run (clean's SIGTERM handler lets them finish:
  stopped halfway, OUT would hold neither output)."""
  @functools.wraps(move)
  def moving(*args):
    MOVING.set()
    try:
      move(*args)
    finally:
      MOVING.clear()
  return moving


@_moving
def commit(out: str, staging: str, stages) -> None:
  """Replaces the earlier run's files in OUT (own_files) with the complete output in `staging`,
  with UNFINISHED in OUT meanwhile and report.md moved last; then removes both."""
  marker = os.path.join(out, UNFINISHED)
  with open(marker, "w", encoding="utf-8") as f:
    f.write(_MOVING)
  for name in _found(out, own_files(stages)):
    os.remove(os.path.join(out, name))
  new = [os.path.relpath(os.path.join(folder, n), staging)
         for folder, _, names in os.walk(staging) for n in names]
  for name in sorted(new, key=lambda n: (n == "report.md", n)):
    os.makedirs(os.path.dirname(os.path.join(out, name)), exist_ok=True)
    os.replace(os.path.join(staging, name), os.path.join(out, name))
  os.remove(marker)
  shutil.rmtree(staging)


@_moving
def upload(local: str, out: str, stages) -> None:
  """Puts the output written in the local folder `local` into the gs:// folder OUT as `commit`
  does: OUT/UNFINISHED first, then the earlier run's files removed (own_files), the new ones
  uploaded, report.md last, and the marker removed (a kill in between leaves the marker)."""
  base = out.rstrip("/")
  marker = f"{base}/{UNFINISHED}"
  paths.write_text(marker, _MOVING)
  stale = [f"{base}/{name}" for name in _found(out, own_files(stages))]
  if stale:
    paths.filesystem(out).rm(stale)
  paths.upload(local, out, last=("report.md",))
  paths.remove(marker)


def _json(value) -> bytes:
  return json.dumps(value, ensure_ascii=False).encode("utf-8", errors="surrogatepass")


class Shards:
  """Writes records to numbered JSONL shards of about `shard_mb` MB each; `documents` counts the
  documents (pieces) written, `records` the lines."""

  def __init__(self, out: str, shard_mb: float):
    self.out, self.limit = out, max(1, int(shard_mb * 1e6))
    self.index, self.size, self.file = 0, 0, None
    self.documents = self.records = self.bytes = 0
    self.open = None  # the id of the document whose record is still being written
    self.cut = None  # what goes between its last text and the next (None: no text yet)

  def write(self, doc: dict) -> None:
    """Writes a kept document; a piece of the document before it joins that one's record, after
    the earlier text's "cut" where it was rewritten (C4's lines drop the newline the piece was
    cut after), between two texts only (a piece C4 left empty adds nothing)."""
    document = corpus_lib.document_of(doc["id"])
    if self.open is None or document != self.open or document == doc["id"]:
      self._end()
      head = {k: doc[k] for k in _FIELDS if k in doc and k != "text"}
      head["id"] = document
      self._put(_json(head)[:-1] + b', "text": "', new_record=True)
      self.open, self.cut = document, None
    if doc["text"]:
      if self.cut:
        self._put(_json(self.cut)[1:-1])
      self._put(_json(doc["text"])[1:-1])
      self.cut = doc.get("cut", "")
    self.documents += 1

  def _end(self) -> None:
    if self.open is not None:
      self._put(b'"}\n')
      self.open = None

  def _put(self, data: bytes, new_record: bool = False) -> None:
    if new_record:
      if self.file is None or self.size >= self.limit:
        self._next()
      self.records += 1
    self.file.write(data)
    self.size += len(data)
    self.bytes += len(data)

  def _next(self) -> None:
    if self.file is not None:
      self.file.close()
      self.index += 1
    self.file = open(os.path.join(self.out, SHARD_PATTERN.format(self.index)), "wb")
    self.size = 0

  def close(self) -> list[str]:
    """Closes the last shard; returns the shards' paths."""
    self._end()
    if self.file is not None:
      self.file.close()
    return [os.path.join(self.out, SHARD_PATTERN.format(i))
            for i in range(self.index + 1 if self.file else 0)]


class Samples:
  """Keeps the first `limit` removed documents of each reason in OUT/removed/REASON.jsonl."""

  def __init__(self, out: str, limit: int):
    self.dir, self.limit, self.counts = os.path.join(out, "removed"), limit, {}

  def write(self, reason: str, doc: dict, removal: tuple) -> None:
    n = self.counts.get(reason, 0)
    if n >= self.limit:
      return
    self.counts[reason] = n + 1
    record = {"id": doc["id"], "reason": reason, "rule": removal[0], "value": removal[1]}
    record.update({k: doc[k] for k in ("duplicate_of", "language", "language_score") if k in doc})
    record["text"] = doc["text"][:SAMPLE_CHARS]
    with open(os.path.join(self.dir, f"{reason}.jsonl"), "a", encoding="utf-8",
              errors="surrogatepass") as f:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
