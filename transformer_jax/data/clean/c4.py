"""C4's rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", section 2.2), in
the order of the reference implementation (tensorflow_datasets' c4_utils.clean_page).

Line by line: a line holding a word longer than `max_word_length` is dropped; citation markers
([1], [], [edit], [citation needed]) are cut out; a line is dropped when it does not end in
terminal punctuation or ends in "...", or has fewer than `min_line_words` words. Of the lines
left, one saying "lorem ipsum" removes the page, one mentioning javascript is dropped, one with a
curly bracket removes the page, and cookie/privacy/terms boilerplate is dropped. The page is
removed when its kept lines hold fewer than `min_sentences` sentences; a kept page is the text of
its kept lines. (C4's bad-words list is not applied: it is a download, and this package ships no
word lists.)

Sentences are counted per kept line, as C4 did with NLTK's Punkt model (a download): here with
pysbd's rule-based English segmenter, which does not end a sentence at "Dr.", "p.m." or "e.g.".
Every kept line holds at least one, so only a page of fewer kept lines than `min_sentences` is
segmented; the `sentences` metric of the others counts sentence ends (at least one a line).
Two departures, both for text C4's 2019 crawl rarely had: a closing curly quote (U+201D) ends a
line like '"', and a line is stripped again after a citation is cut ("... end. [1]" is kept).
"""

import dataclasses
import functools
import re

import pysbd

_TERMINAL = (".", "!", "?", '"', "\u201d")
_ELLIPSIS = "..."
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
           "use cookies")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
# Where a sentence may end ('."' and '.)' too): a line with at most one holds one sentence.
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?:\s|$)")


@dataclasses.dataclass
class Limits:
  """C4's thresholds (the paper's values); each is a --c4_NAME flag."""
  min_line_words: int = 5
  min_sentences: int = 3
  max_word_length: int = 1000


RULES = ("lorem_ipsum", "curly_bracket", "too_few_sentences")


@functools.lru_cache(maxsize=None)
def _segmenter() -> pysbd.Segmenter:
  return pysbd.Segmenter(language="en", clean=False)


def sentences(line: str) -> int:
  """The sentences of one line (at least one)."""
  if len(_SENTENCE_END.findall(line)) <= 1:
    return 1
  return max(1, len(_segmenter().segment(line)))


def check(text: str, limits: Limits,
          page: bool = True) -> tuple[str, dict, tuple[str, float] | None]:
  """(the kept lines' text, {metric: value}, (rule, value) of the failing rule or None). With
  not `page` the text is a piece of a long document: the page rule is left to the whole
  document (quality.py sums its pieces' sentences)."""
  kept, nonempty = [], 0
  for line in text.splitlines():
    line = line.strip()
    nonempty += bool(line)
    if any(len(w) > limits.max_word_length for w in line.split()):
      continue
    line = _CITATION.sub("", line).strip()
    if not line.endswith(_TERMINAL) or line.endswith(_ELLIPSIS):
      continue
    if len(line.split()) < limits.min_line_words:
      continue
    lower = line.lower()
    if "lorem ipsum" in lower:
      return text, {}, ("lorem_ipsum", 1.0)
    if "javascript" in lower:
      continue
    if "{" in line:
      return text, {}, ("curly_bracket", 1.0)
    if any(p in lower for p in _POLICY):
      continue
    kept.append(line)
  if len(kept) < limits.min_sentences:  # each line holds one or more: only here can it fail
    count = sum(map(sentences, kept))
  else:  # past the limit anyway: the cheap count of sentence ends (segmenting is ~1 ms a line)
    count = sum(max(1, len(_SENTENCE_END.findall(line))) for line in kept)
  values = {"c4_kept_lines": len(kept) / nonempty if nonempty else 0.0, "sentences": count}
  if page and count < limits.min_sentences:
    return text, values, ("too_few_sentences", float(count))
  return "\n".join(kept), values, None
