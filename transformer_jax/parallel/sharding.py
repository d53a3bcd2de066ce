"""The device mesh and the logical -> mesh axis rules. Model code never names a mesh axis."""

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.config import base

MESH_AXES = config_lib.MESH_AXIS_NAMES


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """The data x fsdp x tensor mesh. One slice: jax.make_mesh (it orders devices along the ICI
  topology). Several (mesh.dcn_* > 1): each axis is dcn outer x ici inner, so devices of one
  slice are contiguous along every axis and only the dcn_* part of an axis crosses slices."""
  devices = devices if devices is not None else jax.devices()
  ici, dcn = config_lib.mesh_ici_dcn_shape(config.mesh, len(devices))
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if math.prod(dcn.values()) == 1:
    shape = tuple(ici[a] for a in MESH_AXES)
    if config.mesh.get("allow_split_physical_axes", False):
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  grid = hybrid_device_grid(ici, dcn, devices,
                            split=config.mesh.get("allow_split_physical_axes", False))
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def hybrid_device_grid(ici: dict, dcn: dict, devices, split: bool = False) -> np.ndarray:
  """Devices in an array of shape ici * dcn per axis. Slices are the devices' slice_index (TPU
  multi-slice), else their processes (several hosts), else consecutive blocks of devices (one
  process: simulated slices, for tests)."""
  ici_shape, dcn_shape = [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES]
  slices = math.prod(dcn_shape)
  # (CPU and GPU devices of several processes all say slice 0: those are grouped by process)
  by_slice = len({getattr(d, "slice_index", 0) for d in devices}) > 1
  if by_slice or len({d.process_index for d in devices}) > 1:
    try:
      return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                  process_is_granule=not by_slice,
                                                  allow_split_physical_axes=split)
    except ValueError as e:
      granule = "slice_index" if by_slice else "process_index"
      found = len({getattr(d, granule) for d in devices})
      raise ConfigError(f"mesh.dcn_* = {slices} slices but the devices "
                        f"have {found} distinct {granule} values ({e})") from None
  per_slice = len(devices) // slices
  blocks = np.empty(dcn_shape, dtype=object)
  for i, index in enumerate(np.ndindex(*dcn_shape)):
    blocks[index] = np.asarray(devices[i * per_slice:(i + 1) * per_slice],
                               dtype=object).reshape(ici_shape)
  return np.block(blocks.tolist())


def rules(config, mesh=None):
  """The rules table as a tuple of (logical name, mesh axes or None), checked against the mesh
  axes. With `mesh`, kv_heads stays whole where its mesh axes do not divide the model's
  key/value heads (MQA, or GQA under a wider mesh.tensor: every device holds every key/value
  head, as the attention's activations already do: mesh_axes), instead of a refusal."""
  bad = [r for r in config.sharding_rules
         if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str))]
  if bad:  # (unpacked below: a TypeError traceback)
    raise ConfigError(f"sharding_rules: {bad[0]!r} is not a (logical axis, mesh axes) pair, "
                      f"e.g. ('embed', 'fsdp') or ('mlp', ('tensor', 'sequence'))")
  table = tuple((name, tuple(a) if isinstance(a, list) else a)
                for name, a in config.sharding_rules)
  names = [name for name, _ in table]
  known = [name for name, _ in base.SHARDING_RULES]
  for name in names:  # a misspelled name is no rule at all; a repeated one: the first wins
    if name not in known:
      raise ConfigError(f"sharding_rules: {name!r} is not a logical axis; they are "
                        f"{', '.join(known)}")
    if names.count(name) > 1:
      raise ConfigError(f"sharding_rules: {name!r} has {names.count(name)} rules (only the "
                        f"first would apply); give each logical axis one")
  for name, axes in table:
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(f"sharding_rules: rule for {name!r} names mesh axis {axis!r}; "
                          f"mesh axes are {', '.join(MESH_AXES)}")
  if mesh is not None:
    kv_heads = config.model.num_kv_heads or config.model.num_heads
    table = tuple((name, None if name == "kv_heads" and kv_heads % math.prod(
        mesh.shape[a] for a in _names(axes)) else axes) for name, axes in table)
  return table


@contextlib.contextmanager
def context(mesh, rule_table):
  """Mesh + rules for tracing: activations' logical constraints resolve inside it."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rule_table):
    yield


def shardings(abstract_tree, mesh, rule_table):
  """NamedShardings for a (boxed, logically partitioned) abstract tree, e.g. from eval_shape."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rule_table)


def check_divisible(abstract_tree, shardings_tree, mesh, vocab_size: int = 0):
  """Every sharded dimension must divide evenly; names the parameter and the rule if not (and,
  for the vocabulary, the padding that fixes it)."""
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_tree))
  sh_leaves = jax.tree_util.tree_leaves(shardings_tree)
  for (path, leaf), sharding in zip(leaves, sh_leaves):
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
      if dim % size:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        pad = (f", or pad model.vocab_size to {round_up(dim, size)} with "
               f"model.output_vocab={dim} (the padded ids are never predicted)"
               if dim == vocab_size else "")
        raise ConfigError(f"parameter {name} dim {dim} is not divisible by mesh axes {axes} "
                          f"(size {size}); change the mesh or sharding_rules{pad}")


def batch_sharding(mesh, rule_table) -> NamedSharding:
  """Rows over the axes the rules give `act_batch`, tokens over `act_length`'s (mesh.sequence)."""
  spec = nn.logical_to_mesh_axes(("act_batch", "act_length"), rule_table)
  return NamedSharding(mesh, P(*spec))


def round_up(n: int, multiple: int) -> int:
  """The least multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


def length_multiple(mesh, rule_table) -> int:
  """What a batch's length must be a multiple of: twice the shards of `act_length` (ring
  attention's zigzag halves, models/ring.py), or 1 when tokens are not sharded."""
  spec = nn.logical_to_mesh_axes(("act_length",), rule_table)[0]
  shards = math.prod(mesh.shape[a] for a in _names(spec))
  return 2 * shards if shards > 1 else 1


DATA = "data"  # the data-parallel mesh axis (its outer part spans slices: mesh.dcn_data)


def _names(axes) -> tuple:
  return tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a is not None)


def without_axis(rule_table, axis: str):
  """The rules with mesh `axis` taken out of every entry (for code vmapped over that axis)."""
  out = []
  for name, axes in rule_table:
    kept = tuple(a for a in _names(axes) if a != axis)
    out.append((name, kept if len(kept) > 1 else (kept[0] if kept else None)))
  return tuple(out)


def rows_own_data_axis(mesh, batch_sharding, *trees) -> bool:
  """Whether each data shard can run its own rows (vmapped over it): mesh axis data has more
  than one device and is the rows' outermost mesh axis, and no array of `trees` (shardings or
  sharded arrays) is split over it."""
  if mesh.shape[DATA] == 1 or _names(batch_sharding.spec[0])[:1] != (DATA,):
    return False
  specs = [getattr(x, "spec", None) or getattr(getattr(x, "sharding", None), "spec", ())
           for tree in trees for x in jax.tree.leaves(tree)]
  return not any(DATA in _names(axes) for spec in specs for axes in spec)
