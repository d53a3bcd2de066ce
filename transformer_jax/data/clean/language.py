"""Language identification with py3langid (langid.py's model, shipped inside the package: no
download at run time), normalized probabilities over its 97 languages.

Every document that reaches this stage gets `language` (ISO 639-1) and `language_score` (the
probability of that language), kept as fields of the output JSONL. With --languages=en,de a
document is removed unless its language is one of those with score >= --min_language_score;
with --languages=all nothing is removed (the fields are still written).

A document read as pieces ID#k (over corpus.py's MAX_DOCUMENT_CHARS, each far longer than
MAX_CHARS) is identified as any document is, by its start: its first piece. The later pieces take
that language and score and are kept or removed with it: a piece removed alone (a quotation in
another language) left the text around it joined into one record, text that never existed.
"""

import collections

import numpy as np

from py3langid.langid import LanguageIdentifier
from py3langid.langid import MODEL_FILE

from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data.clean import stage as stage_lib

# Identification reads at most this many characters of a document (its start): the score
# settles long before, and the cost is linear in the length.
MAX_CHARS = 10_000
_TOP = 15  # languages shown in the report


def _identifier() -> LanguageIdentifier:
  return LanguageIdentifier.from_pickled_model(MODEL_FILE, norm_probs=True)


class Language(stage_lib.Stage):
  """Tags each document's language; removes those outside --languages."""
  name = "language"

  def __init__(self, languages: tuple[str, ...], min_score: float):
    self.languages, self.min_score = frozenset(languages), min_score
    self.identifier = _identifier()
    unknown = sorted(self.languages - set(self.identifier.nb_classes))
    if unknown:
      raise ValueError(f"--languages: {', '.join(unknown)} unknown to py3langid; it knows "
                       f"{', '.join(sorted(self.identifier.nb_classes))}")
    if not 0.0 <= min_score <= 1.0:
      raise ValueError(f"--min_language_score={min_score} must be in [0, 1]")
    self.kept = collections.Counter()
    self.removed = collections.Counter()
    self.scores = {"kept": stage_lib.Histogram(0.0, 1.0), "removed": stage_lib.Histogram(0.0, 1.0)}
    self.start = (None, {})  # (the last document decided, its language fields)

  def __getstate__(self):
    # (forkserver, spawn) a worker loads its own model (0.05 s), and none of the counts go
    return dict(self.__dict__, identifier=None, kept=None, removed=None, scores=None)

  def __setstate__(self, state):
    self.__dict__.update(state, identifier=_identifier())

  def _identify(self, text: str) -> tuple[str, float]:
    ident = self.identifier
    # classify()'s dense product of the feature counts with the (7480 x 97) model costs ~20 ms
    # when OpenBLAS threads wait on busy cores; only the features present matter (~1 ms).
    counts = ident.instance2fv(text[:MAX_CHARS])
    present = np.flatnonzero(counts)
    probs = ident.norm_probs(counts[present].astype(np.float32) @ ident.nb_ptc[present]
                             + ident.nb_pc)
    best = int(np.argmax(probs))
    return str(ident.nb_classes[best]), float(probs[best])

  def analyze(self, doc: dict) -> None:
    if not _later_piece(doc["id"]):  # (a later piece takes its first's language: decide)
      self._judge(doc)

  def _judge(self, doc: dict) -> None:
    language, score = self._identify(doc["text"])
    doc["language"], doc["language_score"] = language, round(score, 4)  # (as it is written)
    if self.languages and (language not in self.languages or score < self.min_score):
      doc["failed"] = self.name

  def decide(self, doc: dict):
    document = corpus_lib.document_of(doc["id"])
    if "language" not in doc:  # a later piece ID#k: its document's, its first piece's
      if self.start[0] == document:
        doc.update(self.start[1])
      else:  # (its first piece was not decided here: judged alone)
        self._judge(doc)
    removed = doc.get("failed") == self.name
    fields = {k: doc[k] for k in ("language", "language_score")}
    self.start = (document, {**fields, "failed": self.name} if removed else fields)
    (self.removed if removed else self.kept)[doc["language"]] += 1
    self.scores["removed" if removed else "kept"].add(doc["language_score"])
    return (doc["language"], doc["language_score"]) if removed else None

  def summary(self):
    return {"languages": dict((self.kept + self.removed).most_common(_TOP))}

  def figures(self):
    top = [lang for lang, _ in (self.kept + self.removed).most_common(_TOP)]
    return [
        stage_lib.Figure("bar", "Languages (most frequent)", top,
                         {"kept": [self.kept[x] for x in top],
                          "removed": [self.removed[x] for x in top]}),
        stage_lib.Figure("hist", "Language score (probability of the top language)",
                         list(self.scores["kept"].edges),
                         {k: list(h.counts) for k, h in self.scores.items()},
                         xlabel="score", marks=(self.min_score,) if self.languages else ()),
    ]


def _later_piece(doc_id: str) -> bool:
  return bool(corpus_lib.PIECE.search(doc_id)) and not doc_id.endswith("#0")
