"""Ring attention (Liu et al. 2023): self-attention over a sequence sharded along a mesh axis.

Each device holds one chunk of the queries, keys and values. In P steps (P devices on the axis)
every device attends its queries to the key/value chunk it holds, folds the result into running
flash-attention statistics (row max, normaliser, weighted sum; fp32), and passes the chunk on to
the next device with `ppermute`, so every query meets every key while no device ever holds more
than two chunks. XLA schedules each step's transfer alongside its compute. Masks are built from
each slot's segment id and original position, so packed rows, causal masks and sliding windows
are exact; a (query chunk, key chunk) pair with nothing visible is skipped (`lax.cond`).

The backward pass is written out (a custom VJP, as FlashAttention's): the forward keeps only its
output and each row's log-sum-exp; the backward sends every key/value chunk round the ring again
with its gradients dK and dV riding along, each device adding its queries' share, and one last
hop brings them home. Nothing grows with P: a device holds its own chunk, one visiting chunk and
their gradients, and recomputes each block's probabilities from the log-sum-exp.

Causal masks are load-balanced: the sequence is cut into 2P chunks and device i holds chunks i
and 2P-1-i (a "zigzag"), so every device has the same share of the visible (lower-triangle)
work. The permutation is applied before the ring and undone after it, inside the same program.
"""

import functools

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
  `window` > 0 (a Python int or a traced per-layer scalar): only keys with |i - j| < window
  (see attention.py). T must be a multiple of P (2P when causal)."""
  mesh = jax.sharding.get_abstract_mesh()
  p, t = mesh.shape[axis], q_BTNGK.shape[1]
  order = zigzag(t, p) if causal else np.arange(t)
  positions_T = jnp.asarray(order, jnp.int32)
  if causal:
    q_BTNGK, k_BTNK, v_BTNK, segment_ids_BT = (
        jnp.take(x, positions_T, axis=1) for x in (q_BTNGK, k_BTNK, v_BTNK, segment_ids_BT))
  spec = P(batch_axes, axis, head_axes)
  static = (causal, axis, p, not isinstance(window, int) or window > 0)
  # jax.checkpoint: differentiated inside a scanned stack, the custom VJP's forward loop would
  # otherwise keep every ring step's scores for the backward (measured: 90.9 GiB per v5p chip
  # instead of 11.4 for a Llama-3-8B shape at 128k tokens); the checkpoint keeps its inputs only.
  local = jax.shard_map(
      jax.checkpoint(functools.partial(_ring, static)), mesh=mesh,
      in_specs=(spec, spec, spec, P(batch_axes, axis), P(axis), P()), out_specs=spec,
      check_vma=False)
  out_BTNGK = local(q_BTNGK, k_BTNK, v_BTNK, segment_ids_BT, positions_T,
                    jnp.asarray(window, jnp.int32))
  if causal:
    out_BTNGK = jnp.take(out_BTNGK, jnp.asarray(np.argsort(order), jnp.int32), axis=1)
  return out_BTNGK


# One device's part, below. `static` = (causal, axis, P, windowed). Causal: the zigzag's two half
# chunks are visited apiece (of the four pairs of halves one is never visible and two only on
# the diagonal steps), so the ring does about the causal half of the T x T work.

def _parts(static):
  return 2 if static[0] else 1


def _split(x, parts, axis=1):
  return jnp.split(x, parts, axis=axis)


def _pass(static, xs):
  """Hands every array of `xs` to the next device of the ring."""
  _, axis, p, _ = static
  return [jax.lax.ppermute(x, axis, [(i, (i + 1) % p) for i in range(p)]) for x in xs]


def _visible(static, seg_q_BT, pos_q_T, seg_k_BS, pos_k_S, window):
  """[[mask_BTS of query half i x key half j]]: same segment, causal, inside the window."""
  causal, _, _, windowed = static
  mask_BTS = seg_q_BT[:, :, None] == seg_k_BS[:, None, :]
  d_TS = pos_q_T[:, None] - pos_k_S[None, :]
  if causal:
    mask_BTS &= (d_TS >= 0)[None]
  if windowed:
    mask_BTS &= ((jnp.abs(d_TS) < window) | (window == 0))[None]
  return [_split(m, _parts(static), axis=2) for m in _split(mask_BTS, _parts(static))]


def _if_visible(mask_BTS, block, carry, *args):
  """block(carry, *args, mask_BTS) where the mask lets anything through, else carry as it is."""
  return jax.lax.cond(jnp.any(mask_BTS), block, lambda carry, *_: carry, carry, *args, mask_BTS)


def _scores(q_BTNGK, k_BSNK, mask_BTS):
  s_BNGTS = jnp.einsum("BTNGK,BSNK->BNGTS", q_BTNGK, k_BSNK, preferred_element_type=jnp.float32)
  return jnp.where(mask_BTS[:, None, None], s_BNGTS, -jnp.inf)


def _fold(stats, q_BTNGK, k_BSNK, v_BSNK, mask_BTS):
  """Online softmax: folds one key block into a query block's running statistics."""
  o_BTNGK, m_BNGT, l_BNGT = stats
  s_BNGTS = _scores(q_BTNGK, k_BSNK, mask_BTS)
  m_new = jnp.maximum(m_BNGT, s_BNGTS.max(-1))
  shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # keeps exp() in range; cancels out
  e_BNGTS = jnp.exp(s_BNGTS - shift[..., None])
  keep_BNGT = jnp.exp(m_BNGT - shift)
  o_BTNGK = (o_BTNGK * keep_BNGT.transpose(0, 3, 1, 2)[..., None]
             + jnp.einsum("BNGTS,BSNK->BTNGK", e_BNGTS.astype(v_BSNK.dtype), v_BSNK,
                          preferred_element_type=jnp.float32))
  return o_BTNGK, m_new, l_BNGT * keep_BNGT + e_BNGTS.sum(-1)


