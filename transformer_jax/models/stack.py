"""The decoder's stack of Blocks: unrolled or one `nn.scan`, each block optionally rematerialized.

Unrolled, block i's parameters live under `layer_{i}`; scanned (`cfg.scan_layers`) all blocks'
parameters live under `layers`, stacked on a leading axis of size num_layers whose logical name is
"layers" (as is the KV cache's). Scanning traces and compiles one block whatever the depth.
`stack_layers` / `unstack_layers` convert parameter trees between the two layouts.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.models import layers
from transformer_jax.models import moe

ACTIVATIONS = layers.ACTIVATIONS  # what train.log_activations makes mutable (activation_metrics)
INTERMEDIATES = layers.INTERMEDIATES  # each block's output (distillation's hidden states)
STACKED = "layers"  # the scanned stack's module name and its leading axis' logical name

# What a rematerialized block keeps from its forward pass for the backward pass; the rest is
# recomputed. full: only the block's inputs. dots: every matmul without batch dimensions (the
# projections; attention scores are recomputed). outputs: the activations tagged in layers.py.
REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "outputs": jax.checkpoint_policies.save_only_these_names(*layers.SAVEABLE_NAMES),
}


def block_class(c: layers.ModelConfig):
  """layers.Block, rematerialized under `c.remat`'s policy unless it is "none"."""
  if c.remat == "none":
    return layers.Block
  # Arguments 4, 5 (self is 0) are the Python bools `deterministic` and `decode`. Inside a scan
  # the loop already keeps XLA from merging the recomputation into the forward pass.
  return nn.remat(layers.Block, policy=REMAT_POLICIES[c.remat], static_argnums=(4, 5),
                  prevent_cse=not c.scan_layers)


def layer_windows(c: layers.ModelConfig, num_layers: int) -> list[int]:
  """Each layer's sliding window: c.attention_window where c.window_pattern (cycled over the
  layers; "" = every layer) says L, 0 (global) where it says G."""
  pattern = c.window_pattern or "L"
  return [c.attention_window if pattern[i % len(pattern)] == "L" else 0
          for i in range(num_layers)]


def apply_blocks(c: layers.ModelConfig, x_BTD, positions_BT, mask_BTS, deterministic, decode, *,
                 causal=True, num_layers=None, encoded_BSD=None, cross_mask_BTS=None,
                 rel_table=None, segment_ids_BT=None):
  """Runs `num_layers` (default c.num_layers) blocks inside the calling module, which owns their
  parameters. With `encoded_BSD` every block also attends to it (an encoder-decoder's decoder);
  `rel_table` is the stack's shared relative position bias table (T5)."""
  block = block_class(c)
  num_layers = num_layers or c.num_layers
  cross = encoded_BSD is not None
  extra = (encoded_BSD, cross_mask_BTS, rel_table)
  windows = layer_windows(c, num_layers)
  if not c.scan_layers:
    for i in range(num_layers):
      x_BTD = block(c, causal=causal, cross=cross, window=windows[i], layer=i,
                    ffn=moe.MoE if moe.is_moe_layer(c, i) else None, name=f"layer_{i}")(
          x_BTD, positions_BT, mask_BTS, deterministic, decode, *extra, None, segment_ids_BT)
    return x_BTD

  def body(module, x_BTD, *args):
    return module(x_BTD, *args), None

  # One window for every layer stays static (the reference then skips key blocks); windows that
  # differ are scanned over as a traced per-layer value, as is the layer index when it seeds
  # random blocks.
  mixed, indexed = len(set(windows)) > 1, bool(c.random_blocks)
  sown = {name: 0 for name in ("moe", layers.INTERMEDIATES, layers.ATTENTION_PROBS,
                               layers.ACTIVATIONS)}
  scan = nn.scan(body, variable_axes={"params": 0, "cache": 0, **sown},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast,) * 7 + (0 if mixed else nn.broadcast, nn.broadcast,
                                                0 if indexed else nn.broadcast),
                 length=num_layers, metadata_params={nn.PARTITION_NAME: STACKED})
  x_BTD, _ = scan(block(c, causal=causal, cross=cross, window=0 if mixed else windows[0],
                        ffn=moe.MoE if c.num_experts else None, name=STACKED),
                  x_BTD, positions_BT, mask_BTS, deterministic, decode, *extra,
                  jnp.asarray(windows, jnp.int32) if mixed else None, segment_ids_BT,
                  jnp.arange(num_layers, dtype=jnp.int32) if indexed else None)
  return x_BTD


def stack_layers(params, num_layers: int):
  """Unrolled parameters (`layer_0` .. `layer_{L-1}`) -> the scanned layout (`layers`, each leaf
  stacked on a new leading axis). Other entries are kept as they are; numpy leaves stay numpy."""
  names = [f"layer_{i}" for i in range(num_layers)]
  out = {k: v for k, v in params.items() if k not in names}
  out[STACKED] = jax.tree.map(
      lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs),
      *[params[n] for n in names])
  return out


def unstack_layers(params):
  """The scanned layout -> unrolled parameters (`layer_0` .. `layer_{L-1}`); the reverse of
  stack_layers."""
  out = {k: v for k, v in params.items() if k != STACKED}
  stacked = params[STACKED]
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out


def sown_layers(sown) -> dict:
  """A collection sown by the blocks (layers.py's INTERMEDIATES, ATTENTION_PROBS, ACTIVATIONS),
  per layer: {(stack, name): [layer 0's value, layer 1's, ...]}, `stack` the modules above the
  blocks ("" in a decoder, "encoder" / "decoder" in an encoder-decoder), `name` the value's path
  inside a block (e.g. "rms", "attention/probs"). A scanned stack's values (stacked on a leading
  layer axis) are split per layer; a block that sowed twice gives its last value."""
  found = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(sown):
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    at = next((i for i, k in enumerate(keys) if k == STACKED or re.fullmatch(r"layer_\d+", k)),
              None)
    if at is None:
      continue
    layers_of = found.setdefault(("/".join(keys[:at]), "/".join(keys[at + 1:])), {})
    if keys[at] == STACKED:
      layers_of.update({i: leaf[i] for i in range(leaf.shape[0])})
    else:
      layers_of[int(keys[at][len("layer_"):])] = leaf
  return {key: [v[i] for i in sorted(v)] for key, v in found.items()}


def activation_metrics(sown) -> dict:
  """train.log_activations' metrics from the ACTIVATIONS collection: `act_rms/layer_I` and
  `act_max/layer_I` (an encoder-decoder's `act_rms/encoder/layer_I`, ...), each block's output
  RMS and max |x| over the batch, fp32 scalars."""
  out = {}
  for (where, name), values in sown_layers(sown).items():
    metric = {"rms": "act_rms", "max_abs": "act_max"}[name]
    for i, value in enumerate(values):
      out[f"{metric}/{where + '/' if where else ''}layer_{i}"] = value
  return out
