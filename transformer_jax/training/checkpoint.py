"""Orbax checkpoints of {train state, data iterator state} under WORKDIR/checkpoints/STEP."""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import time
from typing import Any

import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from transformer_jax.config import ConfigError


class WriteError(RuntimeError):
  """The workdir could not be written (disk full, read-only, gone): one line, what to do."""


_WRITE_FAILURES = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                   "Permission denied", "Operation not permitted", "No such file or directory")


def write_failure(e: BaseException):
  """Why writing failed, if `e` (or its cause) is a file-system error: an OSError's message, or
  the errno text inside TensorStore's errors (which Orbax raises as ValueError)."""
  while e is not None:
    if isinstance(e, OSError):
      return e.strerror or str(e)
    for text in _WRITE_FAILURES:
      if text in str(e):
        return text
    e = e.__cause__ or e.__context__
  return None


class DataHandler(grain.checkpoint.CheckpointHandler):
  """The data position as one JSON file per logical data shard (`shard-K-of-S.json`), written by
  the first process that reads shard K. Any set of processes that reads all S shards restores
  it, whatever their number; a different S is refused. Checkpoints from before data shards
  (grain's `process_I-of-N.json`, one process per shard) still restore."""

  def save(self, directory, item=None, args=None):
    del item
    for k, state in args.states.items():
      (directory / f"shard-{k}-of-{args.num_shards}.json").write_text(json.dumps(state, indent=1))

  def restore(self, directory, item=None, args=None):
    del item
    it = args.item
    states = {}
    for k in it.shards:
      path = directory / f"shard-{k}-of-{it.num_shards}.json"
      if not path.exists():
        path = directory / f"process_{k}-of-{it.num_shards}.json"  # the pre-shard format
      if not path.exists():
        saved = sorted({m.group(1) for p in directory.iterdir()
                        if (m := re.fullmatch(r"(?:shard-\d+|process_\d+)-of-(\d+)\.json", p.name))})
        raise ConfigError(f"the checkpoint's data position was saved with data.shards="
                          f"{'/'.join(saved) or '?'}, this run uses {it.num_shards}: set "
                          f"--config.data.shards={saved[0] if saved else '...'} to resume exactly")
      states[str(k)] = json.loads(path.read_text())
    it.set_state(states)
    return it


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  states: dict[str, Any]  # shard -> grain state, only the shards this process writes
  num_shards: int


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any  # a pipeline.ShardedBatches; restored in place


def data_save_args(iterator, writes=None) -> DataSave:
  """The iterator's position now (taken before an async save returns), for the shards in
  `writes` (default: all of this process's shards)."""
  state = iterator.get_state()
  writes = iterator.shards if writes is None else writes
  return DataSave({str(k): state[str(k)] for k in writes}, iterator.num_shards)


def set_aside(workdir: str) -> str:
  """Moves WORKDIR/checkpoints to WORKDIR/checkpoints_previous-TIME (kept, never deleted)."""
  src = os.path.join(os.path.abspath(workdir), "checkpoints")
  dest = f"{src}_previous-{time.strftime('%Y%m%d-%H%M%S')}"
  if jax.process_index() == 0:
    shutil.move(src, dest)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("set aside checkpoints")
  return dest


class Checkpoints:
  """Async saves, keep-last-N plus a periodic keep, and restore of the latest step."""

  def __init__(self, workdir: str, ckpt_cfg, *, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt_cfg.keep,
        keep_period=ckpt_cfg.keep_period or None,
        enable_async_checkpointing=ckpt_cfg.async_save,
        create=not read_only,
        read_only=read_only,
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": DataHandler()})
    self._pending = None  # the step of the save in flight

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None, *, force: bool = False,
           data_writes=None) -> bool:
    """Saves (asynchronously if configured); `data_writes` are the data shards this process
    writes (default all it reads; processes that read the same shard must not both write)."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = data_save_args(data_iterator, data_writes)
    self.wait()  # an earlier async save's failure surfaces here, under its own step
    self._pending = step
    with self._writing():
      self._probe()
      return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def _probe(self):
    """Creates and removes a file in the checkpoints folder: a folder that cannot be written
    fails here, at once, with its cause, instead of in Orbax's background threads (which wait
    for each other for minutes, then report a timeout)."""
    path = os.path.join(self.directory, f".probe-{jax.process_index()}-{os.getpid()}")
    with open(path, "w"):
      pass
    os.remove(path)

  @contextlib.contextmanager
  def _writing(self):
    """An OSError while writing becomes a WriteError naming the step and the intact ones."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      reason = write_failure(e)
      if reason is None:
        raise
      self.manager.reload()
      # Finalized checkpoints only (a save that failed before its commit is not listed; one
      # whose data was committed before a later write failed is, and restores).
      good = self.all_steps()
      raise WriteError(
          f"saving checkpoint {self._pending} to {self.directory} failed: {reason}; "
          + (f"complete checkpoints on disk: {', '.join(map(str, good))} (an unfinished save is "
             f"never loaded). Free space or fix the workdir, then re-run the same command to "
             f"resume from step {good[-1]}" if good else "no complete checkpoint exists. Free "
             "space or fix the workdir, then re-run the same command")) from None

  def restore(self, abstract_state, data_iterator=None, step=None, report=print):
    """Restores `step` (default: the latest) onto the shardings in `abstract_state`; the
    iterator's position is restored in place. Returns (step, state), or (None, None) when there
    is no checkpoint. A checkpoint that cannot be read (truncated or missing file, missing item)
    is reported in one line, moved to WORKDIR/checkpoints_unreadable/ (never deleted, never
    loaded) and the next older one is tried."""
    steps = [s for s in self.all_steps() if step is None or s <= step]
    for s in reversed(steps):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = DataRestore(data_iterator)
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(**items))
      except ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        report(f"checkpoint {s} is unreadable ({type(e).__name__}: {reason}); moved it to "
               f"{self._set_aside(s)} and trying the previous one")
        continue
      return s, restored["state"]
    if steps:
      raise ConfigError(f"no readable checkpoint left in {self.directory} (the unreadable ones "
                        f"are in {self.unreadable_dir}); use a new --workdir to start over")
    return None, None

  @property
  def unreadable_dir(self):
    return os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable")

  def _set_aside(self, step):
    """Process 0 moves the checkpoint; every process waits for it, then rescans."""
    dest = os.path.join(self.unreadable_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(self.unreadable_dir, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self.manager.reload()
    return dest

  def restore_params(self, abstract_params, step=None):
    """Only the parameters (for sampling and evaluation); the optimizer state is not read."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None, None
    item = {"params": abstract_params}
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(self.directory, str(step), "state"),
        args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True))
    return step, restored["params"]

  def wait(self):
    with self._writing():
      self.manager.wait_until_finished()

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()
