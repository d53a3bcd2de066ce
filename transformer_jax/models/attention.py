"""Attention implementations behind one interface, picked by `model.attention_impl` and platform.

  xla          `reference`: the reference (einsums, fp32 scores, ops.masked_softmax, causal
               key-block skipping; the backward's matmuls in the compute dtype); serves every
               layer
  dot_product  jax.nn.dot_product_attention(implementation="xla"): any mask, bias, GQA, decoding
  cudnn        the same with implementation="cudnn" (cuDNN flash attention): CUDA GPU, bf16
  splash       Pallas TPU splash attention: causal or full self-attention within packed segments;
               no bias; lengths a multiple of 128
  auto         TPU: splash, GPU: cudnn, for each layer they serve (auto's splash: causal
               self-attention only, see `choose`); xla for the rest

`choose` resolves the setting for one attention call at trace time (it knows the platform and the
shapes), before anything is compiled: "auto" falls back to xla where the kernel cannot serve the
call, an explicit kernel raises a one-line ConfigError instead (config.validate already refuses the
combinations a config alone shows: splash with relative positions, encoder-decoders or a prefix
LM; cudnn without bfloat16). KV-cache decoding (one token at a time, tiny) always uses xla for
splash and cudnn, so a workdir trained with them still samples.

A sliding window (`window` W > 0, per layer: model.attention_window and model.window_pattern)
keeps the keys j with |i - j| < W for query i: with a causal mask the W most recent keys, the
query's own included (Mistral's sliding window). The reference then attends block by block to
the previous and current key blocks only (O(T W), not O(T^2)); splash uses its LocalMask;
cudnn its own sliding window when causal (else the mask); dot_product takes it in the mask. A
window that varies inside a scanned stack (a mixed window_pattern with scan_layers) is a traced
value: a mask for every kernel but splash.

Layouts follow layers.py (`mask` builds the masks every family uses): q_BTNGK (already scaled),
k_BSNK, v_BSNK, mask_BTS (True = attend), bias_BNGTS (added to the scores). Query head
h = n * G + g uses key/value head n, as in jax.nn.dot_product_attention's and splash's
grouped-query layouts.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib

from transformer_jax.config import ConfigError
from transformer_jax.models import ops
from transformer_jax.models import ring as ring_lib

KERNELS = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}  # platform -> auto's kernel
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the sequence length is used


def unsupported(impl, where, q_BTNGK, k_BSNK, bias_BNGTS, self_attention: bool, window=0,
                sparse: bool = False):
  """Why kernel `impl` cannot serve this call on platform `where`, or None if it can."""
  t, s, k = q_BTNGK.shape[1], k_BSNK.shape[1], q_BTNGK.shape[-1]
  if wrong := wrong_platform(impl, where):
    return wrong
  if impl == "splash":
    if sparse:
      return "takes no global tokens or random blocks (model.global_tokens, random_blocks)"
    if not isinstance(window, int):
      return ("takes no per-layer window inside a scanned stack (model.window_pattern with "
              "scan_layers)")
    if bias_BNGTS is not None:
      return "takes no attention bias (model.position=relative)"
    if not self_attention:
      return "serves self-attention only (no cross-attention)"
    if t % SPLASH_BLOCKS[-1]:
      return f"needs a sequence length divisible by {SPLASH_BLOCKS[-1]}, got {t}"
  if impl == "cudnn":
    if q_BTNGK.dtype not in (jnp.bfloat16, jnp.float16):
      return f"needs model.dtype=bfloat16, got {q_BTNGK.dtype}"
    limit = cudnn_head_dim_limit()
    if k % 8 or k > limit:
      return f"needs a head dim <= {limit} divisible by 8, got {k}"
    if t % 2 or s % 2:  # cuDNN trains with a bias only at even lengths; the mask is one
      return f"needs even query and key lengths, got {t} and {s}"
  return None


def wrong_platform(impl: str, where: str) -> str | None:
  """Why kernel `impl` cannot run on platform `where` at all (None if it can, or is no kernel):
  known from the devices, so a run is refused before its data is prepared."""
  if impl == "splash" and where != "tpu":
    return f"needs a TPU (compiling for {where})"
  if impl == "cudnn" and where not in ("gpu", "cuda"):
    return f"needs a CUDA GPU (compiling for {where})"
  return None


def cudnn_head_dim_limit() -> int:
  """The largest head dim jax's cuDNN flash attention takes: 256 when this process's GPU is a
  Hopper or later (compute capability 9.0+), else 128, as jax itself decides (from the local
  GPU: an AOT compile on a machine without one gets 128 too)."""
  try:
    gpus = jax.local_devices(backend="gpu")
  except RuntimeError:  # no GPU backend in this process
    return 128
  capability = str(getattr(gpus[0], "compute_capability", "0")) if gpus else "0"
  return 256 if int(capability.split(".")[0]) >= 9 else 128


def choose(impl: str, q_BTNGK, k_BSNK, bias_BNGTS=None, *, causal: bool, self_attention: bool,
           decode: bool, where: str | None = None, window=0, sparse: bool = False) -> str:
  """The implementation ("xla", "dot_product", "cudnn" or "splash") for one attention call.
  `causal`: the Attention layer's promise that its mask is causal; `self_attention`: keys come
  from the queries' own sequence (no cross-attention). Auto's splash also needs `causal`: a
  non-causal self-attention mask may be a prefix LM's, which segment ids cannot express."""
  if impl in ("xla", "dot_product"):
    return impl
  if decode:  # KV-cache steps attend from a few tokens: nothing for a kernel to gain
    return "xla"
  where = where or ops.platform()
  if impl == "auto":
    kernel = KERNELS.get(where)
    if kernel is None or (kernel == "splash" and not causal) or unsupported(
        kernel, where, q_BTNGK, k_BSNK, bias_BNGTS, self_attention, window, sparse):
      return "xla"
    return kernel
  reason = unsupported(impl, where, q_BTNGK, k_BSNK, bias_BNGTS, self_attention, window, sparse)
  if reason:
    raise refusal(impl, reason)
  return impl


