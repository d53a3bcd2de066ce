"""Exact and near-duplicate removal; both keep the first occurrence in corpus order.

Exact: a 128-bit BLAKE2b digest of the normalized text (Unicode NFC, runs of whitespace made one
space, ends stripped); the set of digests seen is this stage's only per-document state.

Near: datasketch's MinHash over the lower-cased word n-gram shingles of a document (its whole
word sequence when shorter than n), and datasketch's MinHashLSH, banded for --near_threshold
(Jaccard). A document whose signature shares a band with an earlier kept document is a near
duplicate of it; otherwise it is inserted, so each cluster keeps one representative, its first
member. Signatures are computed in the workers from fixed permutations (--seed); the index is
queried in corpus order in the main process, so the result does not depend on --workers.
"""

import hashlib
import re
import unicodedata
import zlib

from datasketch import LeanMinHash
from datasketch import MinHash
from datasketch import MinHashLSH

from transformer_jax.data.clean import stage as stage_lib

_WORDS = re.compile(r"\w+")


def normalized(text: str) -> str:
  """NFC, whitespace runs collapsed to one space, ends stripped."""
  return " ".join(unicodedata.normalize("NFC", text).split())


def digest(text: str) -> bytes:
  """The exact-dedup key of a text."""
  return hashlib.blake2b(normalized(text).encode("utf-8"), digest_size=16).digest()


def shingles(text: str, n: int) -> list[bytes]:
  """Distinct word n-grams of `text` (lower-cased \\w+ words), UTF-8 encoded."""
  words = _WORDS.findall(unicodedata.normalize("NFC", text).lower())
  if len(words) <= n:
    return [" ".join(words).encode("utf-8")] if words else []
  return list({" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)})


class Exact(stage_lib.Stage):
  """Removes documents whose normalized text was seen before."""
  name = "exact_duplicate"

  def __init__(self):
    self.seen = set()
    self.trace = stage_lib.Trace()

  def analyze(self, doc: dict) -> None:
    doc["digest"] = digest(doc["text"])

  def decide(self, doc: dict):
    key = doc["digest"]
    duplicate = key in self.seen
    self.trace.step(duplicate)
    if duplicate:
      return "exact", 1.0
    self.seen.add(key)
    return None

  def figures(self):
    return [stage_lib.Figure("trace", "Exact duplicates removed", self.trace.x,
                             {"removed so far": self.trace.y}, xlabel="documents read")]


class Near(stage_lib.Stage):
  """Removes documents whose MinHash signature collides (LSH) with an earlier kept document."""
  name = "near_duplicate"

  def __init__(self, threshold: float, num_perm: int, ngram: int, seed: int):
    if not 0.0 < threshold < 1.0:
      raise ValueError(f"--near_threshold={threshold} must be in (0, 1)")
    if num_perm < 16 or ngram < 1:
      raise ValueError(f"need --num_perm >= 16 and --ngram >= 1 (got {num_perm}, {ngram})")
    self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
    self.permutations = MinHash(num_perm=num_perm, seed=seed).permutations
    self.lsh = None  # built in the main process only (decide)
    self.trace = stage_lib.Trace()

  def __getstate__(self):  # Workers get the permutations, never the index.
    return dict(self.__dict__, lsh=None)

  def analyze(self, doc: dict) -> None:
    grams = shingles(doc["text"], self.ngram)
    if not grams:
      doc["signature"] = None
      return
    m = MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=zlib.crc32,
                permutations=self.permutations)
    m.update_batch(grams)
    doc["signature"] = m.hashvalues

  def decide(self, doc: dict):
    if doc.get("signature") is None:  # no words: nothing to compare
      self.trace.step(False)
      return None
    if self.lsh is None:
      self.lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
    m = LeanMinHash(seed=self.seed, hashvalues=doc["signature"])
    matches = self.lsh.query(m)
    self.trace.step(bool(matches))
    if matches:
      doc["duplicate_of"] = min(matches)
      return "near", self.threshold
    self.lsh.insert(doc["id"], m, check_duplication=False)
    return None

  def summary(self):
    return {"lsh_bands": self._bands()[0], "lsh_rows": self._bands()[1]}

  def _bands(self):
    lsh = self.lsh or MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
    return lsh.b, lsh.r

  def figures(self):
    b, r = self._bands()
    return [stage_lib.Figure("trace", f"Near duplicates removed (Jaccard >= {self.threshold}; "
                             f"LSH {b} bands x {r} rows)", self.trace.x,
                             {"removed so far": self.trace.y}, xlabel="documents read")]
