"""The training loop: validate, build sharded state, resume, train, evaluate, checkpoint, log."""

import dataclasses
import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.data import pipeline
from transformer_jax.models.layers import ModelConfig
from transformer_jax.parallel import distributed
from transformer_jax.parallel import sharding
from transformer_jax.training import checkpoint as ckpt_lib
from transformer_jax.training import metrics as metrics_lib
from transformer_jax.training.step import Trainer


def prepare_workdir(workdir: str):
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test-{os.getpid()}-{jax.process_index()}")
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


class Preemption:
  """SIGTERM / SIGINT only set a flag: the loop finishes the step in flight, saves a checkpoint
  (waiting for any async save) and returns, so re-running the same command resumes.

  With several processes they must all stop after the same step: SIGTERM then goes to JAX's
  preemption notifier (jax.distributed installs it), which agrees on that step with the other
  processes (`reached`), and SIGINT is turned into a SIGTERM to this process."""

  def __init__(self):
    self.signum, self._old = None, {}
    self.multi = jax.process_count() > 1
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT,) if self.multi else (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # a second signal: the user insists
      raise KeyboardInterrupt
    if self.multi:
      self.signum = signal.SIGTERM
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.signum = signum

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (the same step on every process)."""
    if self.multi:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        return True
      return False
    return self.signum is not None

  def close(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _inject_nan(batch):
  """Test hook (TJAX_TEST_NAN_STEPS): NaN target weights make this batch's loss and grads NaN."""
  return dict(batch, weights=batch["weights"] * np.float32("nan"))


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


# How a step computes, not what: a run may resume with other values of these.
EXECUTION_KEYS = ("model.attention_impl", "model.attention_chunks", "model.remat")


def workdir_mismatch(config, workdir: str) -> list[str]:
  """`KEY: saved -> now` for each model.* (but EXECUTION_KEYS) or data.tokenizer value that
  differs from the config the workdir's checkpoints were written with (none when there are no
  checkpoints)."""
  saved_path, ckpt_dir = os.path.join(workdir, "config.json"), os.path.join(workdir, "checkpoints")
  if not (os.path.isfile(saved_path) and os.path.isdir(ckpt_dir)
          and any(d.isdigit() for d in os.listdir(ckpt_dir))):
    return []
  with open(saved_path) as f:
    saved = _flat(json.load(f))
  now = _flat(json.loads(config_lib.to_json(config)))
  keys = sorted(k for k in set(saved) | set(now) if (k.startswith("model.") or
                                                     k == "data.tokenizer") and k not in EXECUTION_KEYS)
  # A key newer than the saved config counts as its default there (e.g. model.scan_layers=False).
  defaults = {f"model.{f.name}": f.default for f in dataclasses.fields(ModelConfig)}
  saved.update({k: defaults[k] for k in keys if k not in saved and k in defaults})
  return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]


