"""Exact and near-duplicate removal; both keep the first occurrence in corpus order, among the
documents written: a document that another stage removed is remembered by neither, so a copy of
it that passes the stages is kept (Stage.keep). Both run after quality and read the text as it
is written (C4's rules may drop lines of a page). A document over 1 MiB, read as pieces ID#k,
is compared whole (judge_pieces): exact on the sequence of its pieces' digests, near on the union
of their shingles (the minimum of their signatures); a piece alone was removed, and the text
around it joined into a record.

Exact: a 128-bit BLAKE2b digest of the normalized text (Unicode NFC, runs of whitespace made one
space, ends stripped); the set of digests seen is this stage's only per-document state.

Near: datasketch's MinHash over the lower-cased word n-gram shingles of a document (words: runs of
word characters and combining marks, where a script written without spaces, such as Chinese,
Japanese or Thai, makes each letter a word; its whole word sequence when shorter than n), and
datasketch's MinHashLSH, banded for --near_threshold (Jaccard). A document whose signature shares a
band with an earlier kept document, and whose estimated Jaccard similarity to it (the share of equal
signature values) is at least the threshold, is a near duplicate of it; otherwise it is inserted, so
each cluster keeps one representative, its first member. The bands are chosen for recall
(datasketch's weights: false negatives 0.95, false positives 0.05), the estimate then sets the false
positives aside: at 0.8 with 128 permutations, 16 bands of 8 rows make candidates of 95 % of the
pairs at similarity 0.8 and 99 % at 0.85 (datasketch's default, balanced choice: 40 % and 69 %; and
it removed, with no check, 8 % of the pairs at 0.7 and 20 % at 0.75). The estimate's own spread
(about 0.035 at 0.8) then decides the pairs near the threshold. Signatures are computed in the
workers from fixed permutations (--seed); the index is queried in corpus order in the main process,
so the result does not depend on --workers. The kept documents' signatures stay in memory (512 bytes
each) beside the index.
"""

import functools
import hashlib
import re
import sys
import unicodedata
import zlib

from datasketch import LeanMinHash
from datasketch import MinHash
from datasketch import MinHashLSH
import numpy as np

from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data.clean import stage as stage_lib



# Scripts written without spaces between words: Han (with its extensions and compatibility
# ideographs), Hiragana, Katakana (and its halfwidth forms), Thai, Lao, Khmer, Myanmar.
_UNSPACED = ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF),
             (0xF900, 0xFAFF), (0xFF66, 0xFF9F), (0x20000, 0x323AF), (0x0E00, 0x0EFF),
             (0x1780, 0x17FF), (0x1000, 0x109F))


def _class(test, ranges=((0, sys.maxunicode),)) -> str:
  """A regex character class body: the code points of `ranges` whose category passes `test`."""
  runs = []
  for lo, hi in ranges:
    start = None
    for cp in range(lo, hi + 2):
      inside = cp <= hi and test(unicodedata.category(chr(cp)))
      if inside and start is None:
        start = cp
      elif not inside and start is not None:
        runs.append(f"{re.escape(chr(start))}-{re.escape(chr(cp - 1))}")
        start = None
  return "".join(runs)


@functools.cache
def _words():
  """Words: runs of word characters and combining marks (Python's \\w takes no mark: a Hindi
  word's vowel signs and viramas, a Thai one's, split it and were dropped, so two texts that
  differed in nearly every word had the same shingles); in a script written without spaces, each
  letter with its marks is a word (a Chinese clause was one word, so changing one character of
  131 left 0.09 of its word 5-grams, where 0.92 of its character 5-grams stay). Built on first
  use (~0.5 s)."""
  marks = _class(lambda cat: cat[0] == "M")
  letters = _class(lambda cat: cat[0] in "LN", _UNSPACED)
  return re.compile(rf"[{letters}][{marks}]*|(?:(?![{letters}])[\w{marks}])+")


def normalized(text: str) -> str:
  """NFC, whitespace runs collapsed to one space, ends stripped."""
  return " ".join(unicodedata.normalize("NFC", text).split())


