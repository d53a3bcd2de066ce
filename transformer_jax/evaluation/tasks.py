"""Downstream task kinds read from JSONL (local or gs://): what each asks the model and how it is
scored.

A task is a JSONL file, one example per line; its kind is recognized from its fields or named
(`KIND:PATH`):

  multiple_choice  {"context", "choices", "label"}  acc, acc_norm (log-likelihood of each choice
                   after the context; acc_norm divides by the choice's length in characters, as
                   lm-eval does)
  cloze            {"text"} (LAMBADA): the last word after the rest; acc (greedy would write it)
                   and perplexity (exp of the mean negative log-likelihood of the word)
  perplexity       {"text"}: the documents' rolling log-likelihood; perplexity per token,
                   bits_per_byte (tokenizers compare), byte_perplexity
  generation       {"source", "target"}: greedy generation; exact_match, bleu, chrf (sacrebleu)
  summarization    {"document", "summary"}: greedy generation after the document and "TL;DR:"
                   (GPT-2's cue; an encoder-decoder reads the document alone); rouge1, rouge2,
                   rougeLsum F-measures x 100 (Google's `rouge-score`, Porter stemming)
  passkey          {"length", "depth"[, "key"]}: passkey.py's prompts; acc (all rows) and
                   acc_lenN_depthD (the rows of length N and depth D, e.g. acc_len80_depth0.5)

`{"text"}` alone is read as perplexity; name cloze tasks `cloze:PATH`. Few-shot examples come from
the task's train split (NAME_train.jsonl or NAME.train.jsonl next to NAME.jsonl, or a given file),
drawn with a fixed seed per example, so prompts are deterministic.

A TFDS dataset is a task too: `[KIND:]tfds:NAME[/CONFIG][@SPLIT]` (default split validation, else
test; few-shot examples from its train split), prepared under the run's data.data_dir the first
time. Any SPEC may end with `?OURS=THEIRS&...` to read a field under another name, e.g.
`multiple_choice:tfds:hellaswag@validation?context=ctx&choices=endings`.
"""

import dataclasses
import math
import os
import re
import types
from typing import Callable

import numpy as np

from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import corpus
from transformer_jax.evaluation import passkey

SHOT_SEPARATOR = "\n\n"
SUMMARY_CUE = "\nTL;DR:"  # what a decoder reads between the document and its summary (GPT-2)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeLsum")


@dataclasses.dataclass(frozen=True)
class Kind:
  """One task kind: the fields an example needs and the request builder / metric function."""
  name: str
  fields: tuple
  fewshot: bool = True


KINDS = {k.name: k for k in (
    Kind("multiple_choice", ("context", "choices", "label")),
    Kind("generation", ("source", "target")),
    Kind("summarization", ("document", "summary")),
    Kind("passkey", ("length", "depth"), fewshot=False),
    Kind("perplexity", ("text",), fewshot=False),
    Kind("cloze", ("text",)),
)}


@dataclasses.dataclass
class Task:
  name: str
  kind: str
  path: str
  examples: list
  train: list = dataclasses.field(default_factory=list)


def _read_jsonl(path: str) -> list:
  if not paths.isfile(path):  # (local or gs://)
    raise ConfigError(f"task file {path!r} {paths.not_a_file(path)}")
  return [row for _, _, row in corpus.json_lines(path, "task file ")]


def recognize(row: dict, path: str) -> str:
  """The kind whose fields the first example has (the first that fits, in KINDS' order)."""
  for kind in KINDS.values():
    if all(f in row for f in kind.fields):
      return kind.name
  wanted = "; ".join(f"{k.name}: {', '.join(k.fields)}" for k in KINDS.values())
  raise ConfigError(f"{path}: cannot tell the task kind from fields {sorted(row)} (want {wanted}"
                    f"; or name it as KIND:PATH)")