def train(config, workdir: str, *, stop_after: int | None = None, quiet: bool = False,
          devices=None, nan_steps=()) -> dict:
  """Trains until `train.steps` (or `stop_after` steps into this run, for tests), resuming from
  the latest readable checkpoint in `workdir`. Returns the last logged metrics, plus
  `preempted` (the signal number) when a signal stopped it early."""
  trainer = setup(config, workdir, devices)
  c = config
  lead = jax.process_index() == 0
  say = (lambda msg: tqdm.tqdm.write(msg)) if lead and not quiet else (lambda msg: None)
  diffs, params = workdir_mismatch(c, workdir), None
  if diffs and c.checkpoint.on_mismatch == "refuse":
    raise ConfigError(f"{workdir} holds checkpoints of another model or tokenizer ("
                      f"{'; '.join(diffs)}); use a new --workdir, or "
                      f"--config.checkpoint.on_mismatch=fresh|params")
  if jax.process_count() > 1:  # every process has read config.json before process 0 rewrites it
    multihost_utils.sync_global_devices("workdir checked")
  if diffs:
    old = ckpt_lib.Checkpoints(workdir, c.checkpoint)
    if c.checkpoint.on_mismatch == "params":
      _, params = old.restore_params(trainer.abstract_state.params)
    old.close()
    say(f"checkpoints of the previous config set aside in {ckpt_lib.set_aside(workdir)}")
  ckpts = ckpt_lib.Checkpoints(workdir, c.checkpoint)
  all_rows = distributed.batch_rows(trainer.batch_sharding, c.train.batch_size, c.data.seq_len)
  rows = all_rows[jax.process_index()]
  new_data = lambda: pipeline.make_train_iterator(c, rows)  # pylint: disable=unnecessary-lambda-assignment
  data = new_data()
  data_writes = None if distributed.data_writers(all_rows, jax.process_index()) else ()
  start, state = ckpts.restore(trainer.abstract_state, data, report=say)
  if lead:  # only once the restore has accepted this config: a refused run leaves it as it was
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(c))
  if state is None:
    start, state = 0, trainer.init_state(c.seed)
    if params is not None:
      state = state.replace(params=params)
      say("started from the previous checkpoint's parameters (new optimizer state, step 0)")
  else:
    say(f"resumed from {ckpts.directory}/{start}")
  eval_batches = pipeline.eval_batches(c, c.eval.batches, rows)
  nan_steps = set(nan_steps) | {int(s) for s in os.environ.get("TJAX_TEST_NAN_STEPS", "").split(",")
                                if s}

  n_params = metrics_lib.matmul_params(state.params, c.model.tie_embeddings)
  flops_tok = metrics_lib.flops_per_token(trainer.model.cfg, n_params, c.data.seq_len)
  peak, peak_src = metrics_lib.peak_flops_per_device(trainer.model.cfg.compute_dtype)
  peak_total = peak * trainer.mesh.size
  tokens_per_step = c.train.batch_size * c.data.seq_len
  writer = metrics_lib.Writer(workdir, enabled=lead)
  say(f"workdir {os.path.abspath(workdir)}: {n_params:,} matmul params, "
      f"{jax.device_count()} devices, mesh {dict(trainer.mesh.shape)}, peak {peak_src}")

  rng = jax.random.key(c.seed)
  end = c.train.steps if stop_after is None else min(c.train.steps, start + stop_after)
  bar = tqdm.tqdm(total=c.train.steps, initial=start, disable=quiet or not lead,
                  dynamic_ncols=True)
  preemption = Preemption()
  last, first_log, flags = {}, {}, []  # flags: (step, nonfinite, spike) on device, unchecked
  t_mark, steps_since, t0 = None, 0, time.perf_counter()
  loss_sum, n_loss = 0.0, 0  # device-side sums over applied steps: no host sync per step
  step, finished = start, False
  try:
    while step < end:
      batch = next(data)
      state, m = trainer.train_step(
          state, trainer.put_batch(_inject_nan(batch) if step in nan_steps else batch), rng)
      bad = m["nonfinite"] | m["spike"]
      flags.append((step, m["nonfinite"], m["spike"]))
      loss_sum = loss_sum + jnp.where(bad, 0.0, m["loss"])
      n_loss = n_loss + (1 - bad.astype(jnp.int32))
      done, steps_since = step + 1, steps_since + 1
      if t_mark is None:  # the first step of this run includes compilation
        jax.block_until_ready(m)
        first_log["compile_s"] = time.perf_counter() - t0
        t_mark, steps_since = time.perf_counter(), 0
      is_log = done % c.train.log_every == 0 or done == end
      is_save = done % c.checkpoint.every_steps == 0 or done == end
      stopping = preemption.reached(done)
      if is_log or is_save or stopping:  # anomalies are checked before anything is saved
        events = _anomalies(jax.device_get(flags))
        flags = []
        for ev in events:
          writer.write(ev["batch"] + 1, dict(ev, event="anomaly", policy=c.train.on_anomaly))
        if events and c.train.on_anomaly == "abort":
          raise AnomalyError(
              f"{events[0]['reason']} at step {events[0]['batch'] + 1} (batch "
              f"{events[0]['batch']} of the data order); update not applied. Resume from "
              f"{ckpts.directory} with a lower learning rate, or set train.on_anomaly=skip")
        if events and c.train.on_anomaly == "rollback":
          step, state = _rollback(trainer, ckpts, data, new_data, events, writer, say)
          flags, loss_sum, n_loss, t_mark, steps_since = [], 0.0, 0, time.perf_counter(), 0
          continue
      if is_log:
        m = jax.device_get(m)
        n = int(n_loss)
        m["loss_last"], m["loss"] = m["loss"], float(loss_sum) / n if n else float("nan")
        m["skipped"] = int(jax.device_get(state.skipped))
        loss_sum, n_loss = 0.0, 0
        now = time.perf_counter()
        tps = tokens_per_step * steps_since / max(now - t_mark, 1e-9) if steps_since else 0.0
        t_mark, steps_since = now, 0
        last = {k: float(v) for k, v in m.items()}
        last.update(tokens_per_s=tps, mfu=tps * flops_tok / peak_total, **first_log)
        first_log = {}
        writer.write(done, last)
        if c.train.process_log:
          print(f"[process {jax.process_index()}/{jax.process_count()}] step {done}: "
                f"{tps / jax.process_count():,.0f} tokens/s, batch rows {rows[0]}..{rows[1]}",
                file=sys.stderr, flush=True)
        bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tps:,.0f}")
      if c.eval.every_steps and done % c.eval.every_steps == 0 or done == c.train.steps:
        evals = trainer.evaluate(state.params, eval_batches)
        ev = evals["eval_loss"]
        writer.write(done, {**evals, "eval_perplexity": float(np.exp(min(ev, 50.0)))})
        last.update(evals)
        say(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in evals.items()))
      if is_save or stopping:
        ckpts.save(done, state, data, force=True, data_writes=data_writes)
      bar.update(1)
      step = done
      if stopping:
        ckpts.wait()
        name = signal.Signals(preemption.signum).name
        say(f"{name} received: stopped after step {done}, checkpoint {ckpts.directory}/{done} "
            f"saved; re-run the same command to resume")
        last["preempted"] = preemption.signum
        break
    finished = True
  finally:
    preemption.close()
    bar.close()
    for close in (ckpts.close, writer.close):
      try:  # the last async save's failure surfaces here
        close()
      except Exception:  # pylint: disable=broad-except
        if finished:  # otherwise the error already on its way says more
          raise
  last["step"] = step
  last["state"] = state
  return last


