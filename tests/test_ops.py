"""Every hand-differentiated op equals its plain-autodiff reference in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.models import ops

# fp32 on CPU: the hand-written backward reorders sums, nothing else.
RTOL, ATOL = 2e-5, 2e-6


def _check(f, ref, args, argnums):
  """Values equal, and the VJP of a random cotangent equals the reference's."""
  out, ref_out = f(*args), ref(*args)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL), out, ref_out)
  cot = jax.tree.map(lambda o: jax.random.normal(jax.random.key(7), o.shape, o.dtype), out)
  for n in argnums:
    g = jax.vjp(lambda a: f(*args[:n], a, *args[n + 1:]), args[n])[1](cot)[0]
    g_ref = jax.vjp(lambda a: ref(*args[:n], a, *args[n + 1:]), args[n])[1](cot)[0]
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5, err_msg=f"grad of arg {n}")


def _normal(i, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(i), shape, jnp.float32)


@pytest.mark.parametrize("center,bias", [(True, True), (True, False), (False, False)])
def test_normalize(center, bias):
  x, scale = _normal(0, (2, 5, 16), 3.0) + 1.0, _normal(1, (16,)) + 1.0
  b = _normal(2, (16,)) if bias else None
  f = lambda x, s, b: ops.normalize(x, s, b, 1e-5, center)
  ref = lambda x, s, b: ops.normalize_reference(x, s, b, 1e-5, center)
  _check(f, ref, (x, scale, b), argnums=(0, 1, 2) if bias else (0, 1))


def test_gelu():
  u = _normal(0, (3, 7, 32), 3.0)
  _check(ops.gelu, ops.gelu_reference, (u,), argnums=(0,))


def test_masked_softmax_matches_reference_and_zeroes_masked_entries():
  s = _normal(0, (2, 3, 8, 8), 4.0)
  mask = jnp.tril(jnp.ones((8, 8), bool))[None, None] & (_normal(1, (2, 1, 8, 8)) > -1.0)
  mask = mask | jnp.eye(8, dtype=bool)[None, None]  # every row keeps at least itself
  _check(ops.masked_softmax, ops.masked_softmax_reference, (s, mask), argnums=(0,))
  assert float(jnp.max(jnp.where(mask, 0.0, ops.masked_softmax(s, mask)))) == 0.0


def test_masked_softmax_fully_masked_row_is_zero_not_nan():
  s = _normal(0, (1, 4, 4))
  mask = jnp.zeros((1, 4, 4), bool).at[:, :2].set(True)  # rows 2 and 3 see nothing
  p = ops.masked_softmax(s, mask)
  g = jax.grad(lambda s: jnp.sum(ops.masked_softmax(s, mask) ** 2))(s)
  assert np.isfinite(np.asarray(p)).all() and np.isfinite(np.asarray(g)).all()
  np.testing.assert_allclose(p[:, 2:], 0.0)


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_cross_entropy(z_loss):
  logits = _normal(0, (2, 6, 50), 5.0)
  targets = jax.random.randint(jax.random.key(1), (2, 6), 0, 50)
  f = lambda lg: ops.cross_entropy(lg, targets, z_loss)
  ref = lambda lg: ops.cross_entropy_reference(lg, targets, z_loss)
  _check(f, ref, (logits,), argnums=(0,))


def test_unembed():
  x, table = _normal(0, (2, 5, 16)), _normal(1, (40, 16))
  _check(ops.unembed, ops.unembed_reference, (x, table), argnums=(0, 1))


@pytest.mark.parametrize("n,w_shape", [(1, (16, 24)), (1, (16, 3, 8)), (2, (5, 16, 12))])
def test_dense(n, w_shape):
  """One flat 2-D matmul = the einsum over the trailing dims, for weights with head axes (q/k/v:
  [D, H, K]) and two contracted dims (the attention output: [H, K, D] from [B, T, H, K])."""
  x, w = _normal(0, (2, 7, 5, 16) if n == 2 else (2, 7, 16)), _normal(1, w_shape)
  f = lambda a, b: ops.dense(a, b, n=n)
  ref = lambda a, b: ops.dense_reference(a, b, n=n)
  assert f(x, w).shape == x.shape[:x.ndim - n] + w.shape[n:]
  _check(f, ref, (x, w), argnums=(0, 1))


@pytest.mark.parametrize("where,flat", [("cpu", True), ("tpu", False), ("gpu", False)])
def test_dense_is_flat_on_cpu_only(monkeypatch, where, flat):
  """The 2-D form is for XLA:CPU; TPU and GPU compile the einsum (dense_reference)."""
  monkeypatch.setattr(ops, "platform", lambda: where)
  x, w = _normal(0, (2, 7, 16)), _normal(1, (16, 24))
  # fresh lambdas: JAX caches traces per function, and the platform is not part of the key
  jaxpr = jax.make_jaxpr(lambda a, b: ops.dense(a, b))(x, w)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert [e.invars[0].aval.ndim for e in dots] == [2 if flat else 3], jaxpr
  jaxpr = jax.make_jaxpr(lambda a, g: ops.weight_grad(a, g))(x, ops.dense_reference(x, w))
  assert ("reshape" in str(jaxpr)) == flat, jaxpr


def test_use_references_swaps_and_restores():
  restore = ops.use_references(["gelu"])
  try:
    assert ops.gelu is ops.gelu_reference
  finally:
    restore()
  assert ops.gelu is not ops.gelu_reference
  with pytest.raises(ValueError, match="unknown op 'nope'"):
    ops.use_references(["nope"])


def test_einsum_f32_backward_runs_in_the_operands_dtype():
  """fp32 operands: values and gradients are autodiff's. bf16 operands: the fp32 result is
  autodiff's, and the gradients are those of the bf16 einsum fed the rounded cotangent, from
  bf16 dots only (no fp32 matmul in the backward)."""
  spec = "BTNK,BSNK->BNTS"
  rng = np.random.default_rng(0)
  a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((2, 8, 2, 4), (2, 6, 2, 4)))
  g = jnp.asarray(rng.normal(size=(2, 2, 8, 6)), jnp.float32)
  plain = lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)  # pylint: disable=unnecessary-lambda-assignment
  ours = lambda a, b: ops.einsum_f32(spec, a, b)  # pylint: disable=unnecessary-lambda-assignment
  for x, y in zip(jax.vjp(ours, a, b)[1](g), jax.vjp(plain, a, b)[1](g)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  out, vjp = jax.vjp(ours, a16, b16)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, plain(a16, b16))
  want = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), a16, b16)[1](g.astype(jnp.bfloat16))
  for x, y in zip(vjp(g), want):
    assert x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))
  hlo = jax.jit(lambda a, b, g: jax.vjp(ours, a, b)[1](g)).lower(a16, b16, g).as_text()
  assert "dot_general" in hlo and not any("f32>" in line.split("->")[0].split(":")[-1]
                                          for line in hlo.splitlines() if "dot_general" in line)