TEXT_FIELDS = ("context", "source", "target", "document", "summary", "text")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check(task: Task, rows: list, where: str):
  fields = KINDS[task.kind].fields
  for n, row in enumerate(rows, 1):
    missing = [f for f in fields if f not in row]
    if missing:
      raise ConfigError(f"{where}: example {n} lacks field(s) {', '.join(missing)} "
                        f"(a {task.kind} task needs {', '.join(fields)})")
    texts = [f for f in fields if f in TEXT_FIELDS and not isinstance(row[f], str)]
    if texts:  # (a number reached the tokenizer or a string concatenation: a traceback)
      raise ConfigError(f"{where}: example {n}'s {texts[0]} is {row[texts[0]]!r}, not a string")
    row.update({f: corpus.valid_text(row[f]) for f in fields if f in TEXT_FIELDS})
    if task.kind == "multiple_choice" and not (
        isinstance(row["choices"], list) and row["choices"]
        and all(isinstance(c, str) for c in row["choices"])
        and _is_int(row["label"]) and 0 <= row["label"] < len(row["choices"])):
      raise ConfigError(f"{where}: example {n} needs a non-empty list of string choices and an "
                        f"integer label indexing it")
    if task.kind == "multiple_choice":
      row["choices"] = [corpus.valid_text(c) for c in row["choices"]]
      empty = [k for k, c in enumerate(row["choices"]) if not c]
      if empty:  # no token to score: log p 0, above every real choice (lm-eval refuses it too)
        raise ConfigError(f"{where}: example {n}'s choice {empty[0]} is "
                          f"{row['choices'][empty[0]]!r}: a choice needs text to score")
    if task.kind == "passkey" and not (
        _is_int(row["length"]) and row["length"] >= 0 and isinstance(row["depth"], (int, float))
        and not isinstance(row["depth"], bool) and 0 <= row["depth"] <= 1
        and (row.get("key") is None or _is_int(row["key"]))):
      raise ConfigError(f"{where}: example {n} needs an integer length >= 0, a depth in [0, 1] "
                        f"and an integer key if any (got length={row['length']!r}, "
                        f"depth={row['depth']!r})")
    if task.kind == "cloze" and len(str(row["text"]).strip().split()) < 2:
      raise ConfigError(f"{where}: example {n}'s text needs at least two words")
  if task.kind == "perplexity" and rows and not any(row["text"] for row in rows):
    raise ConfigError(f"{where}: every text is empty: nothing to score (its perplexity was "
                      f"1.0, a perfect score of nothing)")


DECODER_KINDS = ("perplexity", "passkey")  # a text scored from its first token: no source


def check_family(task: Task, family: str):
  """A task the model of model.family `family` can be asked ("" = not known yet)."""
  if family == "encdec" and task.kind in DECODER_KINDS:
    raise ConfigError(f"task {task.name!r} is a {task.kind} task, which scores a decoder's text "
                      f"from its first token; this model is an encoder-decoder "
                      f"(model.family=encdec): use a decoder, or a task with a source")


def train_split(path: str) -> str:
  """The default few-shot file of a task: NAME_train.jsonl or NAME.train.jsonl beside it."""
  stem = path[:-len(".jsonl")] if path.endswith(".jsonl") else path
  for candidate in (f"{stem}_train.jsonl", f"{stem}.train.jsonl"):
    if paths.isfile(candidate):
      return candidate
  return ""


def _renames(spec: str) -> tuple[str, dict]:
  """SPEC?OURS=THEIRS&... -> (SPEC, {ours: theirs})."""
  spec, sep, query = spec.partition("?")
  renames = {}
  for item in query.split("&") if sep else ():
    ours, eq, theirs = item.partition("=")
    if not (eq and ours and theirs):
      raise ConfigError(f"task {spec!r}: {item!r} is not OURS=THEIRS (a field read under another "
                        f"name)")
    renames[ours] = theirs
  return spec, renames


def _read_tfds(spec: str, data_dir: str, limit: int) -> tuple[list, Callable | None]:
  """(examples, a reader of its train examples or None) of a TFDS dataset
  `tfds:NAME[/CONFIG][@SPLIT]`; the train split is read only if few-shot asks for it."""
  from transformer_jax.data import tfds_text  # pylint: disable=g-import-not-at-top
  name, _, split = spec.partition("@")
  try:  # downloaded and prepared once, as ArrayRecord
    prepared = tfds_text.prepare(types.SimpleNamespace(corpus=name, data_dir=data_dir))
  except ConfigError as e:
    raise ConfigError(f"task {spec!r}: {e}") from None
  splits = prepared.info.splits
  split = split or next((s for s in ("validation", "test") if s in splits), "")
  if split not in splits:
    raise ConfigError(f"task {spec!r}: no split {split!r} (it has {', '.join(splits)})")
  def read(which, n=0):
    source = prepared.as_data_source(split=which)
    return [_plain(source[i]) for i in range(min(len(source), n) if n > 0 else len(source))]
  has_train = "train" in splits and split != "train"
  return read(split, limit), (lambda: read("train")) if has_train else None


