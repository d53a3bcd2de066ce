"""The one mapping engine every family's table goes through (see gpt2.py, llama.py).

A family module holds data only: its config keys (CONFIG, REQUIRE, FIXED, small read/write hooks)
and parameter rows P(ours, hf, ...). Importing a row: take the HF tensor, transpose it if it is a
torch nn.Linear weight ([out, in]), pad its vocabulary axis, split its last axis among our leaves
(a packed projection such as GPT-2's c_attn) and reshape each part to our leaf's shape (e.g.
[D, H*K] -> [D, H, K]). Exporting runs the same steps backwards, so a round trip is exact.
A new family is a new table module plus one line in families(); a family with several layer
stacks (T5's encoder and decoder) lists them in STACKS instead of one LAYER table. A fused
Mixture-of-Experts tensor [E, out, in] keeps its leading expert axis (`lead`): the transpose and
the split act on each expert's matrix. A family whose checkpoints name tensors otherwise than its
rows (one tensor per expert) converts them in `complete` (read) and `to_checkpoint` (write).
"""

import dataclasses
import re
from typing import NamedTuple

import numpy as np

from transformer_jax.config import ConfigError
from transformer_jax.models import moe
from transformer_jax.models.layers import ModelConfig


class P(NamedTuple):
  """One HF tensor <-> one or more of our parameters (paths relative to the model, or to a layer
  in a family's LAYER table; space-separated when HF packs several side by side)."""
  ours: str
  hf: str
  in_axes: int = 0  # our leaf's leading axes that make the HF matrix's rows (0: a vector)
  linear: bool = False  # HF stores [out, in] (torch nn.Linear): its last two axes transposed
  vocab: int | None = None  # the [in, out] matrix's vocabulary axis: zero-padded / sliced
  when: str = ""  # "bias": only with model.use_bias; "untied": only without tie_embeddings;
  # "sentence": only with model.sentence_head (BERT's pooler and NSP head); in a layer table,
  # "moe" / "dense": only in the layers with / without the Mixture-of-Experts FFN
  lead: int = 0  # leading axes HF keeps too (a fused MoE tensor's experts: [E, out, in])


# (model config, layer index: None outside the layer tables) -> whether the row is there
WHEN = {"": lambda c, i: True, "bias": lambda c, i: c.use_bias,
        "qkv_bias": lambda c, i: c.use_bias or c.qkv_bias,
        "untied": lambda c, i: not c.tie_embeddings, "sentence": lambda c, i: c.sentence_head,
        "moe": lambda c, i: moe.is_moe_layer(c, i),
        "dense": lambda c, i: not moe.is_moe_layer(c, i)}
# ModelConfig features a family has only where its FIXED says so (BERT: embed_norm, token types;
# Mixtral and Qwen2-MoE: experts).
PLAIN = {"scale_embeddings": False, "embed_norm": False, "query_scale": 0.0, "type_vocab_size": 0,
         "attention_window": 0, "num_experts": 0, "qkv_bias": False, "global_tokens": 0,
         "random_blocks": 0}


def fixed(fam) -> dict:
  """Our model.* values every checkpoint of the family has."""
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  # e.g. BERT's type_vocab_size; READS: what the family's `read` hook sets (Mistral's window)
  read = {ours for ours, _, _ in fam.CONFIG} | set(getattr(fam, "READS", ()))
  return {**{k: v for k, v in PLAIN.items() if k in names and k not in read}, **fam.FIXED}


def stacks(fam):
  """(our layer path with {i}, cfg -> number of layers, rows) for each of the family's stacks."""
  return getattr(fam, "STACKS", None) or (("layer_{i}", lambda c: c.num_layers, fam.LAYER),)