def digest(text: str) -> bytes:
  """The exact-dedup key of a text."""
  return hashlib.blake2b(normalized(text).encode("utf-8"), digest_size=16).digest()


def _piece(doc: dict) -> bool:
  """Whether `doc` is a piece ID#k of a document over 1 MiB (corpus.py)."""
  return bool(corpus_lib.PIECE.search(doc["id"]))


def shingles(text: str, n: int) -> list[bytes]:
  """Distinct word n-grams of `text` (lower-cased `_words`), UTF-8 encoded."""
  words = _words().findall(unicodedata.normalize("NFC", text).lower())
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
    duplicate = not _piece(doc) and doc["digest"] in self.seen  # (a piece: judge_pieces)
    self.trace.step(duplicate)
    return ("exact", 1.0) if duplicate else None

  def judge_pieces(self, pieces):
    """A long document's pieces ID#k are one document's: removed together when the sequence of
    their digests was seen (a piece alone was removed, and the text around it joined)."""
    if not _piece(pieces[0]):
      return None
    whole = hashlib.blake2b(b"".join(p["digest"] for p in pieces), digest_size=16).digest()
    for p in pieces:  # (keep remembers the whole only)
      p["digest"] = None
    pieces[0]["digest"] = whole
    return ("exact", 1.0) if whole in self.seen else None

  def keep(self, doc: dict) -> None:
    if doc["digest"] is not None:
      self.seen.add(doc["digest"])

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
    self.kept = {}  # id -> signature (uint32: MinHash values are < 2^32) of each kept document
    self.rank = {}  # id -> its place in the corpus order among the kept
    self.trace = stage_lib.Trace()

  def __getstate__(self):  # Workers get the permutations, never the index.
    return dict(self.__dict__, lsh=None, kept={}, rank={})

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
    if doc.get("signature") is None or _piece(doc):  # no words, or a piece (judge_pieces)
      self.trace.step(False)
      return None
    return self._match(doc)

  def judge_pieces(self, pieces):
    """A long document's pieces ID#k are one document's: compared as their union (the
    elementwise minimum of their signatures is the MinHash of the union of their shingles)
    and removed together."""
    signatures = [p["signature"] for p in pieces if p.get("signature") is not None]
    if not _piece(pieces[0]) or not signatures:
      return None
    for p in pieces:  # (keep inserts the whole only, under the document's id)
      p["signature"] = None
    pieces[0]["signature"] = np.minimum.reduce([np.asarray(s, np.uint32) for s in signatures])
    return self._match(pieces[0])

  def _match(self, doc: dict):
    if self.lsh is None:
      self.lsh = self._index()
    m = LeanMinHash(seed=self.seed, hashvalues=doc["signature"])
    signature = np.asarray(doc["signature"], np.uint32)
    similar = {i: float(np.mean(self.kept[i] == signature)) for i in self.lsh.query(m)}
    matches = sorted((i for i, s in similar.items() if s >= self.threshold),
                     key=self.rank.__getitem__)  # duplicate_of: the first kept, in corpus order
    self.trace.step(bool(matches))
    if matches:
      doc["duplicate_of"] = matches[0]
      return "near", similar[matches[0]]
    return None

  def keep(self, doc: dict) -> None:
    if doc.get("signature") is None:
      return
    signature, name = np.asarray(doc["signature"], np.uint32), corpus_lib.document_of(doc["id"])
    self.lsh.insert(name, LeanMinHash(seed=self.seed, hashvalues=signature),
                    check_duplication=False)
    self.kept[name] = signature
    self.rank[name] = len(self.rank)

  def summary(self):
    return {"lsh_bands": self._bands()[0], "lsh_rows": self._bands()[1]}

  def _bands(self):
    lsh = self.lsh or self._index()
    return lsh.b, lsh.r

  def _index(self):
    return MinHashLSH(threshold=self.threshold, num_perm=self.num_perm, weights=(0.05, 0.95))

  def figures(self):
    b, r = self._bands()
    return [stage_lib.Figure("trace", f"Near duplicates removed (Jaccard >= {self.threshold}; "
                             f"LSH {b} bands x {r} rows)", self.trace.x,
                             {"removed so far": self.trace.y}, xlabel="documents read")]
