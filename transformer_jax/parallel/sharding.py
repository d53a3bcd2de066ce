"""The device mesh and the logical -> mesh axis rules. Model code never names a mesh axis."""

import contextlib

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  devices = devices if devices is not None else jax.devices()
  sizes = config_lib.mesh_shape(config.mesh, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules(config):
  """The rules table as a tuple of (logical name, mesh axes or None), checked against the mesh."""
  table = tuple((name, tuple(a) if isinstance(a, list) else a)
                for name, a in config.sharding_rules)
  for name, axes in table:
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(f"sharding_rules: rule for {name!r} names mesh axis {axis!r}; "
                          f"mesh axes are {', '.join(MESH_AXES)}")
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


def check_divisible(abstract_tree, shardings_tree, mesh):
  """Every sharded dimension must divide evenly; names the parameter and the rule if not."""
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_tree))
  sh_leaves = jax.tree_util.tree_leaves(shardings_tree)
  for (path, leaf), sharding in zip(leaves, sh_leaves):
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
      if dim % size:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        raise ConfigError(f"parameter {name} dim {dim} is not divisible by mesh axes {axes} "
                          f"(size {size}); change the mesh or sharding_rules")


def batch_sharding(mesh, rule_table) -> NamedSharding:
  """Rows over the axes the rules give `act_batch`; the sequence dimension replicated."""
  spec = nn.logical_to_mesh_axes(("act_batch", None), rule_table)
  return NamedSharding(mesh, P(*spec))