def refusal(impl: str, reason: str) -> ConfigError:
  return ConfigError(f"model.attention_impl={impl} {reason}; use auto, xla or dot_product")


def mask(q_segment_ids_BT, kv_segment_ids_BS, causal: bool):
  """Boolean [B, T, S]: same packed segment, and (if causal) key not after the query."""
  mask = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
  if causal:
    t, s = q_segment_ids_BT.shape[1], kv_segment_ids_BS.shape[1]
    mask &= (jnp.arange(t)[:, None] >= jnp.arange(s)[None, :])[None]
  return mask


def window_mask(t: int, s: int, window, q_offset=0):
  """[T, S]: whether key j is inside query i's window, |i - j| < window, where i = q_offset +
  row (the query's place among the keys; decoding passes the cache index). `window` (a Python
  int or a traced per-layer scalar) 0 = every key."""
  d_TS = (q_offset + jnp.arange(t))[:, None] - jnp.arange(s)[None, :]
  return (jnp.abs(d_TS) < window) | (window == 0)


@functools.lru_cache(maxsize=32)
def random_blocks(layers: int, n_blocks: int, count: int, causal: bool) -> np.ndarray:
  """BigBird's random attention, fixed per layer: int32 [layers, n_blocks, count], the key blocks
  query block i sees, drawn without replacement (seeded by layer and i) from all blocks, or with
  `causal` from blocks 0..i (a draw then does not depend on the length: decoding sees the same
  blocks as training); -1 pads rows with fewer blocks to draw from. Bidirectional layers draw
  over model.max_len's blocks (layers.py), so that a row's padding (a scoring batch's bucket)
  changes nothing; a block past a document's end is nobody's, and that draw sees nothing."""
  out = np.full((layers, n_blocks, count), -1, np.int32)
  for layer in range(layers):
    for i in range(n_blocks):
      choices = i + 1 if causal else n_blocks
      picked = np.random.default_rng((layer, i)).choice(choices, min(count, choices), False)
      out[layer, i, :len(picked)] = picked
  return out


