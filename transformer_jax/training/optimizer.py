"""AdamW with a weight-decay mask, global-norm clipping and the learning-rate schedules."""

import jax
import jax.numpy as jnp
import optax


def schedule(opt, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine | linear | rsqrt | wsd | constant."""
  peak, warmup = opt.learning_rate, opt.warmup_steps
  decay = max((opt.decay_steps or total_steps) - warmup, 1)
  final = peak * opt.min_lr_ratio
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay, alpha=opt.min_lr_ratio)
  elif opt.schedule == "linear":
    after = optax.linear_schedule(peak, final, decay)
  elif opt.schedule == "rsqrt":  # the original Transformer's: peak * sqrt(warmup / step)
    w = max(warmup, 1)
    after = lambda s: peak * jnp.sqrt(w / jnp.maximum(s + w, 1))
  elif opt.schedule == "wsd":  # warmup-stable-decay: flat, then a linear cool-down at the end
    # over the last `cool` trained steps, the last at the final lr (ending at step decay, which
    # is never trained, left one step at the peak: a cool-down of 1 did not cool at all)
    cool = max(int(decay * opt.wsd_decay_fraction), 1)
    after = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, final, cool)],
        [decay - cool - 1])
  else:
    after = optax.constant_schedule(peak)
  return optax.join_schedules([warm, after], [warmup])


EMBEDDING_TABLES = ("tokens", "positions", "types")


def decay_mask(params, decay_embeddings: bool):
  """True for the weight matrices; never for biases (every name ending in "bias": [H, K]
  attention biases, T5's relative_bias table) or norm scales, and for the embedding tables
  (embed/tokens, positions, types) only when asked. By name: a shape cannot tell an attention
  bias from a matrix, nor a scanned stack's (layers/, encoder/layers/) from an unrolled one's."""
  def keep(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if names[-1] == "scale" or names[-1].endswith("bias"):
      return False
    is_table = len(names) >= 2 and names[-2] == "embed" and names[-1] in EMBEDDING_TABLES
    return decay_embeddings or not is_table
  return jax.tree_util.tree_map_with_path(keep, params)


def make(opt, total_steps: int):
  """Returns (optax transformation, schedule)."""
  lr = schedule(opt, total_steps)
  parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip > 0 else []
  parts.append(optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay,
                           mask=lambda p: decay_mask(p, opt.decay_embeddings)))
  return optax.chain(*parts), lr


def at_step(opt_state, step):
  """`opt_state` with its schedule's count set to the train step, so that the learning rate
  follows the step through skipped (anomalous) steps and a rollback's jump over bad batches, as
  the logged one does; Adam's own count (its bias correction) stays the updates applied."""
  def is_schedule(x):
    return isinstance(x, optax.ScaleByScheduleState)
  return jax.tree.map(
      lambda s: s._replace(count=jnp.asarray(step, s.count.dtype)) if is_schedule(s) else s,
      opt_state, is_leaf=is_schedule)
