"""A checkpoint's fingerprint: one 32-bit checksum per array of the train state, saved beside it
and compared with the arrays a restore reads back.

Orbax and TensorStore check a checkpoint's structure and index, not its values: a byte changed
inside an array file (a disk's bit rot, a bad copy between buckets) restored silently. Each
array's checksum is sum_i mix(bits_i) * w_i mod 2**32: each element's bit pattern (widened to 32
bits) through a bijective mixer (MurmurHash3's finalizer), times an odd weight that depends on
the element's index. A change confined to one element always changes it; a reordering, or a
change spread over several elements (even the same change in each), leaves it unchanged with
probability ~2**-32. It is a sum of terms, one per element, so each device sums the blocks it
holds (one pass, no gather, no collective but one at the end) and it does not depend on the mesh,
the process count or the host that saves or restores."""

import atexit
from concurrent import futures
import functools
import threading

import jax
from jax import lax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

KEY = "fingerprint"  # the key in a checkpoint's custom metadata

_GOLDEN = 0x9E3779B1  # (2**32 / the golden ratio: spreads consecutive indices over the word)


def leaf_name(path) -> str:
  """A leaf's path as `params/layer_0/mlp/kernel`: the same for a dataclass's attribute and a
  dict's key (a full state's `.params` and a params-only read's `['params']`)."""
  return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def _bits(x: jax.Array) -> jax.Array:
  """`x`'s elements' bit patterns as uint32 (64-bit words and keys: on new last axes)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize > 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)


def _terms(block: jax.Array, offsets, strides: jax.Array) -> jax.Array:
  """The checksum's terms summed over one block of an array: the block's elements sit at
  `offsets` (one per axis of its `_bits`) in the whole array, of `_bits` strides `strides`."""
  x = _bits(block)
  for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):  # (mix: a bijection of 32 bits)
    x = (x ^ (x >> shift)) * jnp.uint32(factor)
  x = x ^ (x >> 16)
  index = jnp.zeros(x.shape, jnp.uint32)
  for axis in range(x.ndim):
    index += (lax.broadcasted_iota(jnp.uint32, x.shape, axis) + offsets[axis]) * strides[axis]
  weight = (index * jnp.uint32(_GOLDEN)) | jnp.uint32(1)
  return jnp.sum(x * weight, dtype=jnp.uint32)


_block_sum = jax.jit(_terms)  # (one block on its device: an array of another kind of sharding)


def _axes(entry) -> tuple:
  return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


@functools.lru_cache(maxsize=None)
def _mesh_sums(mesh, spec: tuple):
  """A program giving each device's sum of the terms of its block of an array sharded as
  `spec` over `mesh` (a device holding a copy that another holds first gives 0). One program
  per kind of array, not per device; no collective (programs with one, many in flight on
  XLA:CPU's gloo collectives, hung)."""
  copies = [a for a in mesh.axis_names if not any(a in _axes(e) for e in spec)]

  def local(block, strides):
    offsets = []
    for size, entry in zip(block.shape, spec):
      index = jnp.uint32(0)
      for a in _axes(entry):
        index = index * jnp.uint32(mesh.shape[a]) + lax.axis_index(a).astype(jnp.uint32)
      offsets.append(index * jnp.uint32(size))
    offsets += [jnp.uint32(0)] * (strides.shape[0] - len(offsets))
    first = jnp.all(jnp.array([lax.axis_index(a) == 0 for a in copies] or [True]))
    total = jnp.where(first, _terms(block, offsets, strides), jnp.uint32(0))
    return total.reshape((1,) * len(mesh.axis_names))
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(*spec), P()),
                               out_specs=P(*mesh.axis_names)))


def _bits_strides(x) -> np.ndarray:
  """The strides of `_bits(x)` (in elements, mod 2**32) of an array or ShapeDtypeStruct."""
  shape = jax.eval_shape(_bits, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape
  return (np.cumprod((shape + (1,))[:0:-1], dtype=np.uint64)[::-1] % 2**32).astype(np.uint32)


def _mesh_spec(x) -> tuple | None:
  """The spec (one entry per axis) of `x` (an array or ShapeDtypeStruct) when one program over
  its mesh sums it (sharded by name, each axis divisible by its shards), else None."""
  sharding = getattr(x, "sharding", None)
  if not isinstance(sharding, NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))
  if all(n % np.prod([sharding.mesh.shape[a] for a in _axes(e)], dtype=int) == 0
         for n, e in zip(x.shape, spec)):
    return spec
  return None


_compiled = {}  # (sharding, shape, dtype) -> a Future of its compiled _mesh_sums program
_compiling = threading.Lock()