def sparse_mask(t: int, s: int, window, q_offset, q_positions_BT, k_positions_BS,
                global_tokens: int, blocks_QR, block_size: int):
  """[B, T, S]: the keys a query may see under Longformer / BigBird sparsity: its sliding
  window, every global token (position < global_tokens, in both directions: globals see and
  are seen by their whole segment), and (`blocks_QR`, from random_blocks) its query block's
  random key blocks ([n_blocks, count] rows of random_blocks). Blocks count positions within
  the document, so a document packed anywhere in a row sees what it sees alone in a row of any
  length. A window of 0 sees every key."""
  allowed_BTS = window_mask(t, s, window, q_offset)[None]
  if global_tokens:
    allowed_BTS = (allowed_BTS | (q_positions_BT < global_tokens)[:, :, None]
                   | (k_positions_BS < global_tokens)[:, None, :])
  if blocks_QR is not None:
    picked_BTR = jnp.take(blocks_QR, q_positions_BT // block_size, axis=0, mode="clip")
    key_block_BS = k_positions_BS // block_size
    for r in range(blocks_QR.shape[1]):
      allowed_BTS = allowed_BTS | (picked_BTR[:, :, r, None] == key_block_BS[:, None, :])
  return allowed_BTS


def windowed(q_BTNGK, k_BSNK, v_BSNK, mask_BTS, window: int):
  """The reference under a causal sliding window, in query blocks of `window` rows: block c
  attends to key blocks c - 1 and c only, which hold every key its window can reach, so the
  result is exact at O(T W) score work and memory. A T that `window` does not divide is padded up
  to a multiple of it with keys no query sees (mask False) and queries cut off after. Head-major
  blocks as in `reference` (attention alone, fwd + bwd, 4 x 1024 tokens, 6 heads, W 128, on
  XLA:CPU: 80 ms against 116 ms with [B, C, W, N, G, K] einsums)."""
  t = q_BTNGK.shape[1]
  if t % window:
    pad = -t % window
    grow = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    out = windowed(grow(q_BTNGK), grow(k_BSNK), grow(v_BSNK),
                   jnp.pad(mask_BTS, [(0, 0), (0, pad), (0, pad)]), window)
    return out[:, :t]
  b, t, n, g, k = q_BTNGK.shape
  w, c = window, t // window

  def previous_and_current(x_BSNK):  # -> [B, C, N, 2W, K], head-major as in `reference`
    prev = jnp.pad(x_BSNK, [(0, 0), (w, 0), (0, 0), (0, 0)])[:, :t].reshape(b, c, w, n, k)
    both = jnp.concatenate([prev, x_BSNK.reshape(b, c, w, n, k)], axis=2)
    return both.transpose(0, 1, 3, 2, 4)

  rows_BCWS = jnp.pad(mask_BTS, [(0, 0), (0, 0), (w, 0)]).reshape(b, c, w, t + w)
  cols_CS = jnp.arange(c)[:, None] * w + jnp.arange(2 * w)[None, :]  # padded key index
  mask_BCWS = jnp.take_along_axis(rows_BCWS, cols_CS[None, :, None, :], axis=3)
  mask_BCWS &= window_mask(w, 2 * w, w, q_offset=w)[None, None]
  mask_BCRS = jnp.tile(mask_BCWS, (1, 1, g, 1)) if g > 1 else mask_BCWS  # row r = g * W + i
  q_BCNRK = q_BTNGK.reshape(b, c, w, n, g, k).transpose(0, 1, 3, 4, 2, 5).reshape(
      b, c, n, g * w, k)
  logits_BCNRS = ops.einsum_f32("BCNRK,BCNSK->BCNRS", q_BCNRK, previous_and_current(k_BSNK))
  probs = ops.masked_softmax(logits_BCNRS, mask_BCRS[:, :, None]).astype(q_BTNGK.dtype)
  out_BCNRK = jnp.einsum("BCNRS,BCNSK->BCNRK", probs, previous_and_current(v_BSNK))
  return out_BCNRK.reshape(b, c, n, g, w, k).transpose(0, 1, 4, 2, 3, 5).reshape(b, t, n, g, k)


def reference(q_BTNGK, k_BSNK, v_BSNK, mask_BTS, causal_chunks: int = 1, bias_BNGTS=None):
  """The xla kernel, the reference every other is tested against: scaled dot-product attention
  (q already scaled), scores and softmax in fp32; `bias_BNGTS`
  (e.g. T5's relative position bias, broadcastable) is added to the scores.

  With `causal_chunks` > 1 (and a causal mask over equal query/key lengths) the queries are split
  into that many blocks and block i attends only to keys [0, end of block i): the skipped keys are
  all masked, so the result is exact while the score work falls to (n + 1) / (2 n) of the full one.
  q, k and v are put head-major once (q as [B, N, G*T, K]: a key/value head's G query heads
  stacked along the rows, the mask tiled to match), so that every block's matmuls are plain
  batched ones over (B, N) with no transposes of their own, and no array has a size-1 group dim:
  on XLA:CPU such a dim made the dots and the softmax markedly slower (benchmarks/RESULTS.md).
  """
  b, t, n, g, k = q_BTNGK.shape
  q_BNRK = q_BTNGK.transpose(0, 2, 3, 1, 4).reshape(b, n, g * t, k)  # row r = g * T + t
  out_BNRK = _head_major(q_BNRK, k_BSNK.transpose(0, 2, 1, 3), v_BSNK.transpose(0, 2, 1, 3),
                         mask_BTS, causal_chunks, bias_BNGTS, g)
  return out_BNRK.reshape(b, n, g, t, k).transpose(0, 3, 1, 2, 4)


def _head_major(q_BNRK, k_BNSK, v_BNSK, mask_BTS, causal_chunks, bias_BNGTS, g):
  """`reference` over head-major q [B, N, G*T, K] (G query heads per key/value head stacked
  along the rows), k and v [B, N, S, K]: out [B, N, G*T, K]."""
  b, n, r, k = q_BNRK.shape
  t, s = r // g, k_BNSK.shape[2]
  if causal_chunks > 1 and t == s and t % causal_chunks == 0:
    c = t // causal_chunks
    q_BNGTK = q_BNRK.reshape(b, n, g, t, k)
    return jnp.concatenate([
        _head_major(q_BNGTK[:, :, :, i * c:(i + 1) * c].reshape(b, n, g * c, k),
                    k_BNSK[:, :, :(i + 1) * c], v_BNSK[:, :, :(i + 1) * c],
                    mask_BTS[:, i * c:(i + 1) * c, :(i + 1) * c], 1,
                    None if bias_BNGTS is None else
                    bias_BNGTS[..., i * c:(i + 1) * c, :(i + 1) * c], g).reshape(b, n, g, c, k)
        for i in range(causal_chunks)], axis=3).reshape(b, n, r, k)
  logits_BNRS = ops.einsum_f32("BNRK,BNSK->BNRS", q_BNRK, k_BNSK)
  if bias_BNGTS is not None:
    logits_BNRS = (logits_BNRS.reshape(b, n, g, t, s) + bias_BNGTS).reshape(b, n, r, s)
  mask_BRS = jnp.tile(mask_BTS, (1, g, 1)) if g > 1 else mask_BTS
  probs_BNRS = ops.masked_softmax(logits_BNRS, mask_BRS[:, None])
  return jnp.einsum("BNRS,BNSK->BNRK", probs_BNRS.astype(q_BNRK.dtype), v_BNSK)


def probabilities(q_BTNGK, k_BSNK, mask_BTS, bias_BNGTS=None):
  """The reference kernel's attention probabilities, fp32 [B, N, G, T, S]: each query's softmax
  over the keys its mask allows (exactly 0 elsewhere)."""
  logits_BNGTS = ops.einsum_f32("BTNGK,BSNK->BNGTS", q_BTNGK, k_BSNK)
  if bias_BNGTS is not None:
    logits_BNGTS = logits_BNGTS + bias_BNGTS
  return ops.masked_softmax(logits_BNGTS, mask_BTS[:, None, None])


def captured(q_BTNGK, k_BSNK, v_BSNK, mask_BTS, bias_BNGTS=None, *, window=0):
  """(output, fp32 probabilities [B, N, G, T, S]) of the reference kernel over the whole mask
  (no causal block skipping; the sliding window in the mask): what an inspection captures."""
  t, s = q_BTNGK.shape[1], k_BSNK.shape[1]
  if not isinstance(window, int) or window:
    mask_BTS = mask_BTS & window_mask(t, s, window)[None]
  probs_BNGTS = probabilities(q_BTNGK, k_BSNK, mask_BTS, bias_BNGTS)
  out = jnp.einsum("BNGTS,BSNK->BTNGK", probs_BNGTS.astype(q_BTNGK.dtype), v_BSNK)
  return out, probs_BNGTS


def attend(impl: str, q_BTNGK, k_BSNK, v_BSNK, mask_BTS, bias_BNGTS=None, *, causal: bool,
           causal_chunks: int = 1, window=0):
  """Attention output [B, T, N, G, K] by kernel `impl` (from `choose`); `causal_chunks`: the
  reference's causal key-block skipping (see `reference`); `window`: the sliding window (see
  the module docstring; queries and keys aligned, as in training)."""
  t, s = q_BTNGK.shape[1], k_BSNK.shape[1]
  static = isinstance(window, int)
  if static and window >= s:
    window = 0  # the window holds every key
  if impl == "splash":
    return splash(q_BTNGK, k_BSNK, v_BSNK, segment_ids(mask_BTS), causal=causal, window=window)
  if impl == "xla" and static and window and causal and bias_BNGTS is None and t == s:
    return windowed(q_BTNGK, k_BSNK, v_BSNK, mask_BTS, window)
  cudnn = impl == "cudnn"
  native = cudnn and static and window and causal and t == s  # cuDNN's own sliding window
  if not native and (not static or window):
    mask_BTS = mask_BTS & window_mask(t, s, window)[None]
  if impl == "xla":
    return reference(q_BTNGK, k_BSNK, v_BSNK, mask_BTS, causal_chunks, bias_BNGTS)
  return dot_product(q_BTNGK, k_BSNK, v_BSNK, mask_BTS, bias_BNGTS, causal=causal and cudnn,
                     implementation="cudnn" if cudnn else "xla", window=window if native else 0)


def dot_product(q_BTNGK, k_BSNK, v_BSNK, mask_BTS, bias_BNGTS=None, *, causal=False,
                implementation="xla", window=0):
  """jax.nn.dot_product_attention over the [B, T, H, K] query layout (q is already scaled).
  cuDNN takes the mask as an additive bias in the compute dtype; `causal` (keys after the query
  masked as well) lets it skip those blocks. `window` W > 0 (causal only): each query's W most
  recent keys, itself included, as jax's local_window_size (W - 1, 0), which cuDNN runs as its
  own sliding window (skipping the blocks outside it). A query that sees no key at all (only a
  padding row of cross-attention can, and its loss weight is 0) gets the mean of the values, not
  zeros."""
  b, t, n, g, k = q_BTNGK.shape
  s = k_BSNK.shape[1]
  bias_BHTS = None
  if bias_BNGTS is not None:
    bias_BHTS = jnp.broadcast_to(bias_BNGTS, (b, n, g, t, s)).reshape(b, n * g, t, s)
    if implementation == "cudnn":
      bias_BHTS = bias_BHTS.astype(q_BTNGK.dtype)
  out_BTHK = jax.nn.dot_product_attention(
      q_BTNGK.reshape(b, t, n * g, k), k_BSNK, v_BSNK, bias=bias_BHTS, mask=mask_BTS[:, None],
      scale=1.0, is_causal=causal, implementation=implementation,
      local_window_size=(window - 1, 0) if window else None)
  return out_BTHK.reshape(b, t, n, g, k)


def sequence_axis():
  """The mesh axis the activations' length (act_length) is sharded over, when it has more than
  one device (context parallelism: attention runs as ring attention), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  names = axis_names("act_length")
  if math.prod(mesh.shape[a] for a in names) <= 1:
    return None
  if len(names) > 1:
    raise ConfigError(f"sharding_rules: act_length may map to one mesh axis, got {names}")
  return names[0]


def ring(q_BTNGK, k_BSNK, v_BSNK, segment_ids_BT, *, causal: bool, window=0):
  """Ring attention (models/ring.py) over `sequence_axis()`, the batch and key/value heads
  sharded as the rules shard act_batch and act_heads."""
  mesh = jax.sharding.get_abstract_mesh()
  b, n = q_BTNGK.shape[0], k_BSNK.shape[2]
  return ring_lib.ring_attention(
      q_BTNGK, k_BSNK, v_BSNK, segment_ids_BT, causal=causal, axis=sequence_axis(),
      batch_axes=mesh_axes(mesh, "act_batch", b), head_axes=mesh_axes(mesh, "act_heads", n),
      window=window)


def segment_ids(mask_BTS):
  """Segment ids [B, T] of a self-attention mask that is `same segment` (and causal): each
  query's first visible key, the start of its segment. Exact for any packing, since a query
  always sees itself; O(B T S) compares, little next to attention's O(B H T S K)."""
  return jnp.argmax(mask_BTS, axis=-1).astype(jnp.int32)


def splash(q_BTNGK, k_BSNK, v_BSNK, segment_ids_BT, *, causal: bool, interpret: bool = False,
           window: int = 0):
  """Pallas splash self-attention (S = T; the multi-head kernel, whose key/value heads serve G
  query heads each) within packed segments, causal or full, within a sliding `window` if > 0
  (its LocalMask: W - 1 keys back, and forward too when not causal). Under a mesh the kernel runs
  per shard in shard_map over the batch and head axes (their logical names act_batch and
  act_heads, mapped by the config's rules); `interpret` runs the Pallas kernel in Python (tests
  on CPU)."""
  b, t, n, g, k = q_BTNGK.shape
  block = next(x for x in SPLASH_BLOCKS if t % x == 0)
  sizes = splash_lib.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

  def kernel(q_BHTK, k_BNSK, v_BNSK, segment_ids_BT):
    if window:
      mask = splash_lib.LocalMask((t, t), (window - 1, 0 if causal else window - 1), offset=0)
    else:
      mask = (splash_lib.CausalMask if causal else splash_lib.FullMask)((t, t))
    masks = splash_lib.MultiHeadMask([mask] * q_BHTK.shape[1])
    fn = splash_lib.make_splash_mha(masks, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    one = lambda q, k, v, ids: fn(q, k, v, segment_ids=splash_lib.SegmentIds(ids, ids))
    return jax.vmap(one)(q_BHTK, k_BNSK, v_BNSK, segment_ids_BT)

  q_BHTK = q_BTNGK.transpose(0, 2, 3, 1, 4).reshape(b, n * g, t, k)
  k_BNSK, v_BNSK = k_BSNK.transpose(0, 2, 1, 3), v_BSNK.transpose(0, 2, 1, 3)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    batch, heads = mesh_axes(mesh, "act_batch", b), mesh_axes(mesh, "act_heads", n)
    spec = jax.sharding.PartitionSpec(batch, heads, None, None)
    kernel = jax.shard_map(kernel, mesh=mesh, out_specs=spec, check_vma=False, in_specs=(
        spec, spec, spec, jax.sharding.PartitionSpec(batch, None)))
  out_BHTK = kernel(q_BHTK, k_BNSK, v_BNSK, segment_ids_BT)
  return out_BHTK.reshape(b, n, g, t, k).transpose(0, 3, 1, 2, 4)


def mesh_axes(mesh, logical: str, size: int):
  """The mesh axes the config's rules map `logical` to, if their product divides `size` (else
  None: that dimension stays whole on every device, correct if redundant). For the heads, `size`
  is the key/value heads: each shard then holds whole groups of G query heads."""
  names = axis_names(logical)
  shards = math.prod(mesh.shape[a] for a in names)
  return nn.logical_to_mesh_axes((logical,))[0] if names and size % shards == 0 else None


def axis_names(logical: str) -> tuple:
  """The mesh axes the context's rules map a logical axis to (none: ())."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  return (axes,) if isinstance(axes, str) else tuple(axes or ())
