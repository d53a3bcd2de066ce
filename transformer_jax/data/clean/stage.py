"""What a cleaning stage is, and the bounded statistics stages keep for the report.

A stage has two halves. `analyze(doc)` runs on one document in a worker process (or in the main
process with --workers=1): a pure function of the document and the flags, it stores what it
measured in `doc` (a dict holding "id" and "text"). `decide(doc)` runs in the main process, in
corpus order: it may keep state across documents (the dedup stages), and returns None to keep
the document or `(rule, value)` to remove it. The pipeline runs the stages in a fixed order and
stops at the first that removes, so every removal is counted once, by its first failing stage.
`keep(doc)` then runs on every stage for a document that all of them kept (the dedup stages
remember only documents that are written: a copy of a removed document is no duplicate).
A stage whose `analyze` already failed a document sets doc["failed"], and later stages' `analyze`
skip it.
"""

import dataclasses

import numpy as np


class Stage:
  """Base class: the name is the removal reason (a key of the summary's `removed`)."""
  name = ""

  def analyze(self, doc: dict) -> None:
    """Per-document measurement (in a worker); fills fields of `doc`."""

  def decide(self, doc: dict) -> tuple[str, float] | None:
    """In corpus order, in the main process: None keeps, (rule, value) removes."""
    del doc
    return None

  def keep(self, doc: dict) -> None:
    """In corpus order, in the main process, after every stage kept `doc` (it is written)."""

  def removes_document(self, removal: tuple, earlier_pieces: int) -> bool:
    """Whether removing a piece ID#k (a long document's) also removes the `earlier_pieces` kept
    before it; a stage that says so counts them."""
    del removal, earlier_pieces
    return False

  def judge_pieces(self, pieces: list) -> tuple[str, float] | None:
    """A long document's rules over its kept pieces ID#k together, once its last is read (before
    any is written): None keeps them, (rule, value) removes them all (the stage counts them)."""
    del pieces
    return None

  def summary(self) -> dict:
    """Extra figures for the final JSON line."""
    return {}

  def figures(self) -> list["Figure"]:
    """What report.py draws for this stage."""
    return []


@dataclasses.dataclass
class Figure:
  """A plot spec: kind "bar" (labels, series of {name: values}), "hist" (edges, series of
  {name: counts}, optional marks at thresholds) or "trace" (x, series of {name: y})."""
  kind: str
  title: str
  x: list
  series: dict
  xlabel: str = ""
  ylabel: str = "documents"
  marks: tuple = ()
  log: bool = False


class Histogram:
  """Counts of values in fixed bins (values outside are counted in the end bins)."""

  def __init__(self, low: float, high: float, bins: int = 40, log: bool = False):
    self.log = log
    self.edges = (np.geomspace(max(low, 1e-9), high, bins + 1) if log
                  else np.linspace(low, high, bins + 1))
    self.counts = np.zeros(bins, np.int64)

  def add(self, value: float) -> None:
    i = int(np.searchsorted(self.edges, value, side="right")) - 1
    self.counts[min(max(i, 0), len(self.counts) - 1)] += 1


class Trace:
  """A count sampled along the stream, at most `points` samples (thinned as the stream grows)."""

  def __init__(self, points: int = 512):
    self.points, self.every, self.x, self.y = points, 1, [], []
    self.seen = self.count = 0

  def step(self, hit: bool) -> None:
    self.seen += 1
    self.count += hit
    if self.seen % self.every == 0:
      self.x.append(self.seen)
      self.y.append(self.count)
      if len(self.x) > self.points:
        self.x, self.y, self.every = self.x[1::2], self.y[1::2], self.every * 2