def _plain(record: dict) -> dict:
  """A TFDS record as JSON-like values: text for bytes, lists for arrays, numbers."""
  def plain(v):
    if isinstance(v, bytes):
      return v.decode("utf-8")
    if isinstance(v, np.ndarray):
      return [plain(x) for x in v.tolist()] if v.ndim else plain(v.item())
    if isinstance(v, np.generic):
      return v.item()
    if isinstance(v, list):
      return [plain(x) for x in v]
    return v
  return {k: plain(v) for k, v in record.items()}


def load(spec: str, *, num_fewshot: int = 0, fewshot_file: str = "", limit: int = 0,
         data_dir: str = "", family: str = "") -> Task:
  """A task from SPEC ([KIND:]PATH or [KIND:]tfds:NAME[@SPLIT], optionally ?OURS=THEIRS&...),
  checked; its train split when few-shot is asked and a model.family `family` model reads it.
  data_dir: where TFDS datasets are prepared."""
  spec, renames = _renames(spec)
  kind, sep, path = spec.partition(":")
  if sep and kind not in KINDS and kind.isidentifier() and not path.startswith("//") and (
      kind != "tfds" and not paths.isfile(spec)):  # (was: "task file 'KIND:...' does not exist")
    raise ConfigError(f"task {spec!r}: {kind!r} is no task kind (KIND:PATH takes "
                      f"{', '.join(KINDS)})")
  if not sep or kind not in KINDS:
    kind, path = "", spec
  is_tfds = path.startswith(corpus.TFDS_PREFIX)
  rows, train = _read_tfds(path, data_dir, limit) if is_tfds else (_read_jsonl(path), None)
  rename = lambda rows: [{**r, **{o: r[t] for o, t in renames.items() if t in r}} for r in rows]  # pylint: disable=unnecessary-lambda-assignment
  rows = rename(rows)
  if not rows:
    raise ConfigError(f"task file {path!r} holds no examples")
  kind = kind or recognize(rows[0], path)
  read = KINDS[kind].fields + ("key",) * (kind == "passkey")
  unknown = [ours for ours in renames if ours not in read]
  if unknown:  # (ignored: the task ran on the fields it found)
    raise ConfigError(f"task {spec!r}: ?{unknown[0]}= names no field a {kind} task reads "
                      f"({', '.join(read)})")
  name = (path[len(corpus.TFDS_PREFIX):].partition("@")[0].replace("/", "_") if is_tfds
          else os.path.basename(path))
  name = name[:-len(".jsonl")] if name.endswith(".jsonl") else name
  task = Task(name=name, kind=kind, path=path, examples=rows[:limit] if limit > 0 else rows)
  _check(task, task.examples, path)
  if num_fewshot > 0 and takes_fewshot(kind, family):
    train_file = fewshot_file or ("" if is_tfds else train_split(path))
    if not train_file and not train:
      raise ConfigError(f"--num_fewshot={num_fewshot} needs {name}'s train split (NAME_train.jsonl "
                        f"beside {path}, or a TFDS train split) or --fewshot_file")
    train = _read_jsonl(train_file) if train_file else rename(train())
    task.train = train
    _check(task, task.train, train_file or f"{path} train split")
    if len(task.train) < num_fewshot:
      raise ConfigError(f"{train_file or path + ' train split'} holds {len(task.train)} "
                        f"examples, fewer than --num_fewshot={num_fewshot}")
  return task


# ------------------------------------------------------------------------- prompts
def join(context: str, continuation: str) -> tuple[str, str]:
  """(context, continuation) with a space between them unless either side has whitespace there
  (lm-eval's target_delimiter " " for contexts and choices without it)."""
  if context and continuation and not context[-1].isspace() and not continuation[0].isspace():
    continuation = " " + continuation
  return context, continuation


def _split_last_word(text: str) -> tuple[str, str]:
  """(context, " last word"): cut before the whitespace that ends the context (a space, a tab
  or a line break); a text of one word is all continuation."""
  text = text.rstrip()
  match = re.search(r"\s\S+$", text)
  cut = match.start() if match else 0
  return text[:cut], text[cut:]


