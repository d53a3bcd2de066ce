"""The throughput meter: tokens/s and MFU per log window, the first step's compile time, and the
window's mean loss over the steps whose update was applied (device-side sums: no host sync per
step). Evaluation and a checkpoint's blocking part are timed apart (`paused`): a window's
tokens/s counts its training steps only, and its `paused_s` says how long it stood still."""

import contextlib
import time

import jax
import jax.numpy as jnp

from transformer_jax.data import mixture
from transformer_jax.perf import counting
from transformer_jax.perf import hardware


WINDOW_MEANS = ("loss", "cross_entropy")  # each log line's figure: the window's mean


class Meter:

  def __init__(self, trainer, params):
    c = trainer.config
    self.matmul_params = counting.matmul_params(params, c.model)
    self.flops_per_token = counting.for_config(c, trainer.model.cfg, params)
    peak, self.peak_source = hardware.peak_flops_per_device(trainer.model.cfg.compute_dtype,
                                                            trainer.compiler_options)
    self.peak_total = peak * trainer.mesh.size
    self.tokens_per_step = c.train.batch_size * c.data.seq_len
    self.sources = [src.name for src in mixture.sources(c)]
    self._t0, self._mark, self._first, self._window = time.perf_counter(), None, {}, None
    if trainer.microbatch_search_s:  # (compiles before the first step's: fit.py's, timed there)
      self._first["microbatch_search_s"] = trainer.microbatch_search_s
    self.restart()

  def restart(self):
    """A new window from now (after a rollback)."""
    self._fresh, self._steps, self._act_steps = True, 0, 0  # (_window: zeroed by the next step)
    self._paused = 0.0
    if self._mark is not None:
      self._mark = time.perf_counter()

  def step(self, m: dict):
    """Counts one step's on-device metrics. The run's first step includes compilation: it is
    timed alone (compile_s) and left out of the first window."""
    if self._window is None:  # (compiled with the first step, never inside a timed window)
      self._window = _empty_window(m)
    self._window = _accumulate(self._window, m, self._fresh)
    self._fresh = False
    self._steps += 1
    self._act_steps += any(k.startswith("act_") for k in m)
    if self._mark is None:
      jax.block_until_ready(m)
      self._first["compile_s"] = time.perf_counter() - self._t0
      self._mark, self._steps = time.perf_counter(), 0

  @contextlib.contextmanager
  def paused(self, m):
    """Leaves the time inside (an evaluation, a checkpoint save's blocking part) out of the
    window's tokens/s, adding it to the window's paused_s. The steps already queued (`m`: the
    last step's metrics) finish first, so their time stays in the window."""
    jax.block_until_ready(m)
    start = time.perf_counter()
    try:
      yield
    finally:
      if self._mark is not None:
        spent = time.perf_counter() - start
        self._mark += spent
        self._paused += spent

  def read(self, m: dict, skipped) -> dict:
    """The log line's values: the last step's metrics (its loss as loss_last), the window's mean
    loss (and cross_entropy, where logged), skipped steps so far, tokens_per_s and mfu (none for
    a window of the compile step alone, e.g. a resume's first step logged) (and compile_s once;
    paused_s, the seconds spent evaluating and saving, when there were any); with a
    data.mixture mixture_tokens, {source: the window's tokens}; with train.log_activations each
    act_max/* is the window's largest and each act_rms/* its mean. Starts a new window."""
    m, window = jax.device_get((m, self._window))
    mixed = m.pop("mixture_tokens", None)
    n = int(window["applied"])
    m["loss_last"] = m["loss"]
    m.update({k: float(v) / n if n else float("nan") for k, v in window["sums"].items()})
    m["skipped"] = int(jax.device_get(skipped))
    now = time.perf_counter()
    out = {k: float(v) for k, v in m.items()}
    if self._steps:  # (a window of the compile step alone has no timed step: no figure)
      tps = self.tokens_per_step * self._steps / max(now - self._mark, 1e-9)
      out.update(tokens_per_s=tps, mfu=tps * self.flops_per_token / self.peak_total)
    out.update(self._first)
    if self._paused:
      out["paused_s"] = self._paused
    if mixed is not None:
      out["mixture_tokens"] = mixture.window_tokens(self.sources, window["mixture"])
    steps = max(self._act_steps, 1)  # the window's act_max: its largest; act_rms: its mean
    out.update({k: float(v) if k.startswith("act_max") else float(v) / steps
                for k, v in window["acts"].items()})
    self._first = {}
    self.restart()
    self._mark = now
    return out


@jax.jit
def _empty_window(m: dict) -> dict:
  """A window's device-side sums, zero, shaped for the step metrics `m`: the mean losses'
  sums, the applied steps, a data.mixture's tokens per source, the act_* values."""
  zero = {k: jnp.zeros((), jnp.float32) for k in WINDOW_MEANS if k in m}
  window = {"sums": zero, "applied": jnp.zeros((), jnp.int32),
            "acts": {k: jnp.zeros_like(v) for k, v in m.items() if k.startswith("act_")}}
  if "mixture_tokens" in m:
    window["mixture"] = jnp.zeros_like(m["mixture_tokens"])
  return window


@jax.jit
def _accumulate(window: dict, m: dict, fresh) -> dict:
  """`window` with one more step's metrics `m` (from zero when `fresh`: a new window): one
  program for every step, compiled with the first. (Eager adds of Python numbers to arrays were
  compiled anew at the second step, inside the first timed window: its tokens/s came out at a
  quarter of the next windows'.) A step whose update was not applied adds no loss."""
  window = jax.tree.map(lambda x: jnp.where(fresh, jnp.zeros_like(x), x), window)
  bad = m["nonfinite"] | m["spike"]
  out = {"sums": {k: v + jnp.where(bad, 0.0, m[k]).astype(v.dtype)
                  for k, v in window["sums"].items()},
         "applied": window["applied"] + 1 - bad.astype(jnp.int32),
         "acts": {k: jnp.where(fresh, m[k], jnp.maximum(v, m[k]) if k.startswith("act_max")
                                else v + m[k]) for k, v in window["acts"].items()}}
  if "mixture" in window:
    out["mixture"] = window["mixture"] + m["mixture_tokens"]
  return out
