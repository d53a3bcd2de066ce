"""Orbax checkpoints of {train state, data iterator state} under WORKDIR/checkpoints/STEP."""

import os
import shutil
import time

import grain
import orbax.checkpoint as ocp

from transformer_jax.config import ConfigError


def set_aside(workdir: str) -> str:
  """Moves WORKDIR/checkpoints to WORKDIR/checkpoints_previous-TIME (kept, never deleted)."""
  src = os.path.join(os.path.abspath(workdir), "checkpoints")
  dest = f"{src}_previous-{time.strftime('%Y%m%d-%H%M%S')}"
  shutil.move(src, dest)
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
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

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
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(**items))
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
    os.makedirs(self.unreadable_dir, exist_ok=True)
    dest = os.path.join(self.unreadable_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    shutil.move(os.path.join(self.directory, str(step)), dest)
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
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
