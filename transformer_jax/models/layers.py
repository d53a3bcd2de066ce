"""The one layer library every model family is built from.

Conventions: shape-suffixed names (B batch, T query length, S key length, D model width, F ffn width,
H query heads, N key/value heads, G = H // N query heads per kv head, K head dim, V vocab), einsum
math, fp32 parameters cast to the compute dtype at use, softmax and norms' statistics in fp32.
Parameters and key activations carry LOGICAL axis names only; the config's rules table maps them to
mesh axes (see transformer_jax/parallel/sharding.py).
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from transformer_jax.config import ConfigError
from transformer_jax.models import attention
from transformer_jax.models import ops

# Activations tagged with jax.ad_checkpoint.checkpoint_name: what remat="outputs" keeps.
SAVEABLE_NAMES = ("query_proj", "key_proj", "value_proj", "attention_out", "mlp_out")

# Collections sown only when the caller makes them mutable (model.apply(..., mutable=[...])), so
# the training path never computes them: each Block's output (the residual stream, "residual"),
# each attention's probabilities from the reference kernel ("probs", fp32 [B, N, G, T, S]), and
# each Block's output RMS and max |x| (fp32 scalars "rms" and "max_abs"; train.log_activations).
INTERMEDIATES, ATTENTION_PROBS, ACTIVATIONS = "intermediates", "attention_probs", "activations"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Resolved model hyper-parameters (zeros in the user config already replaced). No defaults:
  config/base.py is their one source; build it with `from_config`."""
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  vocab_size: int
  output_vocab: int  # 0 = vocab_size; logits of ids >= it are masked (an import's padded rows)
  max_len: int
  position: str
  sinusoidal_variant: str  # position=sinusoidal: paper (interleaved) | t2t (tensor2tensor)
  rope_theta: float
  norm: str
  norm_position: str
  norm_eps: float
  activation: str
  use_bias: bool
  qkv_bias: bool  # biases on the query/key/value projections only (Qwen); use_bias: everywhere
  tie_embeddings: bool
  dropout_rate: float
  init_std: float
  dtype: str
  param_dtype: str
  remat: str
  scan_layers: bool
  attention_chunks: int
  attention_impl: str  # xla | dot_product | cudnn | splash | auto (models/attention.py)
  attention_window: int  # sliding window W (|query - key| < W); 0 = full attention
  window_pattern: str  # which layers are local (L) or global (G), cycled; "" = all local
  global_tokens: int  # local layers: the first G positions of a segment see and are seen by all
  random_blocks: int  # local layers: BigBird's random key blocks per query block
  block_size: int  # ... of this many positions
  rope_scaling: str  # none | linear | dynamic | yarn | llama3, as Hugging Face defines them
  rope_factor: float  # the context extension factor of every scaling
  rope_original_max_len: int  # yarn, llama3: the pretraining context (0 = max_len)
  rope_low_freq_factor: float  # llama3
  rope_high_freq_factor: float  # llama3
  rope_beta_fast: float  # yarn: the ramp's bounds, in rotations
  rope_beta_slow: float  # yarn
  rope_attention_factor: float  # yarn: cos/sin scale; 0 = 0.1 ln(factor) + 1
  num_decoder_layers: int  # encoder-decoder: the decoder's depth (0 = num_layers)
  relative_buckets: int  # position="relative" (T5): log-spaced distance buckets ...
  relative_max_distance: int  # ... up to this distance
  type_vocab_size: int  # BERT token types (segment A/B); 0 = none
  sentence_head: bool  # BERT's pooler + 2-way sentence-pair (NSP / SOP) classifier
  embed_norm: bool  # a Norm right after the embedding sum (BERT)
  scale_embeddings: bool  # multiply token embeddings by sqrt(d_model) (Transformer)
  query_scale: float  # attention logits scale; 0 = 1/sqrt(head_dim) (T5 uses 1.0)
  num_experts: int  # Mixture-of-Experts FFN (models/moe.py); 0 = dense
  experts_per_token: int  # top-k
  expert_capacity_factor: float  # 0 = dropless; > 0 = slots per expert and row
  expert_d_ff: int  # each expert's FFN width (0 = d_ff)
  moe_every: int  # the MoE FFN in every n-th layer (the others dense)
  num_shared_experts: int  # always-on experts (DeepSeek-MoE / Qwen-MoE)
  shared_expert_gate: bool  # Qwen-MoE: the shared experts' output x sigmoid(x . g)
  router_renormalize: bool  # the top-k weights renormalised to sum to 1 (Mixtral)
  router_jitter: float  # train-time multiplicative noise on the router's inputs (Switch)
  router_aux_loss: float  # the loss weights of the MoE layers' mean load-balancing loss ...
  router_z_loss: float  # ... and mean router z-loss (training/step.py adds them)
  quantization: str  # none | int8 | fp8: the projections' matmuls quantized (quant/qt.py)

  @classmethod
  def from_config(cls, m) -> "ModelConfig":
    """Builds from the `model` section of a ConfigDict, resolving 0 = default sizes."""
    d = {f.name: m[f.name] for f in dataclasses.fields(cls)}
    d["num_kv_heads"] = m.num_kv_heads or m.num_heads
    d["head_dim"] = m.head_dim or m.d_model // m.num_heads
    d["d_ff"] = m.d_ff or 4 * m.d_model
    return cls(**d)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def resid_std(self) -> float:
    """GPT-2 init: projections into the residual stream scaled by 1/sqrt(2 * num_layers)."""
    return self.init_std / math.sqrt(2 * self.num_layers)


