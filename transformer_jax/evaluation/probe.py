"""Linear probes (`inspect probe`): multinomial logistic regression on the frozen, mean-pooled
hidden states of each layer of the residual stream (the embedding's output, then each block's),
trained on one split of a labelled JSONL file and scored on a held-out split.

The probe is an L2-regularised softmax regression on standardised features (the training split's
mean and deviation), fitted full-batch with Adam for every layer at once (vmapped). An
encoder-decoder is probed on its encoder.
"""

import functools
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import corpus
from transformer_jax.data import objectives
from transformer_jax.evaluation import harness
from transformer_jax.evaluation import interpret
from transformer_jax.evaluation import scoring
from transformer_jax.models import families
from transformer_jax.parallel import sharding


def read_labelled(path: str, field: str = "text", label_field: str = "label",
                  limit: int = 0) -> tuple[list, list]:
  """(texts, labels) of a JSONL file whose lines are objects with `field` (a string) and
  `label_field` (any JSON scalar); one-line errors for anything else."""
  if not path or not paths.isfile(path):  # (a local file or a gs:// object)
    raise ConfigError(f"--data={path!r} {paths.not_a_file(path) if path else 'is empty'} (a "
                      f"JSONL file of labelled texts)")
  texts, labels = [], []
  with paths.path(path).open("rb") as raw:  # (invalid UTF-8: U+FFFD; newlines as open's)
    for n, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        raise ConfigError(f"{path} line {n} is not JSON") from None
      missing = [k for k in (field, label_field) if not isinstance(row, dict) or k not in row]
      if missing:
        raise ConfigError(f"{path} line {n} lacks field(s) {', '.join(missing)} (set "
                          f"--field / --label_field)")
      if not isinstance(row[field], str) or isinstance(row[label_field], (dict, list)):
        raise ConfigError(f"{path} line {n}: {field} must be a string and {label_field} a "
                          "scalar")
      texts.append(corpus.valid_text(row[field]))  # (a lone surrogate escape: U+FFFD)
      labels.append(row[label_field])
      if limit and len(texts) >= limit:
        break
  if len(texts) < 4 or len(set(map(json.dumps, labels))) < 2:
    raise ConfigError(f"{path} needs at least 4 examples and 2 labels (got {len(texts)} "
                      f"examples, {len(set(map(json.dumps, labels)))} labels)")
  return texts, labels


def features(trainer, params, tokenizer, texts, *, batch_size: int = 0,
             ids=None) -> np.ndarray:
  """float32 [layers, N, D]: each text's residual stream at every layer, mean-pooled over its
  tokens (an encoder-decoder's encoder; a prefix LM reads the text as its prefix). `ids`: the
  texts' interpret.encode, when the caller has them."""
  config, model = trainer.config, families.for_inference(trainer.model)  # as scoring runs it
  encdec = config.model.family == "encdec"
  if ids is None:
    ids = [interpret.encode(config, tokenizer, t) for t in texts]
  ids = [list(i) for i in ids]
  rows = harness.batch_rows(trainer, batch_size or 8)
  out = []
  for start in range(0, len(ids), rows):
    chunk = ids[start:start + rows]
    length = scoring.bucket(max(map(len, chunk)), int(config.model.max_len),
                            sharding.length_multiple(trainer.mesh, trainer.rules))
    tokens, segments, positions = interpret.row_arrays(chunk, length, rows)
    arrays = (tokens, segments, positions)
    if encdec:  # the encoder's inputs in the model's INPUTS order; the decoder is not run
      arrays = (tokens, tokens[:, :1], segments, positions, segments[:, :1], positions[:, :1])
    arrays = tuple(jax.device_put(a, trainer.batch_sharding) for a in arrays)
    prefix = None  # a prefix LM reads each text as its prefix, both ways (as a prompt)
    if objectives.flag(config.data, "PREFIX"):
      prefix = jax.device_put((segments > 0).astype(np.int32), trainer.batch_sharding)
    with sharding.context(trainer.mesh, trainer.rules):
      _, embedded, sown = interpret.forward(model, params, arrays, probs=False,
                                            encoder_only=encdec, prefix_BT=prefix)
    stream = interpret.residual_stream(embedded, sown, "encoder" if encdec else "")
    pooled = jax.device_get(_pool(jnp.stack(stream), jnp.asarray(segments)))
    out.append(pooled[:, :len(chunk)])
  return np.concatenate(out, axis=1)


@jax.jit
def _pool(x_LBTD, segments_BT):
  w_BT = (segments_BT > 0).astype(jnp.float32)
  total = jnp.einsum("LBTD,BT->LBD", x_LBTD.astype(jnp.float32), w_BT)
  return total / jnp.maximum(jnp.sum(w_BT, axis=1), 1.0)[None, :, None]


