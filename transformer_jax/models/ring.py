"""Ring attention (Liu et al. 2023): self-attention over a sequence sharded along a mesh axis.

Each device holds one chunk of the queries, keys and values. In P steps (P devices on the axis)
every device attends its queries to the key/value chunk it holds, folds the result into running
flash-attention statistics (row max, normaliser, weighted sum; fp32), and passes the chunk on to
the next device with `ppermute`, so every query meets every key while no device ever holds more
than two chunks. XLA schedules each step's transfer alongside its compute. Masks are built from
each slot's segment id and original position, so packed rows, causal masks and sliding windows
are exact; a (query chunk, key chunk) pair with nothing visible is skipped (`lax.cond`).

Causal masks are load-balanced: the sequence is cut into 2P chunks and device i holds chunks i
and 2P-1-i (a "zigzag"), so every device has the same share of the visible (lower-triangle)
work. The permutation is applied before the ring and undone after it, inside the same program.
Gradients are JAX's autodiff of the loop (the transpose of a ppermute is the reverse ppermute).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P


def zigzag(t: int, p: int) -> np.ndarray:
  """The slot order that gives device i chunks i and 2P-1-i of a length-t sequence."""
  chunks = np.arange(t).reshape(2 * p, t // (2 * p))
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * p - 1 - i]]) for i in range(p)])


def ring_attention(q_BTNGK, k_BTNK, v_BTNK, segment_ids_BT, *, causal: bool, axis: str,
                   batch_axes=None, head_axes=None, window=0):
  """Self-attention (q already scaled) with T sharded over mesh `axis` of the context mesh;
  `batch_axes` / `head_axes` shard the batch and the key/value heads as the activations are.
  `window` > 0: only keys with |i - j| < window (see attention.py). T must be a multiple of P
  (2P when causal)."""
  mesh = jax.sharding.get_abstract_mesh()
  p, t = mesh.shape[axis], q_BTNGK.shape[1]
  order = zigzag(t, p) if causal else np.arange(t)
  positions_T = jnp.asarray(order, jnp.int32)
  if causal:
    q_BTNGK, k_BTNK, v_BTNK, segment_ids_BT = (
        jnp.take(x, positions_T, axis=1) for x in (q_BTNGK, k_BTNK, v_BTNK, segment_ids_BT))
  spec = P(batch_axes, axis, head_axes)
  local = jax.shard_map(
      lambda *a: _ring(*a, causal=causal, axis=axis, p=p, window=window), mesh=mesh,
      in_specs=(spec, spec, spec, P(batch_axes, axis), P(axis)), out_specs=spec,
      check_vma=False)
  out_BTNGK = local(q_BTNGK, k_BTNK, v_BTNK, segment_ids_BT, positions_T)
  if causal:
    out_BTNGK = jnp.take(out_BTNGK, jnp.asarray(np.argsort(order), jnp.int32), axis=1)
  return out_BTNGK


def _ring(q_BTNGK, k_BSNK, v_BSNK, seg_q_BT, pos_q_T, *, causal, axis, p, window):
  """One device's part: its query chunk against every key/value chunk as they come round."""
  b, t, n, g, _ = q_BTNGK.shape
  # Causal: the zigzag's two half chunks are skipped or computed apiece (of the four pairs of
  # halves one is never visible and two are only on the diagonal steps), so the ring does about
  # the causal half of the T x T work.
  parts = 2 if causal else 1
  h = t // parts
  halves = lambda x, i: x[:, i * h:(i + 1) * h]  # pylint: disable=unnecessary-lambda-assignment
  stats = [(jnp.zeros((b, h) + q_BTNGK.shape[2:], jnp.float32),  # sum of exp(s - max) * value
            jnp.full((b, n, g, h), -jnp.inf, jnp.float32),  # running row max
            jnp.zeros((b, n, g, h), jnp.float32))  # running normaliser
           for _ in range(parts)]
  perm = [(i, (i + 1) % p) for i in range(p)]

  def fold(stats, q_BTNGK, k_BSNK, v_BSNK, mask_BTS):
    o_BTNGK, m_BNGT, l_BNGT = stats
    s_BNGTS = jnp.einsum("BTNGK,BSNK->BNGTS", q_BTNGK, k_BSNK,
                         preferred_element_type=jnp.float32)
    s_BNGTS = jnp.where(mask_BTS[:, None, None], s_BNGTS, -jnp.inf)
    # The shift only keeps exp() in range: the result does not depend on it.
    m_new = jax.lax.stop_gradient(jnp.maximum(m_BNGT, s_BNGTS.max(-1)))
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    e_BNGTS = jnp.exp(s_BNGTS - shift[..., None])
    keep_BNGT = jnp.exp(m_BNGT - shift)
    o_BTNGK = (o_BTNGK * keep_BNGT.transpose(0, 3, 1, 2)[..., None]
               + jnp.einsum("BNGTS,BSNK->BTNGK", e_BNGTS.astype(v_BSNK.dtype), v_BSNK,
                            preferred_element_type=jnp.float32))
    return o_BTNGK, m_new, l_BNGT * keep_BNGT + e_BNGTS.sum(-1)

  def step(carry, _):
    stats, k_BSNK, v_BSNK, seg_k_BS, pos_k_S = carry
    mask_BTS = seg_q_BT[:, :, None] == seg_k_BS[:, None, :]
    d_TS = pos_q_T[:, None] - pos_k_S[None, :]
    if causal:
      mask_BTS &= (d_TS >= 0)[None]
    if not isinstance(window, int) or window:
      mask_BTS &= ((jnp.abs(d_TS) < window) | (window == 0))[None]
    stats = list(stats)
    for i in range(parts):
      for j in range(parts):
        sub_BTS = halves(mask_BTS, i)[:, :, j * h:(j + 1) * h]
        stats[i] = jax.lax.cond(jnp.any(sub_BTS), fold, lambda stats, *_: stats, stats[i],
                                halves(q_BTNGK, i), halves(k_BSNK, j), halves(v_BSNK, j),
                                sub_BTS)
    passed = [jax.lax.ppermute(x, axis, perm) for x in (k_BSNK, v_BSNK, seg_k_BS, pos_k_S)]
    return (stats, *passed), None

  # Rematerialized per step: the backward pass keeps each step's carry (the running statistics
  # and the chunk in hand), not its scores, and recomputes them: O(T/P) memory per step.
  (stats, *_), _ = jax.lax.scan(jax.checkpoint(step, prevent_cse=False),
                                (stats, k_BSNK, v_BSNK, seg_q_BT, pos_q_T), None, length=p)
  o_BTNGK = jnp.concatenate([o for o, _, _ in stats], axis=1)
  l_BTNG = jnp.concatenate([l for _, _, l in stats], axis=-1).transpose(0, 3, 1, 2)
  return (o_BTNGK / jnp.where(l_BTNG > 0, l_BTNG, 1.0)[..., None]).astype(q_BTNGK.dtype)