MASKED_LOGIT = -1e9  # finite: a softmax gives it 0 and no NaN anywhere


def param(module, name, shape, axes, init):
  """A float parameter with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.dtype(module.cfg.param_dtype))


def lead(w, x):
  """`w` (the trailing dims of `x`) in x's dtype with leading unit dims: an explicit broadcast."""
  return w.astype(x.dtype).reshape((1,) * (x.ndim - w.ndim) + w.shape)


def constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis; statistics in fp32, output in the compute dtype."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    c = self.cfg
    center = c.norm == "layernorm"
    scale = param(self, "scale", (c.d_model,), ("embed",), nn.initializers.ones)
    bias = None
    if c.use_bias and center:
      bias = param(self, "bias", (c.d_model,), ("embed",), nn.initializers.zeros)
    y = ops.normalize(x_BTD.astype(jnp.float32), scale, bias, c.norm_eps, center)
    return y.astype(c.compute_dtype)


class DecodeOffset(nn.Module):
  """In KV-cache decoding, positions continue from the number of tokens already cached (a
  "position" variable in the cache; model.init(decode=True) only creates it)."""

  @nn.compact
  def __call__(self, t: int):
    is_init = self.has_variable("cache", "position")
    index = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
    offset = index.value
    if is_init:
      index.value = offset + t
    return offset


def default_positions(segment_ids_BT, positions_BT, b: int, t: int):
  """One segment and 0..t-1 when a batch does not say otherwise."""
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones((b, t), jnp.int32)
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return segment_ids_BT, positions_BT


def sinusoidal(positions_BT, dim: int, max_timescale: float = 10000.0, variant: str = "t2t"):
  """Sinusoidal positions [B, T, dim] at (per-segment) positions. "paper" (Vaswani et al. 2017,
  section 3.5): PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(same), interleaved.
  "t2t" (tensor2tensor's, which converted checkpoints use): frequencies
  exp(-ln(10^4) i / (d/2 - 1)), the sines then the cosines (and a zero channel for an odd d, as
  tensor2tensor's get_timing_signal_1d pads)."""
  if variant == "paper":
    inv = max_timescale ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = positions_BT[..., None].astype(jnp.float32) * inv[None, None]
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(
        *angles.shape[:-1], -1)[..., :dim]
  half = dim // 2
  inv = jnp.exp(-math.log(max_timescale) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  angles = positions_BT[..., None].astype(jnp.float32) * inv[None, None]
  signal = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(signal, [(0, 0)] * (signal.ndim - 1) + [(0, dim % 2)])


def document_lengths(positions_BT, segment_ids_BT=None):
  """Each token's document length [B, T]: the position of its document's last token + 1. A
  document is a run of one segment id over increasing positions (packing restarts both)."""
  t = positions_BT.shape[-1]
  same = positions_BT[:, 1:] > positions_BT[:, :-1]
  if segment_ids_BT is not None:
    same &= segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]
  index_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), positions_BT.shape)
  ends_BT = jnp.where(jnp.pad(same, [(0, 0), (0, 1)]), t, index_BT)
  last_BT = jax.lax.cummin(ends_BT, axis=1, reverse=True)  # the index of the run's last token
  return jnp.take_along_axis(positions_BT, last_BT, axis=1) + 1


