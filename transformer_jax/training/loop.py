"""The training loop: set up, resume, train, evaluate, checkpoint, log. The policies it applies
live in their own modules: resume.py (whose checkpoints, which state), anomaly.py (what a refused
update leads to), preemption.py (stopping on a signal) and throughput.py (tokens/s, MFU)."""

import sys

import jax
import numpy as np
import tqdm

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import mixture
from transformer_jax.data import pipeline
from transformer_jax.evaluation import harness
from transformer_jax.models import attention
from transformer_jax.parallel import distributed
from transformer_jax.parallel import sharding
from transformer_jax.training import anomaly
from transformer_jax.training import checkpoint
from transformer_jax.training import fit
from transformer_jax.training import integrity
from transformer_jax.training import lock
from transformer_jax.training import metrics as metrics_lib
from transformer_jax.training import resume
from transformer_jax.training import throughput
from transformer_jax.training.preemption import Preemption
from transformer_jax.training.step import Trainer


def setup(config, workdir: str, devices=None):
  """All the cheap checks, then the mesh and the trainer (nothing compiled yet)."""
  devices = devices if devices is not None else jax.devices()
  config_lib.validate(config, len(devices))
  if wrong := attention.wrong_platform(config.model.attention_impl, devices[0].platform):
    raise attention.refusal(config.model.attention_impl, wrong)  # (before any data is prepared)
  sharding.rules(config)
  pipeline.validate(config)
  _check_extras(config)
  resume.prepare_workdir(workdir)
  mesh = sharding.make_mesh(config, devices)
  return Trainer(config, mesh, workdir=workdir)


def _check_extras(config):
  """eval.tasks (read now: a bad path failed at the first evaluation) and the end-of-training
  sample's prompt (it failed after the last step)."""
  harness.check_tasks(config)
  if config.train.sample_prompt:  # (not an encoder's: config_lib.validate)
    from transformer_jax import sample  # pylint: disable=g-import-not-at-top
    sample.prompt_ids(config, pipeline.load_tokenizer(config), config.train.sample_prompt,
                      config.train.sample_tokens, "train.sample_tokens")


def train(config, workdir: str, *, stop_after: int | None = None, quiet: bool = False,
          devices=None) -> dict:
  """Trains until `train.steps` (or `stop_after` steps into this run, for tests), resuming from
  the latest readable checkpoint in `workdir`. Returns the last logged metrics, plus
  `preempted` (the signal number) when a signal stopped it early. Refused while another live
  run owns the workdir (lock.py)."""
  trainer = setup(config, workdir, devices)
  with lock.hold(workdir) as still_ours:
    # train.microbatches=0: before anything is written (a batch may fit nowhere)
    fit.resolve(trainer, tqdm.tqdm.write if jax.process_index() == 0 and not quiet else
                lambda _: None)
    return _run(trainer, workdir, stop_after, quiet, still_ours)