def config_to_ours(fam, hf: dict) -> dict:
  """Our model.* values from a config.json dict; what we cannot represent is a ConfigError."""
  for key, accepted, _ in fam.REQUIRE:
    if hf.get(key, accepted[0]) not in accepted:
      raise ConfigError(f"{fam.MODEL_TYPE} checkpoint has {key}={hf[key]!r}; supported: "
                        f"{', '.join(map(repr, accepted))}")
  out = {"family": fam.MODEL_FAMILY, **fixed(fam)}
  for ours, key, default in fam.CONFIG:
    value = hf.get(key, default)
    out[ours] = 0 if value is None else value
  # the read hook sees the table's defaults where config.json is silent (yarn's max_len)
  filled = {**{key: d for _, key, d in fam.CONFIG if d is not None}, **hf}
  try:
    out.update(fam.read(filled))
  except ValueError as e:
    raise ConfigError(f"{fam.MODEL_TYPE} checkpoint: {e}") from None
  return out


def mismatches(fam, cfg) -> list[str]:
  """`KEY=VALUE (needs V)` for each of the family's fixed values this model does not have."""
  return [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in fixed(fam).items()
          if getattr(cfg, k) != v]


def config_to_hf(fam, cfg) -> dict:
  """config.json values for our resolved ModelConfig."""
  bad = mismatches(fam, cfg)
  if bad:
    raise ConfigError(f"{fam.MODEL_TYPE} cannot hold this model: {', '.join(bad)}")
  out = {"model_type": fam.MODEL_TYPE, "architectures": [fam.ARCHITECTURE], "dtype": "float32"}
  out.update({key: getattr(cfg, ours) for ours, key, _ in fam.CONFIG})
  out.update({key: value for key, _, value in fam.REQUIRE})
  try:
    out.update(fam.write(cfg))
  except ValueError as e:
    raise ConfigError(f"{fam.MODEL_TYPE} cannot hold this model: {e}") from None
  return out


# ----------------------------------------------------------------------------------- tensors
def rows(fam, cfg):
  """(our leaf paths, HF name, row) for every tensor of this model, unrolled layer names."""
  out = []
  for p in fam.GLOBAL:
    if WHEN[p.when](cfg, None):
      out.append((tuple(p.ours.split()), p.hf, p))
  for path, count, table in stacks(fam):
    for i in range(count(cfg)):
      for p in table:
        if WHEN[p.when](cfg, i):
          out.append((tuple(f"{path.format(i=i)}/{o}" for o in p.ours.split()),
                      p.hf.format(i=i), p))
  return out


# Older checkpoints' LayerNorm names (TensorFlow's, e.g. the Hub's bert-base-uncased), renamed as
# transformers renames them on load
_LEGACY_NAMES = ((".LayerNorm.gamma", ".LayerNorm.weight"), (".LayerNorm.beta", ".LayerNorm.bias"))


def canonical_names(fam, tensors: dict) -> dict:
  """Adds the base model's prefix to names saved without it (a bare GPT2Model / LlamaModel), and
  gives legacy LayerNorm.gamma / .beta their names of today."""
  keep = (fam.BASE_PREFIX,) + getattr(fam, "HEAD_PREFIXES", ("lm_head.",))
  def name(k):
    for old, new in _LEGACY_NAMES:
      k = k[:-len(old)] + new if k.endswith(old) else k
    return k if k.startswith(keep) else fam.BASE_PREFIX + k
  return {name(k): v for k, v in tensors.items()}


