"""Hand-differentiated primitives for the hottest element-wise chains of a training step.

Autodiff of the textbook formulas is correct but, on CPU and other memory-bound backends, it
materialises intermediates the backward pass does not need (the exponentials of a softmax, the
tanh of a GELU, a normaliser's centred input three times over) and adds passes that a hand-written
backward folds into one (masking, the softmax's division). Each op here computes exactly the same
function as its reference (tests/test_ops.py checks values and gradients against autodiff of the
plain formula) with a `jax.custom_vjp` whose backward reads the saved inputs once.
"""

import functools
import math

import jax
import jax.numpy as jnp

from transformer_jax.quant import qt


def platform() -> str:
  """The platform being compiled for: the context mesh's devices (an AOT compile for a TPU
  topology runs on a CPU host), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def _sum_leading(x, ndim):
  """Sums `x` over all but its trailing `ndim` axes (the gradient of a broadcast parameter)."""
  return jnp.sum(x, axis=tuple(range(x.ndim - ndim)))


def _row(v, x):
  """A [D] vector as [1, ..., 1, D] in x's rank and dtype: an explicit broadcast."""
  return v.astype(x.dtype).reshape((1,) * (x.ndim - 1) + v.shape)


# ---------------------------------------------------------------------------------------------
# LayerNorm / RMSNorm
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize(x, scale, bias, eps: float, center: bool):
  """(x - mean) * rsqrt(var + eps) * scale + bias over the last axis, in x's dtype (fp32).

  `center=False` is RMSNorm (no mean subtraction); `bias` may be None.
  """
  return _normalize_fwd(x, scale, bias, eps, center)[0]


def _normalize_fwd(x, scale, bias, eps, center):
  if center:
    x = x - jnp.mean(x, axis=-1, keepdims=True)
  r = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  xhat = x * r
  y = xhat * _row(scale, xhat)
  if bias is not None:
    y = y + _row(bias, y)
  return y, (xhat, r, scale, bias is not None)


def _normalize_bwd(eps, center, res, g):
  del eps
  xhat, r, scale, has_bias = res
  gs = g * _row(scale, g)
  inner = gs - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True)
  if center:
    inner = inner - jnp.mean(gs, axis=-1, keepdims=True)
  d_scale = _sum_leading(g * xhat, 1).astype(scale.dtype)
  d_bias = _sum_leading(g, 1).astype(scale.dtype) if has_bias else None
  return r * inner, d_scale, d_bias


normalize.defvjp(_normalize_fwd, _normalize_bwd)


# ---------------------------------------------------------------------------------------------
# GELU (tanh approximation, as GPT-2 and BERT)
# ---------------------------------------------------------------------------------------------
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


@jax.custom_vjp
def gelu(u):
  """0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))); the backward recomputes tanh from u."""
  t = jnp.tanh(_GELU_C * (u + _GELU_A * u * u * u))
  return 0.5 * u * (1 + t)


def _gelu_fwd(u):
  return gelu(u), u


def _gelu_bwd(u, g):
  uf = u.astype(jnp.float32)
  t = jnp.tanh(_GELU_C * (uf + _GELU_A * uf * uf * uf))
  du = 0.5 * (1 + t) + 0.5 * uf * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * uf * uf)
  return ((g.astype(jnp.float32) * du).astype(u.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# ---------------------------------------------------------------------------------------------
# Masked softmax (attention probabilities)
# ---------------------------------------------------------------------------------------------
@jax.custom_vjp
def masked_softmax(logits, mask):
  """softmax over the last axis restricted to `mask` (bool, broadcastable to logits), fp32.

  Masked entries get probability exactly 0; a row with no allowed entry is all zeros (never NaN).
  The backward needs only the probabilities: masked entries have p = 0, so no mask pass.
  """
  return _masked_softmax_fwd(logits, mask)[0]


def _masked_softmax_fwd(logits, mask):
  s = jnp.where(mask, logits, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  e = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  inv = 1.0 / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(e.dtype).tiny)
  p = e * inv
  return p, p


def _masked_softmax_bwd(p, g):
  return p * (g - jnp.sum(g * p, axis=-1, keepdims=True)), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


# ---------------------------------------------------------------------------------------------
# Token cross-entropy over the vocabulary
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def cross_entropy(logits_BTV, targets_BT, z_loss: float = 0.0):
  """Per-token -log softmax(logits)[target] + z_loss * logZ^2, fp32. Returns (loss_BT, logZ_BT).

  The forward only reduces over the logits (no exponentials are kept); the backward writes
  d logits = (softmax * (1 + 2 z logZ) - onehot) * g in a single pass.
  """
  return _cross_entropy_fwd(logits_BTV, targets_BT, z_loss)[0]


def _cross_entropy_fwd(logits, targets, z_loss):
  logits = logits.astype(jnp.float32)
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  log_z = jnp.log(jnp.sum(jnp.exp(logits - m), axis=-1)) + m[..., 0]
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  loss = log_z - target_logit
  if z_loss:
    loss = loss + z_loss * jnp.square(log_z)
  return (loss, log_z), (logits, targets, log_z)


def _cross_entropy_bwd(z_loss, res, g):
  logits, targets, log_z = res
  g_loss, g_log_z = g
  coef = g_loss * (1 + 2 * z_loss * log_z) + g_log_z  # d(total)/d(logZ) per token
  onehot = targets[..., None] == jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
  d = jnp.exp(logits - log_z[..., None]) * coef[..., None] - jnp.where(onehot, g_loss[..., None], 0)
  return d, None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


# Dense projections
# ---------------------------------------------------------------------------------------------
def dense(x, w, n: int = 1, quant: str = "none", **kwargs):
  """x's last `n` dims contracted with w's first `n`. On CPU as one 2-D matmul [rows, in] @
  [in, out]: flattening first keeps the backward's dots plain 2-D ones (weight gradient x^T g),
  where from an einsum such as BTD,DF->BTF, whose weight gradient contracts two dims (B and T),
  XLA:CPU transposes the [B*T, F] cotangent and runs a slower dot. Elsewhere the einsum form
  (`dense_reference`), which XLA:TPU compiles to fewer HBM bytes (benchmarks/RESULTS.md).
  `quant` (model.quantization) int8 | fp8: the 2-D matmul quantized, forward and backward
  (quant/qt.py)."""
  if quant != "none":
    return _quantized_dense(x, w, n, quant)
  if platform() != "cpu":
    return dense_reference(x, w, n, **kwargs)
  return _as_matmul(x, w, n, functools.partial(jnp.dot, **kwargs))


def _as_matmul(x, w, n, matmul):
  """`matmul` of x's last `n` dims flattened, [rows, in], and w's first `n`, [in, out]."""
  lead, inner = x.shape[:x.ndim - n], math.prod(x.shape[x.ndim - n:])
  return matmul(x.reshape(-1, inner), w.reshape(inner, -1)).reshape(lead + w.shape[n:])


def _quantized_dense(x, w, n, quant):
  """`dense` with qwix's quantized matmul (any platform: its scales are per row and column)."""
  return _as_matmul(x, w, n, functools.partial(qt.matmul, mode=quant))


def weight_grad(x, g):
  """x^T g summed over all leading (row) dims: [..., I], [..., O] -> [I, O]; 2-D on CPU, as in
  `dense`."""
  if platform() != "cpu":
    rows = tuple(range(x.ndim - 1))
    return jnp.tensordot(x, g, axes=(rows, rows))
  return x.reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])