class AnomalyError(RuntimeError):
  """A non-finite or spiking step under train.on_anomaly=abort."""


def _anomalies(flags):
  return [{"batch": int(s), "reason": "non-finite loss or gradient" if nf else "loss spike"}
          for s, nf, sp in flags if nf or sp]


def _rollback(trainer, ckpts, data, new_data, events, writer, say):
  """Restores the newest checkpoint from before the first bad batch and skips the data window
  up to and including the last bad one. Returns (next step, state)."""
  first, last_bad = events[0]["batch"], events[-1]["batch"]
  good = [s for s in ckpts.all_steps() if s <= first]
  if good:
    step, state = ckpts.restore(trainer.abstract_state, data, step=max(good), report=say)
  else:  # nothing saved yet: the initial state and the start of the data
    step, state = 0, trainer.init_state(trainer.config.seed)
    data.set_state(new_data().get_state())
  for _ in range(last_bad + 1 - step):
    next(data)
  state = state.replace(step=jax.device_put(jnp.asarray(last_bad + 1, jnp.int32),
                                            trainer.state_shardings.step))
  writer.write(last_bad + 1, {"event": "rollback", "restored_step": step,
                              "skipped_batches": [step, last_bad]})
  say(f"rollback: restored step {step}, skipped batches {step}..{last_bad}")
  return last_bad + 1, state