def split(labels, holdout: float, seed: int, texts=None) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) indices, stratified: of each label's texts (a seeded permutation),
  round(holdout x count) are held out, keeping at least one of each in training, so the held-out
  split has the labels' proportions; at least one text is held out in all. Equal `texts` go to
  one side together, under the first one's label (the probe would remember them: random labels,
  every line twice, scored 1.0 held out): give the ids the model reads (tuples of
  interpret.encode), so that texts alike up to model.max_len, read as the same ids, are kept
  together too (grouped by their raw text they scored 0.7-0.9 held out on random labels)."""
  if not 0 < holdout < 1:
    raise ConfigError(f"--holdout must be in (0, 1), got {holdout}")
  if len(labels) < 2:
    raise ConfigError(f"a probe needs at least 2 labelled examples, got {len(labels)}")
  copies = {}  # text (or ids) -> its indices (each index its own when no texts are given)
  for i, text in enumerate(range(len(labels)) if texts is None else texts):
    copies.setdefault(text, []).append(i)
  units = list(copies.values())
  keys = np.asarray([json.dumps(labels[unit[0]]) for unit in units])
  counts = {k: int(np.sum(keys == k)) for k in set(keys)}
  if max(counts.values()) < 2:  # nothing to train a held-out label on (chance read 1.0)
    raise ConfigError(f"every label has one distinct text ({len(units)} texts): a probe needs "
                      f"at least 2 texts of a label (is --label_field right?)")
  rng = np.random.default_rng(seed)
  train, test = [], []
  for key in sorted(counts):
    members = rng.permutation(np.flatnonzero(keys == key))
    cut = min(int(round(holdout * len(members))), len(members) - 1)
    test.extend(members[:cut])
    train.extend(members[cut:])
  if not test:  # every label too rare to hold one out: hold out one of the commonest
    common = max(counts, key=lambda k: (counts[k], k))
    test.append(next(u for u in train if keys[u] == common))
    train.remove(test[0])
  def expand(chosen):
    return np.sort(np.asarray([i for u in chosen for i in units[u]], np.int64))
  return expand(train), expand(test)


@functools.partial(jax.jit, static_argnames=("classes", "steps"))
def _fit(x_LND, y_N, classes: int, steps: int, l2: float, learning_rate: float):
  """Per layer: softmax regression weights [D, C] and bias [C] minimising mean cross-entropy +
  l2 * |W|^2 by full-batch Adam."""
  tx = optax.adam(learning_rate)

  def one(x_ND):
    params = (jnp.zeros((x_ND.shape[1], classes)), jnp.zeros((classes,)))

    def loss(p):
      logits = x_ND @ p[0] + p[1][None]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_N)
      return jnp.mean(ce) + l2 * jnp.sum(jnp.square(p[0]))

    def step(carry, _):
      p, state = carry
      grads = jax.grad(loss)(p)
      updates, state = tx.update(grads, state, p)
      return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params

  return jax.vmap(one)(x_LND)


def fit(features_LND, labels, *, holdout: float = 0.25, seed: int = 0, steps: int = 300,
        l2: float = 1e-3, learning_rate: float = 0.05, layer_names=None, texts=None) -> dict:
  """Trains one probe per layer on the training split (split's: equal `texts`, best the ids the
  model reads, stay on one side); per layer its held-out and train accuracy, with the held-out
  split's majority-class fraction as chance."""
  x = np.asarray(features_LND, np.float32)
  keys = [json.dumps(v) for v in labels]
  classes = sorted(set(keys))
  y = np.asarray([classes.index(k) for k in keys], np.int32)
  train, test = split(labels, holdout, seed, texts)
  mean = x[:, train].mean(axis=1, keepdims=True)
  std = x[:, train].std(axis=1, keepdims=True) + 1e-6
  x = (x - mean) / std
  w, b = _fit(jnp.asarray(x[:, train]), jnp.asarray(y[train]), len(classes), steps, l2,
              learning_rate)
  pred = np.asarray(jnp.argmax(jnp.einsum("LND,LDC->LNC", x, w) + b[:, None], axis=-1))
  names = layer_names or interpret.layer_names(x.shape[0])
  rows = [{"layer": name, "heldout_accuracy": float(np.mean(pred[i, test] == y[test])),
           "train_accuracy": float(np.mean(pred[i, train] == y[train]))}
          for i, name in enumerate(names)]
  chance = float(np.max(np.bincount(y[test], minlength=len(classes))) / len(test))
  return {"layers": rows, "chance": chance, "classes": len(classes),
          "train_examples": int(len(train)), "heldout_examples": int(len(test))}