# ---------------------------------------------------------------------------------------------
# Output projection with the embedding table (tied weights)
# ---------------------------------------------------------------------------------------------
@jax.custom_vjp
def unembed(x_BTD, table_VD):
  """fp32 logits x @ table^T (accumulated in fp32). The backward forms the table's gradient as
  (x^T g)^T, so the transpose falls on the small [D, V] result, not on the [B*T, V] cotangent."""
  return dense(x_BTD, table_VD.T, preferred_element_type=jnp.float32)


def _unembed_fwd(x, table):
  return unembed(x, table), (x, table)


def _unembed_bwd(res, g_BTV):
  x, table = res
  g = g_BTV.astype(x.dtype)  # as autodiff does; the dots return the compute dtype
  dt_DV = weight_grad(x, g)
  if platform() == "cpu":  # keep XLA from folding the transpose into the dot: g^T x is slower
    dt_DV = jax.lax.optimization_barrier(dt_DV)
  return dense(g, table), dt_DV.T.astype(table.dtype)


unembed.defvjp(_unembed_fwd, _unembed_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a, b):
  """einsum(spec, a, b) accumulated and returned in fp32 (e.g. attention scores from bf16 q and
  k). Its backward casts the fp32 cotangent to the operands' dtype first, so the two backward
  matmuls run in that dtype as well (plain autodiff would run them in fp32: TF32 at best on a
  GPU); with fp32 operands it is autodiff's."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _einsum_f32_fwd(spec, a, b):
  return einsum_f32(spec, a, b), (a, b)


def _einsum_f32_bwd(spec, res, g):
  a, b = res
  _, vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a, b)
  return vjp(g.astype(jnp.result_type(a, b)))


einsum_f32.defvjp(_einsum_f32_fwd, _einsum_f32_bwd)


# ---------------------------------------------------------------------------------------------
# Reference formulas (plain autodiff): what the ops above must equal, and the benchmark's
# `--reference_ops` baseline for measuring what each hand-written backward buys.
# ---------------------------------------------------------------------------------------------
def normalize_reference(x, scale, bias, eps, center):
  if center:
    x = x - jnp.mean(x, axis=-1, keepdims=True)
  y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * _row(scale, x)
  return y if bias is None else y + _row(bias, y)


def gelu_reference(u):
  return jax.nn.gelu(u, approximate=True)


def masked_softmax_reference(logits, mask):
  return jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1)


def cross_entropy_reference(logits, targets, z_loss=0.0):
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  loss = log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return (loss + z_loss * jnp.square(log_z) if z_loss else loss), log_z


def dense_reference(x, w, n=1, quant="none", **kwargs):
  """The einsum form (e.g. BTD,DF->BTF): batch and length dims kept apart (quantized: `dense`'s
  form)."""
  if quant != "none":
    return _quantized_dense(x, w, n, quant)
  return jnp.tensordot(x, w, axes=n, **kwargs)


def unembed_reference(x, table):
  return jnp.einsum("BTD,VD->BTV", x, table, preferred_element_type=jnp.float32)


REFERENCES = {"normalize": normalize_reference, "gelu": gelu_reference,
              "masked_softmax": masked_softmax_reference, "cross_entropy": cross_entropy_reference,
              "unembed": unembed_reference, "dense": dense_reference}


def use_references(names):
  """Swaps the named ops for their reference formulas (affects functions traced afterwards);
  returns a function that restores them. For benchmarks and tests."""
  saved = {}
  for name in names:
    if name not in REFERENCES:
      raise ValueError(f"unknown op {name!r}; known: {', '.join(REFERENCES)}")
    saved[name] = globals()[name]
    globals()[name] = REFERENCES[name]
  return lambda: globals().update(saved)
