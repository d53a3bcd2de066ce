"""Beam search for encoder-decoders: the source is encoded once, each of the K beams keeps its own
decoder KV cache (rows reordered as beams are re-ranked), and finished hypotheses (kept apart
from the beams) are ranked with GNMT's length penalty: score = log p(y | x) / ((5 + |y|) / 6) **
alpha, |y| counting eos."""

import functools

import jax
import jax.numpy as jnp

from transformer_jax.inference import sampling
from transformer_jax.models import families

NEG_INF = -1e9


def length_penalty(length, alpha: float):
  return ((5.0 + length) / 6.0) ** alpha


def _reorder(cache, rows_R, scanned: bool):
  """The cache rows (batch x beam) picked by `rows_R`; scanned stacks keep layers on axis 0."""
  def pick(x):
    if x.ndim == 0 or (scanned and x.ndim == 1):  # positions / indices: the same for every row
      return x
    return jnp.take(x, rows_R, axis=1 if scanned and x.ndim > 1 else 0)
  return jax.tree.map(pick, cache)


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_len", "start_id",
                                             "eos_id", "alpha"))
def _beam_search(model, params, source_BS, *, beam_size, max_len, start_id, eos_id, alpha):
  b, k = source_BS.shape[0], beam_size
  source_RS = jnp.repeat(source_BS, k, axis=0)  # row r = (batch r // K, beam r % K)
  encoded_RSD = model.apply({"params": params}, source_RS, method=model.encode)
  cache = model.init(jax.random.key(0), source_RS, jnp.zeros((b * k, max_len + 1), jnp.int32),
                     decode=True)["cache"]
  scanned = model.cfg.scan_layers

  def log_probs(cache, tokens_R):
    logits, mutated = model.apply({"params": params, "cache": cache}, encoded_RSD, None,
                                  tokens_R[:, None], decode=True, mutable=["cache"],
                                  method=model.decode)
    return jax.nn.log_softmax(logits[:, -1].astype(jnp.float32)), mutated["cache"]

  # Only beam 0 is live at the start, so the first step does not pick K copies of one token.
  alive_BK = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (k - 1)), (b, 1))  # log p of each beam
  tokens_BKT = jnp.zeros((b, k, max_len), jnp.int32)
  last_R = jnp.full((b * k,), start_id, jnp.int32)
  best = (jnp.full((b,), NEG_INF), jnp.full((b,), NEG_INF), jnp.zeros((b, max_len), jnp.int32))
  rows_B = jnp.arange(b)

  def step(carry, t):
    """Of the 2K best continuations by log p, those ending in eos among the first K are
    finished (the best, by penalised score, kept apart from the beams); the first K others are
    the next beams. A finished hypothesis is never pushed out by beams that later fall below it
    (HF's BeamSearchScorer, fairseq, t5x)."""
    cache, alive_BK, tokens_BKT, last_R, best = carry
    logp_RV, cache = log_probs(cache, last_R)
    v = logp_RV.shape[-1]
    total_BKV = alive_BK[..., None] + logp_RV.reshape(b, k, v)
    top_B2, pos_B2 = jax.lax.top_k(total_BKV.reshape(b, k * v), 2 * k)
    beam_B2, token_B2 = pos_B2 // v, pos_B2 % v
    eos_B2 = token_B2 == eos_id  # at most one a beam: at most K of the 2K
    done_B2 = jnp.where(eos_B2 & (jnp.arange(2 * k) < k)[None] & (top_B2 > NEG_INF / 2),
                        top_B2 / length_penalty(t + 1, alpha), NEG_INF)
    i_B = jnp.argmax(done_B2, axis=1)
    score_B = done_B2[rows_B, i_B]
    hyp_BT = tokens_BKT[rows_B, beam_B2[rows_B, i_B]].at[:, t].set(eos_id)
    better_B = score_B > best[0]
    best = (jnp.where(better_B, score_B, best[0]),
            jnp.where(better_B, top_B2[rows_B, i_B], best[1]),
            jnp.where(better_B[:, None], hyp_BT, best[2]))
    keep_BK = jnp.argsort(jnp.where(eos_B2, 2 * k, jnp.arange(2 * k)[None]), axis=1)[:, :k]
    beam_BK = jnp.take_along_axis(beam_B2, keep_BK, axis=1)
    token_BK = jnp.take_along_axis(token_B2, keep_BK, axis=1)
    alive_BK = jnp.take_along_axis(top_B2, keep_BK, axis=1)
    tokens_BKT = jnp.take_along_axis(tokens_BKT, beam_BK[..., None], axis=1)
    tokens_BKT = tokens_BKT.at[:, :, t].set(token_BK)
    cache = _reorder(cache, (rows_B[:, None] * k + beam_BK).reshape(-1), scanned)
    return (cache, alive_BK, tokens_BKT, token_BK.reshape(-1), best), None

  carry = (cache, alive_BK, tokens_BKT, last_R, best)
  (_, alive_BK, tokens_BKT, _, best), _ = jax.lax.scan(step, carry, jnp.arange(max_len))
  # The beams still alive at max_len compete with the best finished hypothesis.
  final_BK = alive_BK / length_penalty(max_len, alpha)
  top_B = jnp.argmax(final_BK, axis=1)
  alive_wins_B = final_BK[rows_B, top_B] > best[0]
  return (jnp.where(alive_wins_B[:, None], tokens_BKT[rows_B, top_B], best[2]),
          jnp.where(alive_wins_B, alive_BK[rows_B, top_B], best[1]),
          jnp.where(alive_wins_B, final_BK[rows_B, top_B], best[0]))


def beam_search(model, params, source_ids, *, beam_size: int = 4, max_len: int = 32,
                start_id: int, eos_id: int, alpha: float = 0.6):
  """The best hypothesis per source (a list of equal-length id lists) under the length penalty:
  (token lists cut after eos, log-probabilities, penalised scores)."""
  source_BS = jnp.asarray(source_ids, jnp.int32)
  # (the decoder reads its start token and max_len - 1 picks: the last pick is never fed)
  sampling.check_length(model.cfg, max(source_BS.shape[1], int(max_len)))
  tokens_BT, logp_B, score_B = _beam_search(
      families.for_inference(model), params, source_BS, beam_size=int(beam_size),
      max_len=int(max_len), start_id=int(start_id), eos_id=int(eos_id), alpha=float(alpha))
  rows = []
  for row in jax.device_get(tokens_BT).tolist():
    rows.append(row[:row.index(eos_id) + 1] if eos_id in row else row)
  return rows, jax.device_get(logp_B).tolist(), jax.device_get(score_B).tolist()