def _run(trainer, workdir: str, stop_after: int | None, quiet: bool, still_ours) -> dict:
  c, lead = trainer.config, jax.process_index() == 0
  say = (lambda msg: tqdm.tqdm.write(msg)) if lead and not quiet else (lambda msg: None)
  all_rows = distributed.batch_rows(trainer.batch_sharding, c.train.batch_size, c.data.seq_len)
  rows = all_rows[jax.process_index()]
  new_data = lambda: pipeline.make_train_iterator(c, rows)  # pylint: disable=unnecessary-lambda-assignment
  data = new_data()
  data_writes = None if distributed.data_writers(all_rows, jax.process_index()) else ()
  first_step = _first_step(trainer, workdir, lead)  # (before start writes config.json)
  start, state, ckpts = resume.start(trainer, workdir, data, say, data_writes)
  if start >= c.train.steps:  # nothing left to do: the finished run's last figures
    say(f"{workdir} already holds the finished run (step {start}, train.steps="
        f"{c.train.steps}); raise --config.train.steps above {start} to train on")
    return dict(metrics_lib.last_logged(workdir), step=start, state=state, complete=True)
  integrity.prepare(trainer.abstract_state)  # (the saves' checksums, while the step compiles)
  eval_sets = pipeline.eval_sets(c, c.eval.batches, rows)  # one per data.mixture source
  if not any(eval_sets.values()):
    say(f"no validation data: data.corpus={c.data.corpus!r} holds no held-out document "
        f"(data.validation_fraction={c.data.validation_fraction}): no eval_loss")
  writer = metrics_lib.Writer(workdir, enabled=lead, resume_step=start, wandb_config=c,
                              still_ours=getattr(still_ours, "mine", None))
  meter = throughput.Meter(trainer, state.params)
  guard = anomaly.Guard(c.train.on_anomaly, writer, say, c.train.max_anomalies_in_a_row)
  say(f"workdir {paths.abspath(workdir)}: {meter.matmul_params:,} matmul params, "
      f"{jax.device_count()} devices, mesh {dict(trainer.mesh.shape)}, peak {meter.peak_source}")
  _say_epochs(c, say, lead and not quiet)
  rng = jax.random.key(c.seed)
  end = c.train.steps if stop_after is None else min(c.train.steps, start + stop_after)
  # (delay: no bar before the first step, whose compile may refuse the config in one line)
  bar = tqdm.tqdm(total=c.train.steps, initial=start, disable=quiet or not lead,
                  dynamic_ncols=True, delay=0.1)
  preemption = Preemption()
  step, last, finished, failed = start, {}, False, None
  try:
    while step < end:
      state, m = (first_step if step == start else trainer.train_step)(
          state, trainer.put_batch(next(data)), rng)
      preemption.started()  # (a Ctrl-C before: `interrupted` at once, nothing unsaved lost)
      guard.track(step, m)
      meter.step(m)
      done = step + 1
      stopping = preemption.reached(done)
      is_save, is_log, is_eval = _due(c, done, end, stopping)
      if is_log or is_eval:  # anomalies are checked before anything is saved or evaluated
        events = guard.check(ckpts)
        if events:  # train.on_anomaly=rollback: on at the step after the last bad batch,
          done, state = anomaly.rollback(trainer, ckpts, data, new_data, events, writer, say)
          meter.restart()  # ... with that step's own save and eval (the final one above all)
          is_save, _, is_eval = _due(c, done, end, stopping)
          is_log = False  # (its window's updates were undone: no loss row)
      if is_log:
        last = meter.read(m, state.skipped)
        _log(writer, bar, done, last, rows, c.train.process_log)
      if is_eval:
        with meter.paused(m):
          last.update(_evaluate(trainer, state.params, eval_sets, writer, done, say))
      # A refused latest update (guard.refusing): no save but the last step's, so the newest
      # checkpoint stays one from before the streak (a re-run replays it, as this run did).
      saving = (is_save or stopping) and not (guard.refusing and done != end)
      if saving:
        _check_ours(still_ours, writer)
        writer.flush()  # a gs:// metrics.jsonl holds every line up to a step before it is saved
        with meter.paused(m):
          ckpts.save(done, state, data, force=True, data_writes=data_writes)
      bar.update(done - step)
      step = done
      if stopping:
        say(_stopped(preemption, ckpts, guard, done, saving))
        last["preempted"] = preemption.signum
        break
    finished = True
  except checkpoint.WriteError as e:  # storage failed under a save or a metrics write
    failed = e
    raise
  finally:
    preemption.close()
    bar.close()
    _close(ckpts, writer, finished, failed)
  return dict(last, step=step, state=state)


def _close(ckpts, writer, finished: bool, failed):
  """Closes both; the last async save's failure surfaces here. An error already on its way
  says more, except when storage failed under it (`failed`: a full disk that a TensorBoard write
  found first) and the save in flight failed too: the save's line names the intact checkpoints
  and the step a re-run resumes from."""
  raising = None
  for close, saves in ((ckpts.close, True), (writer.close, False)):
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      if finished or (failed and saves and isinstance(e, checkpoint.WriteError)):
        raising = raising or e
  if raising is not None:
    raise raising


