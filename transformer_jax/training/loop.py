"""The training loop: validate, build sharded state, resume, train, evaluate, checkpoint, log."""

import math
import os
import time

import jax
import numpy as np
import tqdm

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.data import pipeline
from transformer_jax.parallel import sharding
from transformer_jax.training import checkpoint as ckpt_lib
from transformer_jax.training import metrics as metrics_lib
from transformer_jax.training.step import Trainer


def prepare_workdir(workdir: str):
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir {workdir} is not writable: {e.strerror}") from None


def setup(config, workdir: str, devices=None):
  """All the cheap checks, then the mesh and the trainer (nothing compiled yet)."""
  devices = devices if devices is not None else jax.devices()
  config_lib.validate(config, len(devices))
  sharding.rules(config)
  pipeline.validate(config)
  prepare_workdir(workdir)
  mesh = sharding.make_mesh(config, devices)
  return Trainer(config, mesh)


def train(config, workdir: str, *, stop_after: int | None = None, quiet: bool = False,
          devices=None) -> dict:
  """Trains until `train.steps` (or `stop_after` steps into this run, for tests), resuming from
  the latest checkpoint in `workdir`. Returns the last logged metrics."""
  trainer = setup(config, workdir, devices)
  c = config
  lead = jax.process_index() == 0
  if lead:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(c))
  ckpts = ckpt_lib.Checkpoints(workdir, c.checkpoint)
  data = pipeline.make_train_iterator(c, jax.process_index(), jax.process_count())
  start, state = ckpts.restore(trainer.abstract_state, data)
  if state is None:
    start, state = 0, trainer.init_state(c.seed)
  elif not quiet and lead:
    print(f"resumed from {ckpts.directory}/{start}")
  eval_batches = pipeline.eval_batches(c, c.eval.batches, jax.process_index(),
                                       jax.process_count())

  n_params = metrics_lib.matmul_params(state.params, c.model.tie_embeddings)
  flops_tok = metrics_lib.flops_per_token(trainer.model.cfg, n_params, c.data.seq_len)
  peak, peak_src = metrics_lib.peak_flops_per_device(trainer.model.cfg.compute_dtype)
  peak_total = peak * trainer.mesh.size
  tokens_per_step = c.train.batch_size * c.data.seq_len
  writer = metrics_lib.Writer(workdir, enabled=lead)
  if lead and not quiet:
    print(f"workdir {os.path.abspath(workdir)}: {n_params:,} matmul params, "
          f"{jax.device_count()} devices, mesh {dict(trainer.mesh.shape)}, peak {peak_src}")

  rng = jax.random.key(c.seed)
  end = c.train.steps if stop_after is None else min(c.train.steps, start + stop_after)
  bar = tqdm.tqdm(total=c.train.steps, initial=start, disable=quiet or not lead,
                  dynamic_ncols=True)
  last, first_log = {}, {}
  t_mark, steps_since, t0 = None, 0, time.perf_counter()
  loss_sum, n_loss = 0.0, 0  # device-side running sum: no host sync between log steps
  for step in range(start, end):
    batch = trainer.put_batch(next(data))
    state, m = trainer.train_step(state, batch, rng)
    done = step + 1
    steps_since += 1
    loss_sum, n_loss = loss_sum + m["loss"], n_loss + 1
    if t_mark is None:  # the first step of this run includes compilation
      jax.block_until_ready(m)
      first_log["compile_s"] = time.perf_counter() - t0
      t_mark, steps_since = time.perf_counter(), 0
    if done % c.train.log_every == 0 or done == end:
      m = jax.device_get(m)
      m["loss_last"], m["loss"] = m["loss"], float(loss_sum) / n_loss
      loss_sum, n_loss = 0.0, 0
      if not math.isfinite(m["loss"]):
        raise FloatingPointError(f"non-finite loss {m['loss']} at step {done}; resume from the "
                                 f"last checkpoint in {ckpts.directory} with a lower learning rate")
      now = time.perf_counter()
      tps = tokens_per_step * steps_since / max(now - t_mark, 1e-9) if steps_since else 0.0
      t_mark, steps_since = now, 0
      last = {k: float(v) for k, v in m.items()}
      last.update(tokens_per_s=tps, mfu=tps * flops_tok / peak_total, **first_log)
      first_log = {}
      writer.write(done, last)
      bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tps:,.0f}")
    if c.eval.every_steps and done % c.eval.every_steps == 0 or done == c.train.steps:
      ev = trainer.eval_loss(state.params, eval_batches)
      writer.write(done, {"eval_loss": ev, "eval_perplexity": float(np.exp(min(ev, 50.0)))})
      last["eval_loss"] = ev
      if not quiet and lead:
        tqdm.tqdm.write(f"step {done}: eval_loss {ev:.4f}")
    if done % c.checkpoint.every_steps == 0 or done == end:
      ckpts.save(done, state, data, force=done == end)
    bar.update(1)
  bar.close()
  ckpts.close()
  writer.close()
  last["step"] = end
  last["state"] = state
  return last
