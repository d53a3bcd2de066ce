"""Orbax checkpoints of {train state, data iterator state} under WORKDIR/checkpoints/STEP."""

import os

import grain
import orbax.checkpoint as ocp


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

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iterator=None, step=None):
    """Restores `step` (default latest) onto the shardings in `abstract_state`; the iterator's
    position is restored in place. Returns (step, state) or (None, None) with no checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None, None
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return step, restored["state"]

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