def _first_step(trainer, workdir: str, lead: bool):
  """trainer.train_step for a run's first step: a config it refuses when traced (a kernel the
  platform lacks) puts back the files resume.start wrote, as they are now (process 0's)."""
  before = resume.written_files(workdir) if lead else {}

  def step(*args):
    try:
      return trainer.train_step(*args)
    except ConfigError:  # this config never ran here
      resume.put_back(workdir, before)
      raise
  return step


def _stopped(preemption, ckpts, guard, done: int, saved: bool) -> str:
  """The line a signal's stop says, once its save is complete. Inside a streak of refused
  updates nothing was saved: a re-run resumes from the checkpoint before it and replays it, as
  this run would have gone on."""
  ckpts.wait()
  steps = ckpts.all_steps()
  return f"{preemption.name} received: stopped after step {done}, " + (
      f"checkpoint {ckpts.directory}/{done} saved; re-run the same command to resume" if saved
      else f"nothing saved: its last {guard.in_a_row} updates were not applied (train.on_anomaly"
      f"={guard.policy}); re-run the same command to resume from "
      + (f"checkpoint {steps[-1]}" if steps else "the start"))


def _check_ours(still_ours, writer):
  """Before a save: another run took over the workdir? Then write nothing more to it."""
  try:
    still_ours()
  except lock.LockLost:
    writer.stop_writing()
    raise


def _due(c, done: int, end: int, stopping: bool) -> tuple[bool, bool, bool]:
  """(save, log, eval): what step `done` does (`end`: this run's last step)."""
  is_save = done % c.checkpoint.every_steps == 0 or done == end
  # A row at every checkpoint too: the log window's sums are not saved, so a resume's first
  # row would average fewer steps than the uninterrupted run's.
  is_log = done % c.train.log_every == 0 or done == end or is_save or stopping
  is_eval = bool(c.eval.every_steps and done % c.eval.every_steps == 0 or done == c.train.steps)
  return is_save, is_log, is_eval


def _say_epochs(config, say, enabled: bool):
  """How often train.steps repeat each source's documents (estimated: pipeline.planned_epochs)."""
  for name, (docs, tokens, epochs) in (pipeline.planned_epochs(config) if enabled else {}).items():
    where = f"data.mixture source {name!r}" if name else f"data.corpus={config.data.corpus!r}"
    say(f"{where}: {docs:,} training documents, ~{tokens:,.0f} tokens; train.steps="
        f"{config.train.steps} read them ~{epochs:.3g} times"
        + (" (repeated data adds less past ~4 epochs)" if epochs > 4 else ""))


def _log(writer, bar, step: int, values: dict, rows, process_log: bool):
  writer.write(step, values)
  if process_log:
    print(f"[process {jax.process_index()}/{jax.process_count()}] step {step}: "
          f"{values.get('tokens_per_s', 0.0) / jax.process_count():,.0f} tokens/s, batch rows "
          f"{rows[0]}..{rows[1]}", file=sys.stderr, flush=True)
  bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values.get('tokens_per_s', 0.0):,.0f}")

def _evaluate(trainer, params, eval_sets, writer, step: int, say) -> dict:
  per_source = {name: trainer.evaluate(params, b) for name, b in eval_sets.items()}
  probs = {src.name: src.probability for src in mixture.sources(trainer.config)}
  evals = dict(mixture.mixed_eval(per_source, probs) if probs else per_source[""])
  evals.update(harness.during_training(trainer, params))  # eval.tasks' downstream metrics
  if not evals:  # no validation data (said at start-up) and no eval.tasks: nothing to log
    return {}
  perplexity = ({"eval_perplexity": float(np.exp(min(evals["eval_loss"], 50.0)))}
                if "eval_loss" in evals else {})
  writer.write(step, {**evals, **perplexity})
  say(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evals.items()
                                   if k != "eval_tokens"))
  return evals
