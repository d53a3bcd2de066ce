"""Weighted data mixtures (`data.mixture`): several sources, one tokenizer, one objective.

A mixture is a list of sources, each a dict:

  name         its name in metrics (`mixture_tokens`, `eval_loss/NAME`); unique, required
  weight       its share of the training rows, > 0 (normalised over the sources)
  corpus, format, text_field, source_field, target_field
               where and how to read it, as the data.* keys of the same names (a missing key
               takes data.*'s value); a `tfds:NAME` corpus is a source like any other

`data.mixture_temperature` T reshapes the weights as multilingual recipes do (XLM-R, mT5):
p_i ∝ w_i^(1/T); T = 1 keeps them, larger T flattens them towards uniform. With weights set to
the sources' sizes this is temperature sampling.

Each source runs its own pipeline (documents -> shuffle -> tokenize -> chunk -> objective ->
packed rows; pipeline.py) and grain's `IterDataset.mix` draws whole packed rows from the sources
in integer proportions, deterministically (grain picks the source that is furthest behind its
share). grain makes them integers by scaling the smallest p to 100 and truncating the others
(0.3 : 0.7 is drawn as 100 : 233): each source's `probability` is that realised share, which is
what metrics and the evaluation weights use. A source's share of the rows is exact over any
window of a few rows per source and its
share of the tokens differs from it only by its packing's padding (none with data.packing=concat).
Every row carries its source's index (`source`, int32 [seq_len]) into the train step, which sums
the non-padding tokens per source (`mixture_tokens`). The mixed iterator's state holds every
source's position by name, so a run resumes exactly (on any process count, with fixed
data.shards). Held-out evaluation reads each source's validation split on its own:
`eval_loss/NAME` per source, and `eval_loss` = sum_i p_i eval_loss/NAME, the expected loss on
the training mixture.
"""

import dataclasses
import math
import zlib

import numpy as np

from transformer_jax.config import ConfigError

SOURCE_KEY = "source"  # the per-token source index in a mixture's batches
KEYS = ("name", "weight", "corpus", "format", "text_field", "source_field", "target_field")


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  index: int
  weight: float
  asked: float  # its share after data.mixture_temperature, as given to grain's mix
  probability: float  # the share grain realises: rows / sum(rows)
  rows: int  # grain's integer proportion of `asked`
  config: object  # the whole config, its data.* keys set to this source's


def enabled(config) -> bool:
  return bool(config.data.mixture)


def _check_entry(i: int, entry) -> tuple[str, float]:
  if not isinstance(entry, dict):
    raise ConfigError(f"data.mixture[{i}]={entry!r} is not a dict with name, corpus and weight")
  name = entry.get("name")
  if not isinstance(name, str) or not name or "/" in name:
    raise ConfigError(f"data.mixture[{i}] needs a 'name' (a non-empty string without '/'), got "
                      f"{name!r}")
  unknown = sorted(set(entry) - set(KEYS))
  if unknown:
    raise ConfigError(f"data.mixture source {name!r}: unknown key(s) {', '.join(unknown)}; use "
                      f"{', '.join(KEYS)}")
  weight = entry.get("weight")
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
      math.isfinite(weight) and weight > 0):
    raise ConfigError(f"data.mixture source {name!r}: weight={weight!r} must be a number > 0")
  for key in KEYS[2:]:
    if key in entry and not isinstance(entry[key], str):
      raise ConfigError(f"data.mixture source {name!r}: {key}={entry[key]!r} must be a string")
  return name, float(weight)


MIN_SHARE = 1e-6  # the smallest share a source may have


def probabilities(weights, temperature: float) -> np.ndarray:
  """p_i ∝ w_i^(1/T), summing to 1 (in log space where a small T takes w^(1/T) past float's
  range, above it or below (0 or a subnormal: shares of 0/0, or wrong); elsewhere as before, to
  the bit: grain's integer proportions come from these)."""
  with np.errstate(over="ignore"):
    w = np.asarray(weights, np.float64) ** (1.0 / temperature)
  if not np.all(np.isfinite(w)) or np.any(w < np.finfo(np.float64).tiny):  # (or under it)
    log_w = np.log(np.asarray(weights, np.float64)) / temperature
    w = np.exp(log_w - log_w.max())
  return w / w.sum()


def sources(config) -> list[Source]:
  """The sources of data.mixture, checked (one-line errors naming the source); [] without one."""
  d = config.data
  if not d.mixture:
    return []
  if not isinstance(d.mixture, (list, tuple)):
    raise ConfigError(f"data.mixture={d.mixture!r} must be a list of dicts")
  t = d.mixture_temperature
  if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
    raise ConfigError(f"data.mixture_temperature={t!r} must be a number > 0")
  checked = [_check_entry(i, e) for i, e in enumerate(d.mixture)]
  names = [n for n, _ in checked]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ConfigError(f"data.mixture: source name(s) {', '.join(map(repr, repeated))} repeated")
  probs = probabilities([w for _, w in checked], t)
  if min(probs) < MIN_SHARE:  # (grain mixes in integer proportions of the smallest share)
    raise ConfigError(f"data.mixture_temperature={t!r} gives source "
                      f"{names[int(np.argmin(probs))]!r} a share of {min(probs):.3g}, under "
                      f"{MIN_SHARE:g}: raise the temperature (or drop the source)")
  rows = [int(p * (100 / min(probs))) for p in probs]  # as grain's mix makes them of `probs`
  out = []
  for i, (entry, (name, weight)) in enumerate(zip(d.mixture, checked)):
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.data.mixture = ()
      for key in KEYS[2:]:
        if key in entry:
          c.data[key] = entry[key]
    out.append(Source(name, i, weight, float(probs[i]), rows[i] / sum(rows), rows[i], c))
  return out


def grain_proportions(sources) -> dict:
  """What grain's IterDataset.mix is given: {name: asked share}, which it draws as `rows`."""
  return {src.name: src.asked for src in sources}


def source_seed(seed: int, name: str) -> int:
  """A source's own seed (its document shuffle and objective), from the run's seed and its name:
  reordering the sources or adding one does not change the others' data."""
  words = [seed % 2**32, zlib.crc32(name.encode("utf-8"))]
  return int(np.random.SeedSequence(words).generate_state(1)[0])


def tag(index: int):
  """A map adding the source index to a packed row (every feature of the row has its length:
  the longest feature's)."""
  def add(row: dict) -> dict:
    length = max(np.shape(v)[-1] for v in row.values())
    return {**row, SOURCE_KEY: np.full(length, index, np.int32)}
  return add


def window_tokens(names, totals) -> dict:
  """{source name: tokens} from the step's summed `mixture_tokens` vector."""
  totals = np.asarray(totals, np.float64)
  return {n: float(t) for n, t in zip(names, totals)}


def mixed_eval(per_source: dict, probs: dict) -> dict:
  """eval metrics of a mixture from each source's ({name: evaluate's dict}, {name: p}):
  `eval_loss/NAME` each, and every other figure as the p-weighted mean over the sources that
  have validation data (eval_tokens: their sum)."""
  have = {n: m for n, m in per_source.items() if m}
  if not have:
    return {}
  total = sum(probs[n] for n in have)
  out = {f"eval_loss/{n}": m["eval_loss"] for n, m in have.items()}
  keys = set.intersection(*(set(m) for m in have.values()))
  for k in sorted(keys):
    if k == "eval_tokens":
      out[k] = sum(m[k] for m in have.values())
    else:
      out[k] = sum(probs[n] * m[k] for n, m in have.items()) / total
  return out
