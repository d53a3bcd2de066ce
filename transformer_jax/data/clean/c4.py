"""C4's rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", section 2.2).

Line-level first: citation markers ([1], [edit]) are cut out, and a line is dropped when it does
not end in terminal punctuation, has fewer than `min_line_words` words, mentions javascript,
holds a word longer than `max_word_length` or is cookie/privacy/terms boilerplate. Then the page:
removed when it contains "lorem ipsum" or a curly bracket, or when fewer than `min_sentences`
sentences are left. A kept page is the text of its kept lines. (C4's bad-words list is not
applied: it is a download, and this package ships no word lists.)
"""

import dataclasses
import re

_TERMINAL = (".", "!", "?", '"', "\u201d")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
           "use cookies")
_CITATION = re.compile(r"\[\d+\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?:\s|$)")  # ." and .) end one too


@dataclasses.dataclass
class Limits:
  """C4's thresholds (the paper's values); each is a --c4_NAME flag."""
  min_line_words: int = 5
  min_sentences: int = 3
  max_word_length: int = 1000


RULES = ("lorem_ipsum", "curly_bracket", "too_few_sentences")


def _keep_line(line: str, limits: Limits) -> bool:
  words = line.split()
  lower = line.lower()
  return (line.endswith(_TERMINAL) and len(words) >= limits.min_line_words
          and "javascript" not in lower and not any(p in lower for p in _POLICY)
          and all(len(w) <= limits.max_word_length for w in words))


def check(text: str, limits: Limits) -> tuple[str, dict, tuple[str, float] | None]:
  """(the kept lines' text, {metric: value}, (rule, value) of the failing rule or None)."""
  lower = text.lower()
  if "lorem ipsum" in lower:
    return text, {}, ("lorem_ipsum", 1.0)
  if "{" in text:
    return text, {}, ("curly_bracket", 1.0)
  lines = [_CITATION.sub("", line).strip() for line in text.splitlines()]
  kept = [line for line in lines if line and _keep_line(line, limits)]
  nonempty = sum(1 for line in lines if line)
  cleaned = "\n".join(kept)
  sentences = len(_SENTENCE_END.findall(cleaned))
  values = {"c4_kept_lines": len(kept) / nonempty if nonempty else 0.0, "sentences": sentences}
  if sentences < limits.min_sentences:
    return text, values, ("too_few_sentences", float(sentences))
  return cleaned, values, None
