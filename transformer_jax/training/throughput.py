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
    self._t0, self._mark, self._first = time.perf_counter(), None, {}
    self.restart()

  def restart(self):
    """A new window from now (after a rollback)."""
    self._sums, self._applied, self._steps, self._mixture = {"loss": 0.0}, 0, 0, 0.0
    self._acts, self._act_steps = {}, 0  # log_activations: act_max's window max, act_rms' sum
    self._paused = 0.0
    if self._mark is not None:
      self._mark = time.perf_counter()

  def step(self, m: dict):
    """Counts one step's on-device metrics. The run's first step includes compilation: it is
    timed alone (compile_s) and left out of the first window."""
    bad = m["nonfinite"] | m["spike"]
    for k in WINDOW_MEANS:
      if k in m:
        self._sums[k] = self._sums.get(k, 0.0) + jnp.where(bad, 0.0, m[k])
    self._applied = self._applied + (1 - bad.astype(jnp.int32))
    self._steps += 1
    if "mixture_tokens" in m:  # the window's tokens per source of a data.mixture
      self._mixture = self._mixture + m["mixture_tokens"]
    self._act_steps += any(k.startswith("act_") for k in m)
    for k, v in m.items():
      if k.startswith("act_"):
        old = self._acts.get(k)
        self._acts[k] = v if old is None else (
            jnp.maximum(old, v) if k.startswith("act_max") else old + v)
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
    m = jax.device_get(m)
    mixed = m.pop("mixture_tokens", None)
    n = int(self._applied)
    m["loss_last"] = m["loss"]
    m.update({k: float(v) / n if n else float("nan") for k, v in self._sums.items()})
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
      out["mixture_tokens"] = mixture.window_tokens(self.sources, jax.device_get(self._mixture))
    steps = max(self._act_steps, 1)  # the window's act_max: its largest; act_rms: its mean
    out.update({k: float(v) if k.startswith("act_max") else float(v) / steps
                for k, v in jax.device_get(self._acts).items()})
    self._first = {}
    self.restart()
    self._mark = now
    return out