def _compile(x, spec: tuple):
  return _mesh_sums(x.sharding.mesh, spec).lower(
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      jax.ShapeDtypeStruct(_bits_strides(x).shape, jnp.uint32)).compile()


def _program(x, spec: tuple):
  """The compiled program that sums arrays like `x` (its sharding, shape and dtype), compiled
  once per process by whichever thread asks first (`prepare`'s, or a save's: which then waits
  for it, or compiles it itself if that failed)."""
  key = (x.sharding, tuple(x.shape), x.dtype)
  with _compiling:
    compiled = _compiled.get(key)
    mine = compiled is None
    if mine:
      compiled = _compiled[key] = futures.Future()
  if not mine:
    try:
      return compiled.result()
    except Exception:  # pylint: disable=broad-except
      return _compile(x, spec)  # (the other thread's compile failed: here, or its own error)
  try:
    compiled.set_result(_compile(x, spec))
  except BaseException as e:  # pylint: disable=broad-except
    with _compiling:
      del _compiled[key]
    compiled.set_exception(e)
  return compiled.result()


def prepare(abstract_tree) -> threading.Thread:
  """Compiles the checksum programs of `abstract_tree`'s arrays (ShapeDtypeStructs with their
  shardings: a trainer's abstract_state) in a thread, while the first step compiles: the first
  save does not wait for them (a 2.9 s first save on a 2-core CPU blocked 0.24 s later). No
  collective; a failure is left to the save, which compiles the program itself."""
  kinds = [(x, spec) for x in jax.tree.leaves(abstract_tree)
           if (spec := _mesh_spec(x)) is not None]
  exiting = threading.Event()

  def compile_all():
    try:
      for x, spec in kinds:
        if exiting.is_set():
          break
        _program(x, spec)
    except Exception:  # pylint: disable=broad-except
      pass
    finally:
      atexit.unregister(finish)

  def finish():  # an exit while XLA compiles in the thread waits for that one compile only
    exiting.set()
    thread.join()

  thread = threading.Thread(target=compile_all, name="checksum-compiles", daemon=True)
  atexit.register(finish)
  thread.start()
  return thread


def _block_sums(x: jax.Array) -> list:
  """Sums of the terms of the blocks of `x` that this process holds the first copy of (every
  block is summed once, on one device of one process)."""
  strides = _bits_strides(x)
  if (spec := _mesh_spec(x)) is not None:
    return [s.data for s in _program(x, spec)(x, strides).addressable_shards]
  sums = []
  for shard in x.addressable_shards:
    if shard.replica_id == 0:
      starts = [s.start or 0 for s in shard.index] + [0] * (len(strides) - x.ndim)
      sums.append(_block_sum(shard.data, np.asarray(starts, np.uint32), strides))
  return sums


def _arrays(tree) -> dict:
  """{name: array} of `tree`'s jax and numpy arrays (a quantized workdir's are read as numpy)."""
  return {leaf_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)
          if isinstance(x, (jax.Array, np.ndarray))}


def _describe(x) -> str:
  return f"{x.dtype}{list(x.shape)}"


def fingerprint(tree) -> dict:
  """{leaf name: "dtype[shape] checksum"} for every array in `tree`. Every process calls it:
  each sums the blocks it holds first, then the processes add their sums (one collective)."""
  arrays = {name: x if isinstance(x, jax.Array) else jnp.asarray(x)
            for name, x in _arrays(tree).items()}
  blocks = jax.device_get([_block_sums(x) for x in arrays.values()])
  sums = np.array([sum(int(np.sum(b, dtype=np.uint64)) for b in leaf) % 2**32 for leaf in blocks],
                  np.uint64)
  if jax.process_count() > 1 and len(sums):
    sums = multihost_utils.process_allgather(sums.astype(np.uint32)).astype(np.uint64).sum(0)
  return {name: f"{_describe(x)} {int(s) % 2**32:08x}" for (name, x), s in zip(arrays.items(),
                                                                                 sums)}


def mismatch(saved: dict | None, tree) -> str:
  """The first array of `tree` whose values differ from those `saved` recorded (its name), ""
  when all agree. Every process calls it (`fingerprint`: one collective); arrays the record
  lacks, or records of another dtype or shape (a restore that casts, a model resized on load),
  are not compared, and no record (a checkpoint from before fingerprints) compares nothing."""
  ours = fingerprint(tree)
  for name in sorted(ours):
    record = str((saved or {}).get(name, ""))
    if record.rpartition(" ")[0] == ours[name].rpartition(" ")[0] and record != ours[name]:
      return name
  return ""
