"""Local downstream tasks made from a code corpus (default: the embedded stdlib corpus), so that
evaluation needs no download:

  python -m transformer_jax.evaluation.corpus_tasks --out=runs/eval_tasks [--corpus=stdlib]
      [--format=text|jsonl] [--text_field=text] [--examples=200] [--seed=0]
      [--validation_fraction=0.02]

writes into OUT (a folder, or gs://BUCKET/PATH):
  next_line.jsonl (+ next_line_train.jsonl)  multiple choice: after up to 6 lines of a source
      file, which of 4 lines comes next (the real one, 3 lines of other files)
  last_word.jsonl (+ last_word_train.jsonl)  cloze: up to 4 lines whose last word is predicted
  heldout_text.jsonl                          perplexity: held-out documents (first 2,000 chars)
Test examples come from the documents training holds out (tfds_text.held_out_split: those whose
hash is below the validation fraction, else the one of smallest hash), train examples from the
rest: give the corpus as training reads it (data.corpus, data.format, data.text_field; a JSONL
corpus read as text was one document per file, JSON and all). The next-line and last-word tasks
take lines of 8 to 80 characters (code; prose in long paragraphs gives none: refused).
"""

import json
import os
import random
import re

from transformer_jax import cli
from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import tfds_text

CONTEXT_LINES = 6
WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{2,}$")


def _good(line: str) -> bool:
  s = line.strip()
  return 8 <= len(s) <= 80 and not s.startswith("#")


def _per_doc(n: int, docs) -> int:
  """Examples per document: enough for n in all (at least 2, so the draw stays varied)."""
  return max(2, -(-2 * n // max(len(docs), 1)))


def _lines(docs) -> list:
  return [(doc_id, line) for doc_id, text in docs for line in text.splitlines() if _good(line)]


def next_line(docs, n: int, rng: random.Random, spare=()) -> list:
  """Multiple-choice examples: context lines, the real next line and 3 distractors, lines of the
  other documents of `docs`, else of `spare` (other (id, text) documents: one held-out document
  has no other lines); a question without 3 is left out (it scored acc 1.0 with one choice)."""
  pool, spare = _lines(docs), _lines(spare)
  out = []
  for doc_id, text in docs:
    lines = text.splitlines()
    spots = [i for i in range(1, len(lines)) if _good(lines[i])]
    for i in rng.sample(spots, min(_per_doc(n, docs), len(spots))):
      context = "\n".join(lines[max(0, i - CONTEXT_LINES):i]) + "\n"
      wrong = _distractors(pool, doc_id, lines[i], rng)
      if len(wrong) < 3 and spare:
        wrong = list(dict.fromkeys(wrong + _distractors(spare, doc_id, lines[i], rng)))[:3]
      if len(wrong) < 3:
        continue
      choices = [lines[i]] + wrong
      rng.shuffle(choices)
      out.append({"id": doc_id, "context": context, "choices": choices,
                  "label": choices.index(lines[i])})
  rng.shuffle(out)
  return out[:n]


def _distractors(pool, doc_id: str, line: str, rng: random.Random) -> list:
  """Up to 3 distinct lines of other documents than `doc_id`, none equal to `line`."""
  others = [other for d, other in rng.sample(pool, min(len(pool), 64)) if d != doc_id]
  return list(dict.fromkeys(other for other in others if other != line))[:3]


def last_word(docs, n: int, rng: random.Random) -> list:
  """Cloze examples: up to 4 lines ending in an identifier-like word of 3+ characters."""
  out = []
  for doc_id, text in docs:
    lines = text.splitlines()
    spots = [i for i in range(1, len(lines)) if " " in lines[i].strip() and _good(lines[i])
             and WORD.match(lines[i].rstrip().rsplit(" ", 1)[-1])]
    for i in rng.sample(spots, min(_per_doc(n, docs), len(spots))):
      out.append({"id": doc_id, "text": "\n".join(lines[max(0, i - 3):i + 1]).rstrip()})
  rng.shuffle(out)
  return out[:n]


def write(path: str, rows: list):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def make(out: str, corpus: str = "stdlib", examples: int = 200, seed: int = 0,
         validation_fraction: float = 0.02, fmt: str = "text", text_field: str = "text") -> dict:
  """Writes the tasks into `out`; returns {file name: examples written}."""
  if fmt not in ("text", "jsonl"):  # (a document of one line has no next line nor context)
    raise ConfigError(f"--format={fmt!r}: expected text or jsonl (documents of several lines)")
  docs = list(corpus_lib.iter_documents(corpus, fmt, text_field))
  held, _, _ = tfds_text.held_out_split(docs, validation_fraction)  # training's validation split
  held_ids = {doc_id for doc_id, _ in held}
  train = [(doc_id, text) for doc_id, text in docs if doc_id not in held_ids]
  rng = random.Random(seed)
  train = rng.sample(train, min(len(train), 400))
  files = {"next_line.jsonl": next_line(held, examples, rng, spare=train),
           "next_line_train.jsonl": next_line(train, examples, rng),
           "last_word.jsonl": last_word(held, examples, rng),
           "last_word_train.jsonl": last_word(train, examples, rng),
           "heldout_text.jsonl": [{"id": d, "text": t[:2000]} for d, t in held[:examples]]}
  if not files["next_line.jsonl"] and not files["last_word.jsonl"]:
    raise ConfigError(f"--corpus={corpus!r} (--format={fmt}) gives no next-line or last-word "
                      f"example: they need held-out documents ({len(held)} here) of two lines or "
                      f"more, lines of 8 to 80 characters")
  with paths.local_folder(out) as folder:  # (a gs:// OUT: written here, then uploaded)
    for name, rows in files.items():
      write(os.path.join(folder, name), rows)
  return {name: len(rows) for name, rows in files.items()}


def main(argv):
  spec, overrides, f = cli.parse(argv, {
      "out": "runs/eval_tasks", "corpus": "stdlib", "format": "text", "text_field": "text",
      "examples": 200, "seed": 0, "validation_fraction": 0.02})
  if spec or overrides:  # (they were ignored)
    raise ConfigError("corpus_tasks takes no --config: give --corpus, --format, --text_field and "
                      "--validation_fraction as the training config's data.* has them")
  if f["examples"] < 1 or not 0 <= f["validation_fraction"] < 1:  # (nan too; as training's)
    raise ConfigError(f"need --examples >= 1 and 0 <= --validation_fraction < 1 (got "
                      f"{f['examples']} and {f['validation_fraction']})")
  cli.output_folder("out", f["out"])
  for name, n in make(f["out"], f["corpus"], f["examples"], f["seed"], f["validation_fraction"],
                      f["format"], f["text_field"]).items():
    print(f"{paths.join(f['out'], name)}: {n} examples")


if __name__ == "__main__":
  cli.entry(main)
