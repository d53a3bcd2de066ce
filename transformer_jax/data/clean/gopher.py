"""Gopher's document quality rules (Rae et al. 2021, "Scaling Language Models", appendix A.1).

Two groups, both whole-document: the quality rules (word count, mean word length, symbol-to-word
ratio, bullet and ellipsis lines, words with a letter, stop words) and the repetition rules
(duplicate lines and paragraphs, by count and by characters; the share of characters in the most
frequent 2-, 3- and 4-gram; the share in duplicated 5- to 10-grams). `check(text, limits)`
evaluates them in that order, cheap ones first, and stops at the first that fails.

The paper names no tokenizer and no line or paragraph rule; the choices here, where datatrove's
implementation reads it otherwise: words are whitespace tokens that are not all punctuation
(datatrove: spaCy tokens, punctuation included, which it then counts as words without a
letter); a stop word may touch punctuation ("(the"), case aside; blank lines are no lines;
paragraphs split at blank lines of any ending (CRLF, spaces); character shares divide by the
characters of the items compared.
"""

import collections
import dataclasses
import itertools
import re
import string
from collections.abc import Iterator

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("\u2022", "\u2023", "\u25e6", "\u2043", "\u2219", "-", "*", "\u00b7")
ELLIPSES = ("...", "\u2026")
_PUNCTUATION = re.compile(r"^[\W_]+$")  # (an underscore is punctuation: "__________" no word)
# blank lines: CRLF, or holding any whitespace (spaces, an HTML page's NBSP, U+3000, ...)
_PARAGRAPHS = re.compile(r"\r?\n(?:[^\S\r\n]*\r?\n)+")
_QUOTES = string.punctuation + "\u201c\u201d\u2018\u2019\u00ab\u00bb"  # stripped for stop words


@dataclasses.dataclass
class Limits:
  """Gopher's thresholds (the paper's values); each is a --flag of the same name."""
  min_words: int = 50
  max_words: int = 100_000
  min_mean_word_length: float = 3.0
  max_mean_word_length: float = 10.0
  max_symbol_word_ratio: float = 0.1  # '#' or ellipses per word
  max_bullet_lines: float = 0.9  # share of lines starting with a bullet
  max_ellipsis_lines: float = 0.3  # share of lines ending with an ellipsis
  min_alpha_words: float = 0.8  # share of words with at least one letter
  min_stop_words: int = 2  # distinct STOP_WORDS present
  max_duplicate_lines: float = 0.3  # share of lines that repeat an earlier line
  max_duplicate_paragraphs: float = 0.3
  max_duplicate_line_chars: float = 0.2  # share of characters in repeated lines
  max_duplicate_paragraph_chars: float = 0.2
  max_top_2gram: float = 0.2  # share of characters in the most frequent 2-gram
  max_top_3gram: float = 0.18
  max_top_4gram: float = 0.16
  max_duplicate_5gram: float = 0.15  # share of characters in duplicated 5-grams
  max_duplicate_6gram: float = 0.14
  max_duplicate_7gram: float = 0.13
  max_duplicate_8gram: float = 0.12
  max_duplicate_9gram: float = 0.11
  max_duplicate_10gram: float = 0.10


# rule -> the metric it reads, for the report's histograms (rule names are the removal reasons)
RULES = ("word_count", "mean_word_length", "symbol_word_ratio", "bullet_lines", "ellipsis_lines",
         "alpha_words", "stop_words", "duplicate_lines", "duplicate_paragraphs",
         "duplicate_line_chars", "duplicate_paragraph_chars",
         *(f"top_{n}gram" for n in (2, 3, 4)), *(f"duplicate_{n}gram" for n in range(5, 11)))


def _share(part: float, whole: float) -> float:
  return part / whole if whole else 0.0


def _duplicates(items: list[str]) -> tuple[float, float]:
  """(share of items that repeat an earlier one, share of characters in those repeats)."""
  seen, count, chars = set(), 0, 0
  for item in items:
    if item in seen:
      count += 1
      chars += len(item)
    else:
      seen.add(item)
  return _share(count, len(items)), _share(chars, sum(map(len, items)))