def _answered(kind: str, row: dict) -> str:
  """A train example written out with its answer (one shot of a few-shot prompt)."""
  if kind == "multiple_choice":
    return "".join(join(row["context"], row["choices"][row["label"]]))
  if kind == "generation":
    return "".join(join(row["source"], row["target"]))
  if kind == "summarization":
    return "".join(join(row["document"] + SUMMARY_CUE, row["summary"]))
  return row["text"].rstrip()


def fewshot_prefix(task: Task, index: int, k: int, seed: int = 0) -> str:
  """The k answered train examples before example `index`'s prompt: drawn without replacement
  by a generator seeded with (seed, index), skipping a train example equal to the example."""
  if k <= 0 or not task.train:
    return ""
  rng = np.random.default_rng([seed, index])
  order = rng.permutation(len(task.train))
  me = task.examples[index]
  picked = [task.train[i] for i in order if task.train[i] != me][:k]
  return "".join(_answered(task.kind, row) + SHOT_SEPARATOR for row in picked)


# ------------------------------------------------------------------------- running
def takes_fewshot(kind: str, family: str = "") -> bool:
  """Whether a `kind` task on a model.family `family` model reads --num_fewshot's examples: not
  a passkey or perplexity task, and not an encoder-decoder's generation or summarization (its
  encoder reads the source alone)."""
  return KINDS[kind].fewshot and not (
      family == "encdec" and kind in ("generation", "summarization"))


def uses_fewshot(task: Task, lm) -> bool:
  """takes_fewshot for `task` on `lm` (a scoring.TextModel)."""
  return takes_fewshot(task.kind, "encdec" if lm.is_seq2seq else "")


def run(task: Task, lm, *, num_fewshot: int = 0, seed: int = 0) -> dict:
  """The task's metrics with `lm` (scoring.TextModel: loglikelihood, loglikelihood_rolling,
  generate, ids_loglikelihood)."""
  return RUNNERS[task.kind](task, lm, num_fewshot, seed)


def _loglikelihood(task, lm, pairs, examples: list[str]) -> list[tuple[float, bool]]:
  """lm.loglikelihood(pairs); a pair it cannot score (an answer longer than the model) is a
  one-line error naming the task and `examples[i]`, pair i's example ("example N[ choice K]")."""
  try:
    return lm.loglikelihood(pairs)
  except ConfigError as e:
    if getattr(e, "request", None) is None:
      raise
    raise ConfigError(f"task {task.name!r} ({task.path}), {examples[e.request]}: {e}") from None


def _multiple_choice(task, lm, k, seed):
  pairs, examples = [], []
  for i, row in enumerate(task.examples):
    prefix = fewshot_prefix(task, i, k, seed)
    pairs += [join(prefix + row["context"], choice) for choice in row["choices"]]
    examples += [f"example {i + 1} choice {c}" for c in range(len(row["choices"]))]
  scores = [ll for ll, _ in _loglikelihood(task, lm, pairs, examples)]
  acc = acc_norm = 0
  at = 0
  for row in task.examples:
    n = len(row["choices"])
    ll = np.array(scores[at:at + n])
    lengths = np.array([float(len(c)) for c in row["choices"]])
    acc += int(np.argmax(ll) == row["label"])
    acc_norm += int(np.argmax(ll / np.maximum(lengths, 1.0)) == row["label"])
    at += n
  n = len(task.examples)
  return {"acc": acc / n, "acc_norm": acc_norm / n}


def _exp(nats: float) -> float:
  """A perplexity: e^nats, capped at e^700 (~1e304; float64 overflows past e^709). A cap of e^50
  cut an untrained model's per-word cloze perplexity, 1e35, to 5e21."""
  return float(math.exp(min(float(nats), 700.0)))


def _cloze(task, lm, k, seed):
  pairs = [_split_last_word(fewshot_prefix(task, i, k, seed) + row["text"])
           for i, row in enumerate(task.examples)]
  out = _loglikelihood(task, lm, pairs, [f"example {i + 1}" for i in range(len(pairs))])
  lls = np.array([ll for ll, _ in out])
  return {"acc": float(np.mean([g for _, g in out])),
          "perplexity": _exp(-lls.mean())}


def _perplexity(task, lm, k, seed):
  del k, seed
  texts = [row["text"] for row in task.examples]
  lls, counts = zip(*lm.loglikelihood_rolling(texts, with_counts=True))
  total, tokens = float(sum(lls)), int(sum(counts))
  n_bytes = sum(len(t.encode("utf-8")) for t in texts)
  return {"perplexity": _exp(-total / max(tokens, 1)),
          "bits_per_byte": -total / max(n_bytes, 1) / math.log(2),
          "byte_perplexity": _exp(-total / max(n_bytes, 1))}


