"""Autoregressive sampling with a KV cache: the prompt is prefilled once, then one token a step."""

import functools

import jax
import jax.numpy as jnp


def filter_logits(logits_BV, temperature: float, top_k: int, top_p: float):
  """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
  logits_BV = logits_BV / jnp.maximum(temperature, 1e-6)
  if top_k > 0:
    kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  if 0.0 < top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # The smallest logit still inside the nucleus (the first token is always kept).
    keep = jnp.sum(cum_BV - jax.nn.softmax(sorted_BV, axis=-1) < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_BV, keep - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff, -jnp.inf, logits_BV)
  return logits_BV


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(model, params, prompt_BT, rng, *, max_new_tokens, temperature, top_k, top_p):
  b, t = prompt_BT.shape
  cache = model.init(jax.random.key(0), jnp.zeros((b, t + max_new_tokens), jnp.int32),
                     decode=True)["cache"]
  logits, mutated = model.apply({"params": params, "cache": cache}, prompt_BT, decode=True,
                                mutable=["cache"])

  def pick(logits_BV, key):
    if temperature == 0.0:
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits_BV, temperature, top_k, top_p),
                                  axis=-1).astype(jnp.int32)

  def step(carry, key):
    cache, logits_BV = carry
    token_B = pick(logits_BV, key)
    logits, mutated = model.apply({"params": params, "cache": cache}, token_B[:, None],
                                  decode=True, mutable=["cache"])
    return (mutated["cache"], logits[:, -1]), token_B

  keys = jax.random.split(rng, max_new_tokens)
  _, tokens_NB = jax.lax.scan(step, (mutated["cache"], logits[:, -1]), keys)
  return tokens_NB.T


def generate(model, params, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None):
  """Samples `max_new_tokens` after each prompt (a list of equal-length id lists); returns lists
  of new ids, cut at the first `eos_id`. temperature 0 = greedy."""
  prompt_BT = jnp.asarray(prompt_ids, jnp.int32)
  out = _generate(model, params, prompt_BT, jax.random.key(seed), max_new_tokens=max_new_tokens,
                  temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  rows = []
  for row in jax.device_get(out).tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id)]
    rows.append(row)
  return rows
