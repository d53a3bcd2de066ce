"""The metric writers: metrics.jsonl + TensorBoard (FLOP counting and MFU: perf/counting.py)."""

import json
import os
import time
import uuid

import jax
import numpy as np


class Writer:
  """metrics.jsonl (one JSON object per line) + TensorBoard events; only process 0 writes.

  A run resumed from step `resume_step` first drops the lines (and TensorBoard events) of later
  steps, which an earlier run logged after its last checkpoint and this one replays: the file
  stays one clean history. A metrics.jsonl deleted during the run is created again."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0,
               wandb_config=None):
    self.enabled = enabled
    self._jsonl = self._tb = self._wandb = None
    self.path = os.path.join(workdir, "metrics.jsonl")
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      _drop_after(self.path, resume_step)
      self._jsonl = open(self.path, "a")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)
      if wandb_config is not None and wandb_config.metrics.wandb:
        self._wandb = _wandb_run(workdir, wandb_config, resume_step)

  def write(self, step: int, values: dict):
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: (float(v) if isinstance(v, (int, float, np.number, jax.Array)) else v)
                for k, v in values.items()})
    try:
      if not os.path.exists(self.path):  # deleted under us: lines to the unlinked file are lost
        self._jsonl.close()
        self._jsonl = open(self.path, "a")
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    except OSError as e:
      from transformer_jax.training.checkpoint import WriteError  # pylint: disable=g-import-not-at-top
      raise WriteError(f"writing {self.path} failed: {e.strerror or e}; free space or fix "
                       "the workdir, then re-run the same command to resume from its latest "
                       "checkpoint") from None
    scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, float)}
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, int(step))
    if self._wandb is not None:
      self._wandb.log(scalars, step=int(step))

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
      if self._wandb is not None:
        import wandb  # pylint: disable=g-import-not-at-top
        self._wandb.finish()
        wandb.teardown()  # waits for wandb's service to write everything out


def _wandb_run(workdir: str, config, resume_step: int):
  """A Weights & Biases run for metrics.wandb (the wandb extra): one run per workdir, resumed
  with it (its id is kept in WORKDIR/wandb_id), the resolved config attached. WANDB_MODE=offline
  keeps it on disk (WORKDIR/wandb/) for `wandb sync`."""
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError:
    from transformer_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError("metrics.wandb=true needs the wandb package: pip install -e '.[wandb]'") \
        from None
  id_file = os.path.join(workdir, "wandb_id")
  if os.path.isfile(id_file):
    with open(id_file) as f:
      run_id = f.read().strip()
  else:
    run_id = uuid.uuid4().hex[:12]
    with open(id_file, "w") as f:
      f.write(run_id)
  m = config.metrics
  return wandb.init(project=m.wandb_project, entity=m.wandb_entity or None, id=run_id,
                    resume="allow" if resume_step else None, dir=workdir,
                    name=os.path.basename(os.path.abspath(workdir)), config=config.to_dict())


def last_logged(workdir: str) -> dict:
  """Each metric's last logged value in WORKDIR/metrics.jsonl (events left out)."""
  out = {}
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:  # a torn last line
          continue
        if "event" not in row:
          out.update(row)
  except OSError:
    pass
  out.pop("step", None)
  return out


def _drop_after(path: str, step: int):
  """Rewrites metrics.jsonl (atomically) without its lines of steps after `step`. A run that
  starts at step 0 (a new run in a workdir whose checkpoints were set aside or lost) keeps the
  old lines in metrics-<time>.jsonl instead."""
  if not os.path.isfile(path):
    return
  if step == 0:
    os.replace(path, path[:-len(".jsonl")] + time.strftime("-%Y%m%d-%H%M%S.jsonl"))
    return
  with open(path) as f:
    lines = f.readlines()
  keep = [line for line in lines if _step(line) <= step]
  if len(keep) == len(lines):
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def _step(line: str) -> float:
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return float("inf")  # a torn last line of a killed run: dropped