def from_hf_tensors(fam, cfg, tensors: dict, shapes: dict, dtype) -> dict:
  """{our path: array} (unrolled layout) from {HF name: array}; `shapes` are our leaves'."""
  tensors = canonical_names(fam, tensors)
  tensors = getattr(fam, "complete", lambda t: t)(tensors)
  if cfg.tie_embeddings:
    _check_tied(fam, cfg, tensors)
  out, used = {}, set()
  for ours, name, p in rows(fam, cfg):
    if name not in tensors:
      raise ConfigError(f"the {fam.MODEL_TYPE} checkpoint has no tensor {name}")
    used.add(name)
    x = np.asarray(tensors[name]).astype(dtype)
    x = np.swapaxes(x, -1, -2) if p.linear else x
    if p.vocab is not None:
      extra = cfg.vocab_size - x.shape[p.vocab]
      if extra < 0:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the checkpoint's "
                          f"vocabulary ({x.shape[p.vocab]})")
      x = np.pad(x, [(0, extra if a == p.vocab else 0) for a in range(x.ndim)])
    want_rows = int(np.prod(shapes[ours[0]][:p.in_axes]))
    widths = [int(np.prod(shapes[o])) // want_rows for o in ours]
    if (x.size // x.shape[-1] if x.ndim > 1 else 1) != want_rows or x.shape[-1] != sum(widths):
      raise ConfigError(f"tensor {name} has shape {list(tensors[name].shape)}, which does not "
                        f"fit model {', '.join(ours)} {[list(shapes[o]) for o in ours]}")
    for o, part in zip(ours, np.split(x, np.cumsum(widths)[:-1], axis=-1)):
      out[o] = np.ascontiguousarray(part.reshape(shapes[o]))
  ignored = [re.compile(r) for r in fam.IGNORED]
  unused = sorted(k for k in set(tensors) - used if not any(r.search(k) for r in ignored)
                  and not (k.startswith("lm_head.") and cfg.tie_embeddings))
  if unused:
    raise ConfigError(f"the {fam.MODEL_TYPE} checkpoint has {len(unused)} tensor(s) this "
                      f"model has no place for, e.g. {', '.join(unused[:3])}")
  missing = sorted(set(shapes) - set(out))
  if missing:  # a table out of step with the layer library
    raise ConfigError(f"the {fam.MODEL_TYPE} table maps nothing to {', '.join(missing[:3])}")
  return out


def _check_tied(fam, cfg, tensors: dict):
  """A tied model's checkpoint may carry its output head (fam.TIED_HEAD) too, equal to the token
  table; a different one is refused (transformers would use it, untied; ours would not)."""
  head = getattr(fam, "TIED_HEAD", "lm_head.weight")
  table = next(name for ours, name, _ in rows(fam, cfg) if "embed/tokens" in ours)
  if head in tensors and table in tensors and not np.array_equal(np.asarray(tensors[head]),
                                                                 np.asarray(tensors[table])):
    raise ConfigError(f"the {fam.MODEL_TYPE} checkpoint's {head} differs from its {table}, while "
                      f"config.json says tie_word_embeddings=true (transformers then uses the "
                      f"head untied); set tie_word_embeddings to false in config.json if the "
                      f"head is the one to keep")


def to_hf_tensors(fam, cfg, flat: dict, vocab_size: int) -> dict:
  """{HF name: float32 array} from {our path: array} (unrolled layout); the vocabulary axes are
  cut to `vocab_size` (the padded rows are dropped)."""
  out, used = {}, set()
  for ours, name, p in rows(fam, cfg):
    parts = []
    for o in ours:
      leaf = np.asarray(flat[o], np.float32)
      used.add(o)
      parts.append(leaf.reshape(int(np.prod(leaf.shape[:p.in_axes])), -1) if p.in_axes
                   else leaf.reshape(-1))
    x = np.concatenate(parts, axis=-1)
    if p.lead:
      x = x.reshape(np.shape(flat[ours[0]])[:p.lead] + (-1, x.shape[-1]))
    if p.vocab is not None:
      x = np.take(x, np.arange(vocab_size), axis=p.vocab)
    out[name] = np.ascontiguousarray(np.swapaxes(x, -1, -2) if p.linear else x)
  left = sorted(set(flat) - used)
  if left:
    raise ConfigError(f"{fam.MODEL_TYPE} has no place for parameter(s) {', '.join(left[:3])}")
  return getattr(fam, "to_checkpoint", lambda t: t)(out)
