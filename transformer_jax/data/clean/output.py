"""What the cleaner writes: the kept documents as JSONL shards, and samples of removed ones.

  OUT/part-00000.jsonl, ...   {"id", "text"[, "language", "language_score"]} per line, a new
                              shard after every `shard_mb` MB (read them back with
                              data.corpus=OUT/*.jsonl data.format=jsonl). The kept pieces ID#k of
                              a document over 1 MiB are one record, id ID, their texts joined
                              in order (language: its first kept piece's), so that training
                              reads them as one document again (its pieces on one side of the
                              validation split); the record is written piece by piece. Shards
                              are written as part-NNNNN.jsonl.partial and renamed when the run
                              ends, so a killed run leaves no shard that OUT/*.jsonl would read
                              as a complete corpus.
  OUT/removed/REASON.jsonl    the first `samples` documents removed for each reason, with the
                              rule and its measured value (text cut at SAMPLE_CHARS)
"""

import glob
import json
import os

from transformer_jax.config import paths
from transformer_jax.data import corpus as corpus_lib

SHARD_PATTERN = "part-{:05d}.jsonl"
SHARD_GLOB = SHARD_PATTERN.replace("{:05d}", "[0-9]" * 5)
PARTIAL = ".partial"  # a shard's suffix until the run ends
SAMPLE_CHARS = 20_000
_FIELDS = ("id", "text", "language", "language_score")


def clear(out: str) -> None:
  """Makes OUT and OUT/removed, removing the shards and samples a previous run left there (only
  those: a shorter run must not leave stale shards behind for OUT/*.jsonl to read)."""
  os.makedirs(os.path.join(out, "removed"), exist_ok=True)
  shards = os.path.join(out, SHARD_GLOB)
  for path in (glob.glob(shards) + glob.glob(shards + PARTIAL)
               + glob.glob(os.path.join(out, "removed", "*.jsonl"))):
    os.remove(path)


def upload(local: str, out: str) -> None:
  """Puts the output written in the local folder `local` into the gs:// folder OUT: the shards,
  samples, plots and report a previous run left there are removed, the new shards are uploaded as
  .partial objects and renamed once all are there, then the rest, report.md last. A bucket has
  no atomic rename of many objects: a kill during the renames (server-side copies) leaves some
  shards in place, and OUT/report.md is what says the output is whole."""
  fs, base = paths.filesystem(out), out.rstrip("/")
  stale = [name for pattern in ("report.md", SHARD_GLOB, SHARD_GLOB + PARTIAL, "removed/*.jsonl",
                                "plots/*.png")
           for name in fs.glob(f"{base}/{pattern}")]
  if stale:
    fs.rm(stale)
  shards = [os.path.basename(p) for p in sorted(glob.glob(os.path.join(local, SHARD_GLOB)))]
  for name in shards:
    fs.put_file(os.path.join(local, name), f"{base}/{name}{PARTIAL}")
    os.remove(os.path.join(local, name))
  for name in shards:
    paths.move(f"{base}/{name}{PARTIAL}", f"{base}/{name}")
  paths.upload(local, out, last=("report.md",))


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
    self.file = open(os.path.join(self.out, SHARD_PATTERN.format(self.index) + PARTIAL), "wb")
    self.size = 0

  def close(self) -> list[str]:
    """Closes the last shard and renames every shard into place; returns their paths."""
    self._end()
    if self.file is not None:
      self.file.close()
    shards = [os.path.join(self.out, SHARD_PATTERN.format(i))
              for i in range(self.index + 1 if self.file else 0)]
    for path in shards:
      os.replace(path + PARTIAL, path)
    return shards


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