def _generation(task, lm, k, seed):
  prompts, targets = [], []
  for i, row in enumerate(task.examples):
    if lm.is_seq2seq:  # the source alone is the encoder's input
      prompts.append(row["source"])
    else:  # the model writes the target's leading space (lm-eval's generate_until): a prompt
      # ending in a lone " " token would ask for the target's rarer no-space tokens
      prompts.append(fewshot_prefix(task, i, k, seed) + row["source"])
    targets.append(str(row["target"]))
  outs = [o.strip() for o in lm.generate(prompts, until=["\n"], max_new_tokens=max(
      len(lm.encode(t)) for t in targets) + 8)]
  exact = float(np.mean([o == t.strip() for o, t in zip(outs, targets)]))
  metrics = {"exact_match": exact}
  try:
    import sacrebleu  # pylint: disable=g-import-not-at-top
  except ImportError:
    return metrics  # exact match only; `pip install sacrebleu` for BLEU and chrF
  metrics["bleu"] = float(sacrebleu.corpus_bleu(outs, [targets]).score)
  metrics["chrf"] = float(sacrebleu.corpus_chrf(outs, [targets]).score)
  return metrics


def _sentence_lines(text: str) -> str:
  """One sentence per line (rougeLsum's summary-level LCS is over lines, as the published
  CNN/DailyMail scores split them): at line breaks and after . ! ? followed by whitespace."""
  return "\n".join(s for line in text.splitlines()
                   for s in re.split(r"(?<=[.!?])\s+", line.strip()) if s)


def _summarization(task, lm, k, seed):
  from rouge_score import rouge_scorer  # pylint: disable=g-import-not-at-top
  prompts = [row["document"] if lm.is_seq2seq else
             fewshot_prefix(task, i, k, seed) + row["document"] + SUMMARY_CUE
             for i, row in enumerate(task.examples)]
  targets = [str(row["summary"]) for row in task.examples]
  outs = [o.strip() for o in lm.generate(prompts, until=[SHOT_SEPARATOR], max_new_tokens=max(
      len(lm.encode(t)) for t in targets) + 8)]
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  scores = [scorer.score(_sentence_lines(t), _sentence_lines(o)) for o, t in zip(outs, targets)]
  return {r: 100.0 * float(np.mean([s[r].fmeasure for s in scores])) for r in ROUGE_TYPES}


def passkey_key(row: dict, rng) -> int:
  """A passkey row's key: its own (0 too: it read as none), else a seeded 5-digit one."""
  return int(row["key"]) if row.get("key") is not None else int(rng.integers(10_000, 100_000))


def _passkey(task, lm, k, seed):
  del k
  check_family(task, lm.config.model.family)
  rng = np.random.default_rng(seed)
  pairs = []
  for row in task.examples:
    key = passkey_key(row, rng)
    pairs.append(passkey.example(lm.tokenizer, int(row["length"]), float(row["depth"]), key))
    prompt, answer = pairs[-1]
    if len(prompt) + len(answer) - 1 > lm.max_len:  # scoring would cut its start
      shortest = len(passkey.example(lm.tokenizer, 0, 0.0, key)[0])  # the needle and question
      fix = (f"use lengths up to {lm.max_len - len(answer) + 1}"
             if shortest + len(answer) - 1 <= lm.max_len else
             f"its needle and question alone take {shortest}: the model is too short for it")
      raise ConfigError(f"passkey length={row['length']} needs {len(prompt)} prompt tokens, more "
                        f"than model.max_len={lm.max_len} can score whole (the start, and a "
                        f"needle near it, would be cut off); {fix}")
  found = [g for _, g in lm.ids_loglikelihood(pairs)]
  at = {}  # (length, depth) -> whether each of its rows' key was found
  for row, g in zip(task.examples, found):
    at.setdefault((int(row["length"]), float(row["depth"])), []).append(g)
  return {"acc": float(np.mean(found)),
          **{f"acc_len{n}_depth{d:g}": float(np.mean(at[n, d])) for n, d in sorted(at)}}


RUNNERS: dict[str, Callable] = {"multiple_choice": _multiple_choice, "cloze": _cloze,
                                "perplexity": _perplexity, "generation": _generation,
                                "summarization": _summarization, "passkey": _passkey}