def _top_ngram(words: list[str], n: int, total_chars: int) -> float:
  """Share of characters covered by the most frequent n-gram (0 when none repeats); among
  equally frequent ones the largest share, so the order of a document's passages changes
  nothing."""
  grams = collections.Counter(zip(*(words[i:] for i in range(n))))
  if not grams:
    return 0.0
  count = max(grams.values())  # of the most frequent, the longest: not the first one seen
  chars = max(sum(map(len, g)) for g, c in grams.items() if c == count)
  return _share(count * chars, total_chars) if count > 1 else 0.0


def _duplicate_ngrams(words: list[str], n: int, total_chars: int, ends: list[int]) -> float:
  """Share of characters in n-grams that repeat an earlier one, scanning left to right and
  skipping past each repeat (so overlapping repeats count once). `ends[i]`: the characters
  of words[:i]."""
  grams = list(zip(*(words[i:] for i in range(n))))
  if len(set(grams)) == len(grams):
    return 0.0  # nothing repeats (the common case): no scan
  seen, chars, i = set(), 0, 0
  while i < len(grams):
    gram = grams[i]
    if gram in seen:
      chars += ends[i + n] - ends[i]
      i += n
    else:
      seen.add(gram)
      i += 1
  return _share(chars, total_chars)


def _metrics(text: str, limits: Limits) -> Iterator[tuple[str, float, bool]]:
  """(rule, measured value, passes) for each rule in order, computed lazily."""
  tokens = text.split()
  words = [w for w in tokens if not _PUNCTUATION.match(w)]
  n = len(words)
  yield "word_count", n, limits.min_words <= n <= limits.max_words
  mean = _share(sum(map(len, words)), n)
  yield ("mean_word_length", mean,
         limits.min_mean_word_length <= mean <= limits.max_mean_word_length)
  symbols = max(text.count("#"), sum(text.count(e) for e in ELLIPSES))
  yield "symbol_word_ratio", _share(symbols, n), _share(symbols, n) <= limits.max_symbol_word_ratio
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  bullets = _share(sum(line.startswith(BULLETS) for line in lines), len(lines))
  yield "bullet_lines", bullets, bullets <= limits.max_bullet_lines
  ellipses = _share(sum(line.endswith(ELLIPSES) for line in lines), len(lines))
  yield "ellipsis_lines", ellipses, ellipses <= limits.max_ellipsis_lines
  alpha = _share(sum(1 for w in words if any(c.isalpha() for c in w)), n)  # "½", "²" are no letters
  yield "alpha_words", alpha, alpha >= limits.min_alpha_words
  stops = len(STOP_WORDS.intersection(w.lower().strip(_QUOTES) for w in words))  # "(the"
  yield "stop_words", stops, stops >= limits.min_stop_words
  yield from _repetition(text, lines, words, limits)


def _repetition(text, lines, words, limits) -> Iterator[tuple[str, float, bool]]:
  line_share, line_chars = _duplicates(lines)
  paragraphs = [p.strip() for p in _PARAGRAPHS.split(text) if p.strip()]
  para_share, para_chars = _duplicates(paragraphs)
  yield "duplicate_lines", line_share, line_share <= limits.max_duplicate_lines
  yield "duplicate_paragraphs", para_share, para_share <= limits.max_duplicate_paragraphs
  yield "duplicate_line_chars", line_chars, line_chars <= limits.max_duplicate_line_chars
  yield ("duplicate_paragraph_chars", para_chars,
         para_chars <= limits.max_duplicate_paragraph_chars)
  ends = list(itertools.accumulate(map(len, words), initial=0))
  total = ends[-1]
  for n in (2, 3, 4):
    value = _top_ngram(words, n, total)
    yield f"top_{n}gram", value, value <= getattr(limits, f"max_top_{n}gram")
  for n in range(5, 11):
    # No repeated 5-gram means no longer repeat either: the rest are 0 without a look.
    value = _duplicate_ngrams(words, n, total, ends) if n == 5 or value else 0.0
    yield f"duplicate_{n}gram", value, value <= getattr(limits, f"max_duplicate_{n}gram")


def check(text: str, limits: Limits) -> tuple[dict, tuple[str, float] | None]:
  """({rule: value} for the rules evaluated, (rule, value) of the first failing rule or None)."""
  values = {}
  for rule, value, passes in _metrics(text, limits):
    values[rule] = value
    if not passes:
      return values, (rule, value)
  return values, None
