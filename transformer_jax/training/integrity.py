"""A checkpoint's fingerprint: one 32-bit checksum per array of the train state, saved beside it
and compared with the arrays a restore reads back.

Orbax and TensorStore check a checkpoint's structure and index, not its values: a byte changed
inside an array file (a disk's bit rot, a bad copy between buckets) restored silently. Each
array's checksum is sum_i mix(bits_i) * w_i mod 2**32: each element's bit pattern (widened to 32
bits) through a bijective mixer (MurmurHash3's finalizer), times an odd weight that depends on
the element's index. A change confined to one element always changes it; a reordering, or a
change spread over several elements (even the same change in each), leaves it unchanged with
probability ~2**-32. It is computed on the devices, over the arrays as they are sharded (one
pass, no gather), so it does not depend on the mesh, the process count or the host that saves or
restores."""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

KEY = "fingerprint"  # the key in a checkpoint's custom metadata

_GOLDEN = 0x9E3779B1  # (2**32 / the golden ratio: spreads consecutive indices over the word)


def leaf_name(path) -> str:
  """A leaf's path as `params/layer_0/mlp/kernel`: the same for a dataclass's attribute and a
  dict's key (a full state's `.params` and a params-only read's `['params']`)."""
  return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def _checksum(x: jax.Array) -> jax.Array:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize > 4:  # (64-bit words: two 32-bit words each, on a new last axis)
    x = lax.bitcast_convert_type(x, jnp.uint32)
  else:
    x = lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
  for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):  # (mix: a bijection of 32 bits)
    x = (x ^ (x >> shift)) * jnp.uint32(factor)
  x = x ^ (x >> 16)
  index = jnp.zeros(x.shape, jnp.uint32)
  for axis, size in enumerate(x.shape):
    index = index * jnp.uint32(size) + lax.broadcasted_iota(jnp.uint32, x.shape, axis)
  weight = (index * jnp.uint32(_GOLDEN)) | jnp.uint32(1)
  return jnp.sum(x * weight, dtype=jnp.uint32)


# One program per kind of leaf (dtype, shape, sharding), not one for the whole state, which
# repeats a few kinds many times: GPT-2 small's train state (593 leaves, 11 kinds) took 15.6 s
# on a 2-core CPU the first time as one program (its compile), 1.6 s this way; then 1.7 s and
# 0.3 s a call (configs/gpt2.py:small with model.vocab_size=8192, its state filled with ones).
_checksum_jit = jax.jit(_checksum)


def _checksums(leaves: list) -> list:
  return [_checksum_jit(x) for x in leaves]


def _arrays(tree) -> dict:
  """{name: array} of `tree`'s jax and numpy arrays (a quantized workdir's are read as numpy)."""
  return {leaf_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)
          if isinstance(x, (jax.Array, np.ndarray))}


def _describe(x) -> str:
  return f"{x.dtype}{list(x.shape)}"


def fingerprint(tree) -> dict:
  """{leaf name: "dtype[shape] checksum"} for every array in `tree` (every process calls it:
  sharded arrays are summed across the processes that hold them)."""
  arrays = _arrays(tree)
  sums = jax.device_get(_checksums(list(arrays.values())))
  return {name: f"{_describe(x)} {int(np.asarray(s)):08x}"
          for (name, x), s in zip(arrays.items(), sums)}


def mismatch(saved: dict | None, tree) -> str:
  """The first array of `tree` whose values differ from those `saved` recorded (its name), ""
  when all agree. Every process calls it (the checksums are a collective); arrays the record
  lacks, or records of another dtype or shape (a restore that casts, a model resized on load),
  are not compared, and no record (a checkpoint from before fingerprints) compares nothing."""
  ours = fingerprint(tree)
  for name in sorted(ours):
    record = str((saved or {}).get(name, ""))
    if record.rpartition(" ")[0] == ours[name].rpartition(" ")[0] and record != ours[name]:
      return name
  return ""
