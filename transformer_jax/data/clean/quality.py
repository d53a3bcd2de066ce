"""The quality stage: Gopher's document rules and/or C4's line and page rules (--quality).

With both (--quality=gopher,c4), Gopher's rules read the document as it came, then C4's line
rules cut its lines; the kept document is the C4-cleaned text. A removed document records the
rule (e.g. "gopher:stop_words", "c4:curly_bracket") and its measured value.
"""

import collections
import dataclasses

from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data.clean import c4
from transformer_jax.data.clean import gopher
from transformer_jax.data.clean import stage as stage_lib

RULE_SETS = ("gopher", "c4")

# metric -> (low, high, log bins, its thresholds' flags) of its report histogram
_HISTOGRAMS = {
    "word_count": (1, 1e6, True, ("min_words", "max_words")),
    "mean_word_length": (0, 20, False, ("min_mean_word_length", "max_mean_word_length")),
    "symbol_word_ratio": (0, 1, False, ("max_symbol_word_ratio",)),
    "alpha_words": (0, 1, False, ("min_alpha_words",)),
    "stop_words": (0, 9, False, ("min_stop_words",)),
    "duplicate_lines": (0, 1, False, ("max_duplicate_lines",)),
    "duplicate_10gram": (0, 1, False, ("max_duplicate_10gram",)),
    "sentences": (0, 100, False, ("c4_min_sentences",)),
}


def limit_flags() -> dict:
  """Every rule threshold as a flag: Gopher's by name, C4's as c4_NAME."""
  flags = {f.name: f.default for f in dataclasses.fields(gopher.Limits)}
  flags.update({f"c4_{f.name}": f.default for f in dataclasses.fields(c4.Limits)})
  return flags


def limits_from_flags(flags: dict) -> tuple[gopher.Limits, c4.Limits]:
  """The rule sets' Limits; ValueError for a NaN threshold or a --min_X above its --max_X."""
  for name in limit_flags():
    if flags[name] != flags[name]:
      raise ValueError(f"--{name}=nan: expected a number")
    high = name.replace("min_", "max_", 1)
    if name.startswith("min_") and high in flags and flags[name] > flags[high]:
      raise ValueError(f"--{name}={flags[name]} is above --{high}={flags[high]}: "
                       "every document would be removed")
  return (gopher.Limits(**{f.name: flags[f.name] for f in dataclasses.fields(gopher.Limits)}),
          c4.Limits(**{f.name: flags[f"c4_{f.name}"] for f in dataclasses.fields(c4.Limits)}))


def _marks(gopher_limits: gopher.Limits, c4_limits: c4.Limits, metric: str) -> tuple:
  """The thresholds of `metric`, to mark on its histogram."""
  return tuple(getattr(c4_limits, n[3:]) if n.startswith("c4_") else getattr(gopher_limits, n)
               for n in _HISTOGRAMS[metric][3])


class Quality(stage_lib.Stage):
  """Removes documents failing a rule of the chosen rule sets; C4 also rewrites the text."""
  name = "quality"

  def __init__(self, rule_sets: tuple[str, ...], gopher_limits: gopher.Limits,
               c4_limits: c4.Limits):
    unknown = set(rule_sets) - set(RULE_SETS)
    if unknown or not rule_sets:
      raise ValueError(f"--quality={','.join(rule_sets)}: expected gopher, c4, gopher,c4 or none")
    self.rule_sets, self.gopher, self.c4 = tuple(rule_sets), gopher_limits, c4_limits
    self.rules = collections.Counter()
    self.histograms = {k: stage_lib.Histogram(lo, hi, log=log)
                       for k, (lo, hi, log, _) in _HISTOGRAMS.items()}
    self.removed = (None, None)  # (document, its failure): its later pieces go with it

  def analyze(self, doc: dict) -> None:
    values, failure = {}, None
    if "gopher" in self.rule_sets:
      values, failure = gopher.check(doc["text"], self.gopher)
      failure = failure and (f"gopher:{failure[0]}", failure[1])
    if failure is None and "c4" in self.rule_sets:
      piece = bool(corpus_lib.PIECE.search(doc["id"]))
      text, c4_values, failure = c4.check(doc["text"], self.c4, page=not piece)
      values.update(c4_values)
      if piece:  # C4's page rule is the whole document's (judge_pieces)
        doc["c4_sentences"] = c4_values.get("sentences", 0)  # (none: a page rule removed it)
        # its text is now lines: the next piece's go on a new line (output.Shards; a line that
        # corpus.py cut at a space, past half a piece, was judged as its two fragments)
        doc["cut"] = "\n"
      failure = failure and (f"c4:{failure[0]}", failure[1])
      if failure is None and text != doc["text"]:
        doc["text"] = doc["new_text"] = text
    doc["quality"] = {k: v for k, v in values.items() if k in _HISTOGRAMS}
    if failure:
      doc["failed"], doc["quality_failure"] = self.name, failure

  def decide(self, doc: dict):
    """A document over 1 MiB comes as consecutive pieces ID#k (corpus.py), each judged alone: a
    piece that fails removes the rest of its document too (a too-long book's last, short piece
    passed max_words and was kept), and the pieces before it (`removes_document`)."""
    for metric, value in doc["quality"].items():
      self.histograms[metric].add(value)
    document = corpus_lib.document_of(doc["id"])
    failure = (doc["quality_failure"] if doc.get("failed") == self.name
               else self.removed[1] if document == self.removed[0] else None)
    if failure is None:
      return None
    self.removed = (document, failure)
    self.rules[failure[0]] += 1
    return failure

  def removes_document(self, removal, earlier_pieces):
    self.rules[removal[0]] += earlier_pieces
    return True

  def judge_pieces(self, pieces):
    """C4's page rule over a long document's kept pieces: their sentences together (a piece
    alone, e.g. a short last one, failed the rule for the page)."""
    if "c4" not in self.rule_sets or not any("c4_sentences" in p for p in pieces):
      return None
    count = sum(p.get("c4_sentences", 0) for p in pieces)
    if count >= self.c4.min_sentences:
      return None
    self.rules["c4:too_few_sentences"] += len(pieces)
    return "c4:too_few_sentences", float(count)

  def summary(self):
    return {"quality_rules": dict(self.rules.most_common())}

  def figures(self):
    rules = [rule for rule, _ in self.rules.most_common()]
    figures = [stage_lib.Figure("bar", "Quality: documents removed by each rule (first failing)",
                                rules, {"removed": [self.rules[r] for r in rules]})]
    for metric, h in self.histograms.items():
      if h.counts.any():
        figures.append(stage_lib.Figure(
            "hist", f"Quality metric: {metric}", list(h.edges), {"documents": list(h.counts)},
            xlabel=metric, marks=_marks(self.gopher, self.c4, metric), log=h.log))
    return figures
