"""Autoregressive sampling with a KV cache: the prompt is prefilled once, then one token a step."""

import functools

import jax
import jax.numpy as jnp

from transformer_jax.models import families
from transformer_jax.parallel import distributed


def filter_logits(logits_BV, temperature: float, top_k: int, top_p: float):
  """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
  logits_BV = logits_BV / jnp.maximum(temperature, 1e-6)
  if top_k > 0:  # the k largest and any tied with the k-th (transformers' TopKLogitsWarper)
    kth = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
  if 0.0 < top_p < 1.0:
    # The fewest tokens whose mass reaches top_p, by rank (ties: the higher id first, as
    # TopPLogitsWarper's ascending sort leaves them), so a tie at the edge is not kept whole;
    # the first token is always kept.
    order_BV = jnp.flip(jnp.argsort(logits_BV, axis=-1, stable=True), axis=-1)
    probs_BV = jax.nn.softmax(jnp.take_along_axis(logits_BV, order_BV, axis=-1), axis=-1)
    keep_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p
    rank_BV = jnp.argsort(order_BV, axis=-1)
    logits_BV = jnp.where(jnp.take_along_axis(keep_BV, rank_BV, axis=-1), logits_BV, -jnp.inf)
  return logits_BV


def _sample_loop(apply_fn, cache, logits_BV, rng, *, max_new_tokens, temperature, top_k, top_p):
  """Picks a token from logits_BV, then max_new_tokens - 1 times feeds the last pick through
  apply_fn(cache, tokens_B1, step) -> (logits_B1V, cache) (step 0, 1, ...) and picks from its
  logits (the last pick is never fed: a prompt of T tokens reads T + N - 1 positions); returns
  the picks [B, N]."""
  def pick(logits_BV, key):
    if temperature == 0.0:
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits_BV, temperature, top_k, top_p),
                                  axis=-1).astype(jnp.int32)

  def step(carry, key_and_step):
    cache, token_B = carry
    key, i = key_and_step
    logits, cache = apply_fn(cache, token_B[:, None], i)
    token_B = pick(logits[:, -1], key)
    return (cache, token_B), token_B

  keys = jax.random.split(rng, max_new_tokens)
  first_B = pick(logits_BV, keys[0])
  _, tokens_NB = jax.lax.scan(step, (cache, first_B),
                              (keys[1:], jnp.arange(max_new_tokens - 1, dtype=jnp.int32)))
  return jnp.concatenate([first_B[:, None], tokens_NB.T], axis=1)


_STATIC = ("model", "max_new_tokens", "temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=_STATIC + ("prefix",))
def _generate(model, params, prompt_BT, rng, pads_B=None, *, max_new_tokens, temperature, top_k,
              top_p, prefix):
  """A decoder: prefill the prompt into the KV cache (a prefix LM's prompt read both ways, as
  its prefix), then one token a step. `pads_B`: each row's left padding (segment id 0, read by
  no token; the prompt's positions start after it)."""
  b, t = prompt_BT.shape
  # (the cache holds what is fed: the prompt and all picks but the last; a prefix LM's random
  # blocks are drawn over its length, which must not pass max_len where full passes stop)
  cache = model.init(jax.random.key(0), jnp.zeros((b, t + max_new_tokens - 1), jnp.int32),
                     decode=True)["cache"]

  def apply_fn(cache, tokens, step=None, in_prefix=0):
    # a prefix LM's steps say "no prefix" (zeros), not nothing: without prefix_BT the model is
    # causal, and BigBird draws its causal random blocks, not the prefix LM's bidirectional ones
    extra = {"prefix_BT": jnp.full(tokens.shape, in_prefix, jnp.int32)} if prefix else {}
    where = ()  # (positions from the cache's count of tokens fed)
    if pads_B is not None:
      at_BT = (jnp.arange(t)[None] if step is None else t + step) - pads_B[:, None]
      where = ((at_BT >= 0).astype(jnp.int32), jnp.maximum(at_BT, 0))
    logits, mutated = model.apply({"params": params, "cache": cache}, tokens, *where,
                                  decode=True, mutable=["cache"], **extra)
    return logits, mutated["cache"]

  logits, cache = apply_fn(cache, prompt_BT, in_prefix=1)
  return _sample_loop(apply_fn, cache, logits[:, -1], rng, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_seq2seq(model, params, source_BS, decoder_BP, rng, sources_BS=None, *,
                      max_new_tokens, temperature, top_k, top_p):
  """An encoder-decoder: the source is encoded once; the decoder is given decoder_BP (its start
  token, then any forced prefix) in one prefill, attending to that cached encoder output (its
  own keys/values in the KV cache), then one token a step. `sources_BS`: the sources' segment
  ids (0: right padding, which neither the encoder nor the decoder reads)."""
  b, p = decoder_BP.shape
  encoded_BSD = model.apply({"params": params}, source_BS, sources_BS, method=model.encode)
  cache = model.init(jax.random.key(0), source_BS,
                     jnp.zeros((b, p + max_new_tokens - 1), jnp.int32),
                     decode=True)["cache"]

  def apply_fn(cache, tokens, step=None):
    del step  # (the decoder's positions: the cache's count of tokens fed)
    logits, mutated = model.apply({"params": params, "cache": cache}, encoded_BSD, sources_BS,
                                  tokens, decode=True, mutable=["cache"], method=model.decode)
    return logits, mutated["cache"]

  logits, cache = apply_fn(cache, decoder_BP)
  return _sample_loop(apply_fn, cache, logits[:, -1], rng, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p)


def check_length(cfg, longest: int, prefix: bool = False):
  """Refuses a generation whose rows read `longest` positions where the model cannot go: past
  learned positions (NaN logits, read as token 0), or a prefix LM's BigBird random blocks past
  max_len (drawn over the cache's length, which no full forward pass matches)."""
  from transformer_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  if longest > cfg.max_len and not reads_past_max_len(cfg, prefix):
    why = "learned positions" if cfg.position == "learned" else "prefix LM random blocks"
    raise ConfigError(f"generation reads {longest} positions, past model.max_len="
                      f"{cfg.max_len} ({why}): shorten the prompt or max_new_tokens")


def reads_past_max_len(cfg, prefix: bool = False) -> bool:
  """Whether a generation may read positions past model.max_len (check_length)."""
  return not (cfg.position == "learned" or (prefix and cfg.random_blocks))


def can_pad(cfg, prefix: bool = False) -> bool:
  """Whether a decoder's prompts of several lengths can share a batch, left-padded: not a prefix
  LM's (its prefix is read both ways) nor where BigBird's random blocks or global tokens count
  cache places."""
  return not (prefix or cfg.random_blocks or cfg.global_tokens)


def generate(model, params, prompt_ids, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             start_id: int | None = None, prefix: bool = False, decoder_ids=None,
             pad_to: int = 0):
  """Samples `max_new_tokens` after each prompt (a list of equal-length id lists); returns lists
  of new ids, cut at the first `eos_id`. temperature 0 = greedy. With `start_id` the model is an
  encoder-decoder, the prompts are its source and decoding starts from start_id, or from each
  row of `decoder_ids` (equal-length id lists the decoder is given, start token included);
  `prefix`: a prefix LM's, whose prompt is its prefix. A decoder's prompts (`can_pad`) may
  differ in length: they are left-padded to the longest, or to `pad_to` (one compiled program
  for the prompts of a bucket), each generating what it would alone; an encoder-decoder's
  sources are right-padded alike (segment id 0, as scoring pads them)."""
  pads = sources = None
  if start_id is not None and (pad_to or len({len(p) for p in prompt_ids}) > 1):
    width = max([pad_to] + [len(p) for p in prompt_ids])
    sources = jnp.asarray([[1] * len(p) + [0] * (width - len(p)) for p in prompt_ids], jnp.int32)
    prompt_ids = [list(p) + [0] * (width - len(p)) for p in prompt_ids]
  if start_id is None and (pad_to or len({len(p) for p in prompt_ids}) > 1):
    if not can_pad(model.cfg, prefix):
      raise ValueError("this model's prompts must be of one length (no left padding)")
    width = max([pad_to] + [len(p) for p in prompt_ids])
    pads = jnp.asarray([width - len(p) for p in prompt_ids], jnp.int32)
    prompt_ids = [[0] * (width - len(p)) + list(p) for p in prompt_ids]
  prompt_BT = jnp.asarray(prompt_ids, jnp.int32)
  if start_id is not None and decoder_ids is None:
    decoder_ids = [[start_id]] * prompt_BT.shape[0]
  longest = prompt_BT.shape[1] - (0 if pads is None else int(pads.min()))
  check_length(model.cfg, longest + max_new_tokens - 1 if start_id is None else
               max(prompt_BT.shape[1], len(decoder_ids[0]) + max_new_tokens - 1), prefix)
  model = families.for_inference(model)
  kwargs = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                top_p=float(top_p))
  if start_id is None:
    out = _generate(model, params, prompt_BT, jax.random.key(seed), pads, prefix=prefix,
                    **kwargs)
  else:
    out = _generate_seq2seq(model, params, prompt_BT, jnp.asarray(decoder_ids, jnp.int32),
                            jax.random.key(seed), sources, **kwargs)
  rows = []
  for row in distributed.fetch(out).tolist():  # (params across hosts: so may the output be)
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id)]
    rows.append(row)
  return rows
