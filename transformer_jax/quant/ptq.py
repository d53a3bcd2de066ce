"""Post-training quantization of a parameter tree: int8 with one absmax scale per output channel,
or int4 with one per output channel and group of `group_size` input rows (qwix does the math).

Every matmul weight is first seen as [lead..., in, out]: its stacked axes (a scanned stack's
"layers", MoE's "expert") lead, the axes a matmul contracts are flattened into `in` and the others
into `out` (`layout`). An embedding table is contracted over its width when tied to the output
(x @ table^T), so its rows are its channels. Vectors (norms), biases (also [heads, head_dim]) and
MoE routers stay in their float type. A quantized leaf is stored as {"qvalue": int8 [lead..., in,
out] (int4: two values a byte, uint8), "scale": float32 [lead..., in / group, out]}; its
dequantized value is qvalue * scale, within half a step (scale / 2) of the original.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from transformer_jax.config import ConfigError
from transformer_jax.models import families

MODES = {"int8": jnp.int8, "int4": jnp.int4}  # mode -> qwix's qtype
DEFAULT_GROUP = {"int8": 0, "int4": 32}  # --group_size=0: per channel (int8), 32 rows (int4)
STACKED = ("layers", "expert")  # logical axes of stacked weights: scales per slice
TABLES = ("tokens", "positions", "types")  # lookup tables: contracted over their last axis
KEEP = ("router",)  # MoE routers: top-k decisions are kept exact


def check(mode: str, group_size: int) -> int:
  """The group size `mode` uses (0 = a whole input channel); one-line errors for the rest."""
  if mode not in MODES:
    raise ConfigError(f"--mode={mode!r} is not one of {', '.join(MODES)}")
  if group_size < 0:
    raise ConfigError(f"--group_size must be >= 0 (0 = the mode's default), got {group_size}")
  return group_size or DEFAULT_GROUP[mode]


def layout(path: str, names: tuple):
  """(lead, in, out) axis indices of the weight at `path` (its logical axis `names`), or None
  for a leaf kept in float."""
  lead = tuple(i for i, n in enumerate(names) if n in STACKED)
  rest = [i for i in range(len(names)) if i not in lead]
  key = path.rsplit("/", 1)[-1]
  if len(rest) < 2 or key in KEEP or key.endswith("bias"):
    return None
  if key in TABLES:
    n_in = len(rest) - 1
    return lead, tuple(rest[n_in:]), tuple(rest[:n_in])
  n_in = 2 if key == "out" and len(rest) == 3 else 1  # attention's out [H, K, D]
  return lead, tuple(rest[:n_in]), tuple(rest[n_in:])


def canonical_shape(shape, lay) -> list:
  """[lead..., in, out] of a weight of `shape` with layout `lay`."""
  lead, ins, outs = lay
  return [shape[a] for a in lead] + [math.prod(shape[a] for a in ins),
                                     math.prod(shape[a] for a in outs)]


def _canonical(w, lay):
  return jnp.transpose(w, sum(lay, ())).reshape(canonical_shape(w.shape, lay))


def _original(canon, lay, shape):
  perm = sum(lay, ())
  return canon.reshape([shape[a] for a in perm]).transpose(np.argsort(perm))


def quantize_leaf(w, lay, mode: str, group: int, path: str = "") -> dict:
  """{"qvalue", "scale"} of one weight (see the module docstring)."""
  canon = _canonical(jnp.asarray(w, jnp.float32), lay)
  n_lead, size_in = len(lay[0]), canon.shape[-2]
  if group and size_in % group:
    raise ConfigError(f"--group_size={group} does not divide the input dimension {size_in} of "
                      f"{path or 'a weight'}")
  tiled = {n_lead: group} if group and group != size_in else {}
  q = qwix.quantize(canon, MODES[mode], channelwise_axes=tuple(range(n_lead)) + (n_lead + 1,),
                    tiled_axes=tiled)
  qvalue = q.qvalue.astype(jnp.int8)
  return {"qvalue": _pack4(qvalue) if mode == "int4" else qvalue, "scale": q.scale}


def dequantize_leaf(stored: dict, lay, shape, dtype):
  """The weight of `shape` and `dtype` that `stored` (quantize_leaf's) represents."""
  canon_shape = canonical_shape(shape, lay)
  qvalue = jnp.asarray(stored["qvalue"])
  if qvalue.dtype == jnp.uint8:
    qvalue = _unpack4(qvalue, math.prod(canon_shape))
  q = qwix.QArray(qvalue.reshape(canon_shape), jnp.asarray(stored["scale"], jnp.float32))
  return _original(qwix.dequantize(q), lay, shape).astype(dtype)


def _pack4(q):
  """int8 values in [-8, 7] -> uint8, two a byte (low nibble first), flattened."""
  flat = q.reshape(-1)
  flat = jnp.pad(flat, (0, flat.size % 2)).astype(jnp.uint8) & 0xF
  return flat[0::2] | (flat[1::2] << 4)


def _unpack4(packed, n: int):
  nibbles = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)[:n]
  return ((nibbles.astype(jnp.int8) ^ 8) - 8).astype(jnp.int8)


def _walk(tree, fn, path=""):
  """fn(path, leaf) over a nested dict's leaves, keeping its structure."""
  if isinstance(tree, dict):
    return {k: _walk(v, fn, f"{path}/{k}" if path else k) for k, v in tree.items()}
  return fn(path, tree)


def _lookup(tree, path: str):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def quantize_tree(params, names, mode: str, group: int) -> dict:
  """The stored form of `params` (nested dicts); `names`: each leaf's logical axis names."""
  def one(path, w):
    lay = layout(path, _lookup(names, path))
    return np.asarray(w) if lay is None else jax.device_get(
        quantize_leaf(w, lay, mode, group, path))
  return _walk(params, one)


def dequantize_tree(stored, abstract, names):
  """Parameters shaped like `abstract` (ShapeDtypeStructs) from quantize_tree's output."""
  def one(path, a):
    node, lay = _lookup(stored, path), layout(path, _lookup(names, path))
    if lay is None:
      return jnp.asarray(node, a.dtype)
    return dequantize_leaf(node, lay, a.shape, a.dtype)
  return _walk(abstract, one)


def nbytes(tree) -> int:
  """Bytes of every array in `tree`."""
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def axis_names(model) -> dict:
  """Each parameter's logical axis names (nested dicts of tuples), from `model`'s init."""
  boxed = jax.eval_shape(
      lambda: model.init(jax.random.key(0), *families.init_inputs(model))["params"])
  return _walk(boxed, lambda _, b: tuple(b.names) if isinstance(b, nn.Partitioned)
               else (None,) * len(b.shape))