def _forward(static, q_BTNGK, k_BSNK, v_BSNK, seg_q_BT, pos_q_T, window):
  """(output, row log-sum-exp [B, N, G, T] fp32) of this device's queries."""
  parts = _parts(static)
  b, t, n, g, _ = q_BTNGK.shape
  h = t // parts
  q_parts = _split(q_BTNGK, parts)

  def visit(stats, chunk):
    k_BSNK, v_BSNK, seg_k_BS, pos_k_S = chunk
    masks = _visible(static, seg_q_BT, pos_q_T, seg_k_BS, pos_k_S, window)
    k_parts, v_parts = _split(k_BSNK, parts), _split(v_BSNK, parts)
    stats = list(stats)
    for i in range(parts):
      for j in range(parts):
        stats[i] = _if_visible(masks[i][j], _fold, stats[i], q_parts[i], k_parts[j], v_parts[j])
    return stats

  def step(carry, _):
    stats, chunk = carry
    return (visit(stats, chunk), _pass(static, chunk)), None

  stats = [(jnp.zeros((b, h, n, g, q_BTNGK.shape[-1]), jnp.float32),  # sum of exp(s - m) v
            jnp.full((b, n, g, h), -jnp.inf, jnp.float32),  # running row max m
            jnp.zeros((b, n, g, h), jnp.float32))  # running normaliser
           for _ in range(parts)]
  chunk = [k_BSNK, v_BSNK, seg_q_BT, pos_q_T]
  (stats, chunk), _ = jax.lax.scan(step, (stats, chunk), None, length=static[2] - 1)
  stats = visit(stats, chunk)
  o_BTNGK = jnp.concatenate([o for o, _, _ in stats], axis=1)
  m_BNGT = jnp.concatenate([m for _, m, _ in stats], axis=-1)
  l_BNGT = jnp.concatenate([l for _, _, l in stats], axis=-1)
  seen_BNGT = l_BNGT > 0  # a query with no visible key (padding) gets 0
  out_BTNGK = o_BTNGK / jnp.where(seen_BNGT, l_BNGT, 1.0).transpose(0, 3, 1, 2)[..., None]
  lse_BNGT = jnp.where(seen_BNGT, m_BNGT + jnp.log(jnp.where(seen_BNGT, l_BNGT, 1.0)), jnp.inf)
  return out_BTNGK.astype(q_BTNGK.dtype), lse_BNGT