def rope_frequencies(c: ModelConfig, k: int, positions_BT, segment_ids_BT=None):
  """RoPE's inverse frequencies [K/2] for head dim `k` under c.rope_scaling, and the scale of
  cos/sin, as Hugging Face's rope initializers compute them. Dynamic NTK's are [B, T, K/2],
  each token's from its own document's length (`document_lengths`: Hugging Face's forward of
  that document alone), so its logits never depend on its batch or row mates' lengths."""
  exponents = jnp.arange(0, k, 2, dtype=jnp.float32) / k
  inv = 1.0 / c.rope_theta ** exponents
  kind, factor = c.rope_scaling, c.rope_factor
  original = c.rope_original_max_len or c.max_len
  if kind == "linear":
    return inv / factor, 1.0
  if kind == "dynamic":  # NTK-aware: a larger theta once positions pass max_len
    length_BT = jnp.maximum(document_lengths(positions_BT, segment_ids_BT), c.max_len)
    theta_BT = c.rope_theta * (factor * length_BT.astype(jnp.float32) / c.max_len
                               - (factor - 1)) ** (k / (k - 2))
    return 1.0 / theta_BT[..., None] ** exponents[None, None], 1.0
  if kind == "llama3":
    low, high = c.rope_low_freq_factor, c.rope_high_freq_factor
    wavelength = 2 * math.pi / inv
    scaled = jnp.where(wavelength > original / low, inv / factor, inv)
    smooth = (original / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return jnp.where(medium, smoothed, scaled), 1.0
  if kind == "yarn":
    def dim(rotations):  # the dimension whose wavelength makes `rotations` turns in `original`
      return k * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(c.rope_theta))
    low = max(math.floor(dim(c.rope_beta_fast)), 0)
    high = min(math.ceil(dim(c.rope_beta_slow)), k - 1)
    ramp = jnp.clip((jnp.arange(k // 2, dtype=jnp.float32) - low)
                    / ((high - low) or 0.001), 0, 1)
    inv = inv / factor * ramp + inv * (1 - ramp)
    scale = c.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv, scale
  return inv, 1.0


def rotary(x_BTHK, positions_BT, inv_K, scale=1.0):
  """Rotary position embedding (RoFormer), rotating the two halves of each head by
  position x inverse frequency (`rope_frequencies`: [K/2], or [B, T, K/2] per token); cos and
  sin are multiplied by `scale`."""
  inv_BTK = inv_K[None, None] if inv_K.ndim == 1 else inv_K
  angles_BTK = positions_BT[..., None].astype(jnp.float32) * inv_BTK
  sin = (jnp.sin(angles_BTK) * scale)[:, :, None, :]
  cos = (jnp.cos(angles_BTK) * scale)[:, :, None, :]
  x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHK.dtype)


def relative_buckets(q_positions_BT, k_positions_BS, bidirectional: bool, num_buckets: int,
                     max_distance: int):
  """T5's bucket of each (query, key) distance, int32 [B, T, S]: exact for short distances,
  log-spaced up to max_distance; with `bidirectional` half the buckets are for keys after the
  query."""
  rel_BTS = k_positions_BS[:, None, :] - q_positions_BT[:, :, None]
  bucket = jnp.zeros_like(rel_BTS)
  if bidirectional:
    num_buckets //= 2
    bucket = jnp.where(rel_BTS > 0, num_buckets, 0)
    rel_BTS = jnp.abs(rel_BTS)
  else:
    rel_BTS = jnp.maximum(-rel_BTS, 0)
  exact = num_buckets // 2
  log_ratio = jnp.log(jnp.maximum(rel_BTS, 1).astype(jnp.float32) / exact) / math.log(
      max_distance / exact)
  large = jnp.minimum(exact + (log_ratio * (num_buckets - exact)).astype(jnp.int32),
                      num_buckets - 1)
  return bucket + jnp.where(rel_BTS < exact, rel_BTS, large)


class Attention(nn.Module):
  """Multi-head (or grouped-query) scaled dot-product attention with an optional KV cache.

  `decode=True` appends this call's keys/values to a cache (variables in the "cache" collection)
  and attends to every cached position up to each query's own: one code path for prefill (many
  tokens) and for one-token steps. `causal=True` promises that `mask_BTS` is causal, which lets
  training skip the key blocks after each query block (`cfg.attention_chunks`).
  """
  cfg: ModelConfig
  causal: bool = False
  window: int = 0  # this layer's sliding window (attention.py); 0 = every key
  layer: int = 0  # its index in the stack: seeds BigBird's random blocks

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BTS, *, kv_BSD=None, rel_table=None,
               deterministic=True, decode=False, window=None, segment_ids_BT=None,
               layer=None):
    """Self-attention over x, or cross-attention to `kv_BSD` (keys/values from another sequence,
    e.g. the encoder's output; never cached, no rotary). `rel_table` [buckets, H]: T5's
    relative position bias, looked up from query and key positions. `window`: a traced window
    for this layer (a scanned stack's), instead of the static `self.window` (`layer` likewise).
    `segment_ids_BT`:
    the rows' packed segments, for ring attention (the length sharded over mesh.sequence)."""
    c = self.cfg
    d, h, n, k = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
    dt = c.compute_dtype
    init, resid = nn.initializers.normal(c.init_std), nn.initializers.normal(c.resid_std)
    x = x_BTD.astype(dt)
    kv = x if kv_BSD is None else kv_BSD.astype(dt)

    def project(name, source, heads, axes):
      w = param(self, name, (d, heads, k), ("embed",) + axes, init)
      y = ops.dense(source, w.astype(dt), quant=c.quantization)
      if c.use_bias or c.qkv_bias:
        y = y + lead(param(self, name + "_bias", (heads, k), axes, nn.initializers.zeros), y)
      return y

    q_BTHK = project("query", x, h, ("heads", "head_dim"))
    k_BSNK = project("key", kv, n, ("kv_heads", "head_dim"))
    v_BSNK = project("value", kv, n, ("kv_heads", "head_dim"))
    if c.position == "rotary" and kv_BSD is None:
      inv_K, scale = rope_frequencies(c, k, positions_BT, segment_ids_BT)
      q_BTHK = rotary(q_BTHK, positions_BT, inv_K, scale)
      k_BSNK = rotary(k_BSNK, positions_BT, inv_K, scale)
    q_BTHK = checkpoint_name(constrain(q_BTHK, ("act_batch", "act_length", "act_heads", None)),
                             "query_proj")
    k_BSNK, v_BSNK = checkpoint_name(k_BSNK, "key_proj"), checkpoint_name(v_BSNK, "value_proj")
    k_positions_BS = positions_BT
    window = (self.window if window is None else window) if kv_BSD is None else 0
    local = kv_BSD is None and not (isinstance(window, int) and window == 0)
    sparse = local and bool(c.global_tokens or c.random_blocks)
    offset = 0
    if decode and kv_BSD is None:
      k_BSNK, v_BSNK, mask_BTS, offset, k_positions_BS = self._cache(
          k_BSNK, v_BSNK, mask_BTS, positions_BT, segment_ids_BT)
    # Sparse patterns, and any window while decoding (queries offset in the cache), go in the
    # mask; the kernels then see no window.
    if sparse or (decode and local):
      mask_BTS &= self._sparse(positions_BT, k_positions_BS, window, offset,
                               self.layer if layer is None else layer)
      window = 0

    b, t = q_BTHK.shape[:2]
    scale = c.query_scale or k ** -0.5
    q_BTNGK = q_BTHK.reshape(b, t, n, h // n, k) * jnp.asarray(scale, dt)
    bias_BNGTS = None
    if rel_table is not None:
      buckets_BTS = relative_buckets(positions_BT, k_positions_BS, not self.causal,
                                     c.relative_buckets, c.relative_max_distance)
      bias_BTSH = jnp.take(rel_table.astype(jnp.float32), buckets_BTS, axis=0)
      bias_BNGTS = bias_BTSH.transpose(0, 3, 1, 2).reshape(b, n, h // n, t, -1)
    out_BTNGK = self._kernel(q_BTNGK, k_BSNK, v_BSNK, mask_BTS, bias_BNGTS, segment_ids_BT,
                             window=window, sparse=sparse, decode=decode,
                             cross=kv_BSD is not None)
    out_BTHK = constrain(out_BTNGK.reshape(b, t, h, k),
                         ("act_batch", "act_length", "act_heads", None))
    w_o = param(self, "out", (h, k, d), ("heads", "head_dim", "embed"), resid)
    y_BTD = ops.dense(out_BTHK, w_o.astype(dt), n=2, quant=c.quantization)
    if c.use_bias:
      y_BTD = y_BTD + lead(param(self, "out_bias", (d,), ("embed",), nn.initializers.zeros),
                           y_BTD)
    return checkpoint_name(y_BTD, "attention_out")

  def _kernel(self, q_BTNGK, k_BSNK, v_BSNK, mask_BTS, bias_BNGTS, segment_ids_BT, *, window,
              sparse: bool, decode: bool, cross: bool):
    """The attention output by the kernel this call gets: the reference, its probabilities sown,
    when ATTENTION_PROBS is mutable (an inspection); ring attention when the length is sharded
    (mesh.sequence); else attention.choose's."""
    c = self.cfg
    if not (decode or self.is_initializing()) and self.is_mutable_collection(ATTENTION_PROBS):
      out_BTNGK, probs_BNGTS = attention.captured(q_BTNGK, k_BSNK, v_BSNK, mask_BTS, bias_BNGTS,
                                                  window=window)
      self.sow(ATTENTION_PROBS, "probs", probs_BNGTS)
      return out_BTNGK
    chunks = c.attention_chunks if self.causal and not decode and not cross else 1
    if not (decode or self.is_initializing() or cross) and attention.sequence_axis():
      if segment_ids_BT is None or bias_BNGTS is not None or sparse:
        raise ConfigError("mesh.sequence > 1 (ring attention) needs the rows' segment ids, no "
                          "attention bias and no global tokens or random blocks (it would "
                          "attend densely)")
      return attention.ring(q_BTNGK, k_BSNK, v_BSNK, segment_ids_BT, causal=self.causal,
                            window=window)
    impl = "xla" if self.is_initializing() else attention.choose(  # init: only shapes matter
        c.attention_impl, q_BTNGK, k_BSNK, bias_BNGTS, causal=self.causal,
        self_attention=not cross, decode=decode, window=window, sparse=sparse)
    return attention.attend(impl, q_BTNGK, k_BSNK, v_BSNK, mask_BTS, bias_BNGTS,
                            causal=self.causal and not decode, causal_chunks=chunks,
                            window=window)

  def _sparse(self, q_positions_BT, k_positions_BS, window, q_offset, layer):
    """The keys this layer's window, global tokens and random blocks allow
    (attention.sparse_mask); `q_offset`: the first query's index among the keys."""
    c = self.cfg
    t, s = q_positions_BT.shape[1], k_positions_BS.shape[1]
    blocks_QR = None
    if c.random_blocks:  # bidirectional: drawn over model.max_len's blocks, whatever the padding
      blocks = -(-(s if self.causal else max(s, c.max_len)) // c.block_size)
      table = attention.random_blocks(c.num_layers + c.num_decoder_layers, blocks,
                                      c.random_blocks, self.causal)
      blocks_QR = table[layer] if isinstance(layer, int) else jnp.asarray(table)[layer]
    return attention.sparse_mask(t, s, window, q_offset, q_positions_BT, k_positions_BS,
                                 c.global_tokens, blocks_QR, c.block_size)

  def _cache(self, k_BTNK, v_BTNK, mask_BTT, positions_BT, segment_ids_BT):
    """Writes this call's keys/values, their positions and whether each is a token (segment id
    not 0: a left-padded prompt's padding is none) at the cache index; returns the whole cache,
    its causal mask over the tokens (plus what `mask_BTT`, the call's own mask over its tokens,
    allows among them: a prefix LM's prompt sees itself both ways, padding its own padding), the
    index the call's first query has, and the keys' positions."""
    is_init = self.has_variable("cache", "key")
    key = self.variable("cache", "key", jnp.zeros, k_BTNK.shape, k_BTNK.dtype)
    value = self.variable("cache", "value", jnp.zeros, v_BTNK.shape, v_BTNK.dtype)
    where = self.variable("cache", "key_positions", jnp.zeros, k_BTNK.shape[:2], jnp.int32)
    token = self.variable("cache", "key_is_token", jnp.zeros, k_BTNK.shape[:2], bool)
    index = self.variable("cache", "index", lambda: jnp.array(0, jnp.int32))
    b, t, s = k_BTNK.shape[0], k_BTNK.shape[1], key.value.shape[1]
    if not is_init:  # model.init(decode=True) only creates the cache (length = the input's)
      return k_BTNK, v_BTNK, jnp.ones((b, t, t), bool), 0, positions_BT
    i = index.value
    key.value = jax.lax.dynamic_update_slice(key.value, k_BTNK, (0, i, 0, 0))
    value.value = jax.lax.dynamic_update_slice(value.value, v_BTNK, (0, i, 0, 0))
    where.value = jax.lax.dynamic_update_slice(where.value, positions_BT.astype(jnp.int32), (0, i))
    is_token_BT = (jnp.ones((b, t), bool) if segment_ids_BT is None else segment_ids_BT != 0)
    token.value = jax.lax.dynamic_update_slice(token.value, is_token_BT, (0, i))
    index.value = i + t
    mask_TS = (i + jnp.arange(t))[:, None] >= jnp.arange(s)[None, :]
    mask_BTS = mask_TS[None] & token.value[:, None, :]
    if mask_BTT is not None and t > 1 and mask_BTT.shape == mask_BTS.shape[:2] + (t,):
      own_BTS = jax.lax.dynamic_update_slice(jnp.zeros_like(mask_BTS), mask_BTT, (0, 0, i))
      mask_BTS = mask_BTS | own_BTS
    return key.value, value.value, mask_BTS, i, where.value


GATED = ("swiglu", "geglu")  # activations with a gate projection besides `up`


def activate(activation: str, up):
  """The FFN's hidden from `up(name)`, the input's projection by weight `name` ("up", and "gate"
  for the gated kinds): ReLU, GELU (tanh approximation, as GPT-2; exact erf, as BERT), SwiGLU or
  gated GELU (T5 v1.1)."""
  if activation == "swiglu":
    return nn.silu(up("gate")) * up("up")
  if activation == "geglu":
    return ops.gelu(up("gate")) * up("up")
  if activation == "gelu":
    return ops.gelu(up("up"))
  if activation == "gelu_exact":
    return jax.nn.gelu(up("up"), approximate=False)
  return nn.relu(up("up"))


class MLP(nn.Module):
  """Position-wise feed-forward network (`activate`'s kinds); `d_ff` = 0: the config's width."""
  cfg: ModelConfig
  d_ff: int = 0

  @nn.compact
  def __call__(self, x_BTD, *, deterministic=True, segment_ids_BT=None):
    del segment_ids_BT  # every position alike (MoE's routing leaves the padding out)
    c = self.cfg
    f = self.d_ff or c.d_ff
    dt = c.compute_dtype
    init, resid = nn.initializers.normal(c.init_std), nn.initializers.normal(c.resid_std)
    x = x_BTD.astype(dt)

    def up(name):
      w = param(self, name, (c.d_model, f), ("embed", "mlp"), init)
      y = ops.dense(x, w.astype(dt), quant=c.quantization)
      if c.use_bias:
        y = y + lead(param(self, name + "_bias", (f,), ("mlp",), nn.initializers.zeros), y)
      return y

    h_BTF = constrain(activate(c.activation, up), ("act_batch", "act_length", "act_mlp"))
    w = param(self, "down", (f, c.d_model), ("mlp", "embed"), resid)
    y_BTD = ops.dense(h_BTF, w.astype(dt), quant=c.quantization)
    if c.use_bias:
      y_BTD = y_BTD + lead(param(self, "down_bias", (c.d_model,), ("embed",),
                                 nn.initializers.zeros), y_BTD)
    return checkpoint_name(y_BTD, "mlp_out")


class Block(nn.Module):
  """One Transformer layer: self-attention, then (with `cross`) attention to the encoder's output,
  then the FFN, each in a residual, pre- or post-norm."""
  cfg: ModelConfig
  causal: bool = False
  cross: bool = False
  window: int = 0  # the self-attention's sliding window; a scanned stack passes `window`
  layer: int = 0  # the block's index in its stack (a scanned stack passes `layer`)
  ffn: type | None = None  # the FFN's module class (models/moe.py's MoE); None = MLP

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BTS, deterministic=True, decode=False,
               encoded_BSD=None, cross_mask_BTS=None, rel_table=None, window=None,
               segment_ids_BT=None, layer=None):
    c = self.cfg
    drop = nn.Dropout(c.dropout_rate)
    sublayers = [
        ("attention", lambda y: Attention(c, causal=self.causal, window=self.window,
                                          layer=self.layer, name="attention")(
            y, positions_BT, mask_BTS, rel_table=rel_table, deterministic=deterministic,
            decode=decode, window=window, segment_ids_BT=segment_ids_BT, layer=layer)),
        ("mlp", lambda y: (self.ffn or MLP)(c, name="mlp")(y, deterministic=deterministic,
                                                           segment_ids_BT=segment_ids_BT)),
    ]
    if self.cross:
      sublayers.insert(1, ("cross_attention", lambda y: Attention(c, name="cross_attention")(
          y, positions_BT, cross_mask_BTS, kv_BSD=encoded_BSD, deterministic=deterministic)))
    for name, sublayer in sublayers:
      if c.norm_position == "pre":
        x_BTD = x_BTD + drop(sublayer(Norm(c, name=name + "_norm")(x_BTD)), deterministic)
      else:
        x_BTD = Norm(c, name=name + "_norm")(x_BTD + drop(sublayer(x_BTD), deterministic))
      x_BTD = constrain(x_BTD, ("act_batch", "act_length", "act_embed"))
    if self.is_initializing():  # init makes every collection mutable: it returns only params
      return x_BTD
    self.sow(INTERMEDIATES, "residual", x_BTD)  # no-ops unless the collection is mutable
    if self.is_mutable_collection(ACTIVATIONS):
      x = x_BTD.astype(jnp.float32)
      self.sow(ACTIVATIONS, "rms", jnp.sqrt(jnp.mean(jnp.square(x))))
      self.sow(ACTIVATIONS, "max_abs", jnp.max(jnp.abs(x)))
    return x_BTD


class Embedder(nn.Module):
  """Token embedding (+ learned or sinusoidal positions) and the output projection to logits."""
  cfg: ModelConfig

  def setup(self):
    c = self.cfg
    init = nn.initializers.normal(c.init_std)
    self.table = param(self, "tokens", (c.vocab_size, c.d_model), ("vocab", "embed"), init)
    if c.position == "learned":
      self.pos_table = param(self, "positions", (c.max_len, c.d_model), (None, "embed"), init)
    if c.type_vocab_size:
      self.type_table = param(self, "types", (c.type_vocab_size, c.d_model), (None, "embed"), init)
    if c.embed_norm:
      self.norm = Norm(c)
    if not c.tie_embeddings:
      self.out = param(self, "logits", (c.d_model, c.vocab_size), ("embed", "vocab"), init)

  def embed(self, tokens_BT, positions_BT, types_BT=None):
    c = self.cfg
    x_BTD = jnp.take(self.table, tokens_BT, axis=0)
    if c.scale_embeddings:
      x_BTD = x_BTD * math.sqrt(c.d_model)
    if c.position == "learned":
      x_BTD = x_BTD + jnp.take(self.pos_table, positions_BT, axis=0)
    elif c.position == "sinusoidal":
      x_BTD = x_BTD + sinusoidal(positions_BT, c.d_model, variant=c.sinusoidal_variant)
    if c.type_vocab_size:
      types_BT = jnp.zeros_like(tokens_BT) if types_BT is None else types_BT
      x_BTD = x_BTD + jnp.take(self.type_table, types_BT, axis=0)
    if c.embed_norm:
      x_BTD = self.norm(x_BTD)
    return constrain(x_BTD.astype(c.compute_dtype), ("act_batch", "act_length", "act_embed"))

  def logits(self, x_BTD):
    """fp32 logits: the matmul runs in the compute dtype and accumulates in fp32; so do the
    backward's two (ops.unembed: the fp32 cotangent is cast to the compute dtype first)."""
    c = self.cfg
    table_VD = self.table if c.tie_embeddings else self.out.T
    out = ops.unembed(x_BTD.astype(c.compute_dtype), table_VD.astype(c.compute_dtype))
    if 0 < c.output_vocab < c.vocab_size:  # padded rows: no probability, no gradient
      out = jnp.where(jnp.arange(c.vocab_size) < c.output_vocab, out, MASKED_LOGIT)
    return constrain(out, ("act_batch", "act_length", "act_vocab"))