def _block_grads(grads, q_BTNGK, k_BSNK, v_BSNK, do_BTNGK, lse_BNGT, delta_BNGT, mask_BTS):
  """Adds one (query block, key block) pair's share to (dq, dk, dv), fp32."""
  dq_BTNGK, dk_BSNK, dv_BSNK = grads
  p_BNGTS = jnp.exp(_scores(q_BTNGK, k_BSNK, mask_BTS) - lse_BNGT[..., None])
  dt = q_BTNGK.dtype
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  dv_BSNK = dv_BSNK + f32("BNGTS,BTNGK->BSNK", p_BNGTS.astype(dt), do_BTNGK)
  dp_BNGTS = f32("BTNGK,BSNK->BNGTS", do_BTNGK, v_BSNK)
  ds_BNGTS = (p_BNGTS * (dp_BNGTS - delta_BNGT[..., None])).astype(dt)
  return (dq_BTNGK + f32("BNGTS,BSNK->BTNGK", ds_BNGTS, k_BSNK),
          dk_BSNK + f32("BNGTS,BTNGK->BSNK", ds_BNGTS, q_BTNGK), dv_BSNK)


def _backward(static, residuals, do_BTNGK):
  """dq, dk, dv: the chunks go round again, each with its dK and dV."""
  q_BTNGK, k_BSNK, v_BSNK, seg_q_BT, pos_q_T, window, out_BTNGK, lse_BNGT = residuals
  parts = _parts(static)
  do_BTNGK = do_BTNGK.astype(q_BTNGK.dtype)
  delta_BNGT = jnp.einsum("BTNGK,BTNGK->BNGT", do_BTNGK, out_BTNGK,
                          preferred_element_type=jnp.float32)
  q_parts, do_parts = _split(q_BTNGK, parts), _split(do_BTNGK, parts)
  lse_parts, delta_parts = _split(lse_BNGT, parts, -1), _split(delta_BNGT, parts, -1)

  def visit(dq_parts, chunk):
    k_BSNK, v_BSNK, seg_k_BS, pos_k_S, dk_parts, dv_parts = chunk
    masks = _visible(static, seg_q_BT, pos_q_T, seg_k_BS, pos_k_S, window)
    k_parts, v_parts = _split(k_BSNK, parts), _split(v_BSNK, parts)
    dq_parts, dk_parts, dv_parts = list(dq_parts), list(dk_parts), list(dv_parts)
    for i in range(parts):
      for j in range(parts):
        dq_parts[i], dk_parts[j], dv_parts[j] = _if_visible(
            masks[i][j], _block_grads, (dq_parts[i], dk_parts[j], dv_parts[j]), q_parts[i],
            k_parts[j], v_parts[j], do_parts[i], lse_parts[i], delta_parts[i])
    return dq_parts, [k_BSNK, v_BSNK, seg_k_BS, pos_k_S, dk_parts, dv_parts]

  def step(carry, _):
    dq_parts, chunk = visit(*carry)
    return (dq_parts, _pass(static, chunk[:4]) + [_pass(static, c) for c in chunk[4:]]), None

  def zeros(x):
    return [jnp.zeros(y.shape, jnp.float32) for y in _split(x, parts)]

  chunk = [k_BSNK, v_BSNK, seg_q_BT, pos_q_T, zeros(k_BSNK), zeros(v_BSNK)]
  (dq_parts, chunk), _ = jax.lax.scan(step, (zeros(q_BTNGK), chunk), None, length=static[2] - 1)
  dq_parts, chunk = visit(dq_parts, chunk)
  dk_BSNK, dv_BSNK = (jnp.concatenate(_pass(static, c), axis=1) for c in chunk[4:])  # home
  return (jnp.concatenate(dq_parts, axis=1).astype(q_BTNGK.dtype),
          dk_BSNK.astype(k_BSNK.dtype), dv_BSNK.astype(v_BSNK.dtype), None, None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(static, q_BTNGK, k_BSNK, v_BSNK, seg_q_BT, pos_q_T, window):
  """One device's part: its query chunk against every key/value chunk as they come round."""
  return _forward(static, q_BTNGK, k_BSNK, v_BSNK, seg_q_BT, pos_q_T, window)[0]


def _ring_fwd(static, *args):
  out_BTNGK, lse_BNGT = _forward(static, *args)
  return out_BTNGK, (*args, out_BTNGK, lse_BNGT)


_ring.defvjp(_ring_fwd, _backward)
