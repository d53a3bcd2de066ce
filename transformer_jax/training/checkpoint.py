"""Orbax checkpoints of {train state, data iterator state} under WORKDIR/checkpoints/STEP.

The workdir may be a gs:// URL (config/paths.py): Orbax writes through TensorStore straight to the
bucket, and marks each finished step with a commit file instead of a rename (an unfinished step is
never listed, never loaded)."""

import contextlib
import itertools
import os
import sys
import time

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store

from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.training import integrity
from transformer_jax.training.data_position import DataHandler
from transformer_jax.training.data_position import DataRestore
from transformer_jax.training.data_position import data_save_args


# Orbax's replica-parallel saving (each replica of a replicated array writes 1/R of it) cuts the
# array on its devices with eager slices: one program per (shape, device), compiled at the first
# save, and R small writes per array at every save. Below 1 MiB per slice one replica writes the
# whole array (Orbax's own knob for this; its default splits every array). configs/gpt2.py:tiny
# with one layer on 4 CPU devices (data=4), sync saves: the first 0.99-1.03 -> 0.19-0.20 s, the
# next 0.26-0.33 -> 0.16-0.24 s; bench_cpu's async first save blocked 2.2-2.3 -> 0.6 s
# (benchmarks/RESULTS.md). It changes the chunking only: checkpoints read the same.
# (Otherwise the handler Orbax registers: with its per-process array metadata store.)
MIN_REPLICA_SLICE_BYTES = 1 << 20
ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
    array_metadata_store=array_metadata_store.Store(),
    min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)


class WriteError(RuntimeError):
  """The workdir could not be written (disk full, read-only, gone): one line, what to do."""


_WRITE_FAILURES = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                   "Permission denied", "Operation not permitted", "No such file or directory")
# What TensorStore and the Cloud Storage clients say when a bucket cannot be written or reached.
_REMOTE_FAILURES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "PERMISSION_DENIED", "UNAUTHENTICATED",
                    "Forbidden", "Cannot connect to host", "HttpError")


def write_failure(e: BaseException, directory: str | None = None):
  """Why writing failed, if `e` (or its cause) is a file-system error: an OSError's message, or
  the errno text inside TensorStore's errors (which Orbax raises as ValueError); for a gs://
  `directory` also a storage server's refusal or absence (one line)."""
  remote = directory is not None and paths.is_remote(directory)
  for e in _chain(e):
    if isinstance(e, OSError):
      return paths.why(e, directory)
    for text in _WRITE_FAILURES:
      if text in str(e):
        return text
    if remote and any(t in f"{type(e).__name__}: {e}" for t in _REMOTE_FAILURES):
      return paths.why(e, directory)
  return None


def _chain(e: BaseException | None):
  """`e` and the exceptions it was raised from or during, innermost last."""
  while e is not None:
    yield e
    e = e.__cause__ or e.__context__


def _connection_errors() -> tuple[type, ...]:
  """A dropped or timed-out connection: Python's, and aiohttp's (gcsfs reads with it: a server
  that disconnects, a reset, a payload cut short), once gcsfs's own retries are spent."""
  try:
    import aiohttp  # pylint: disable=g-import-not-at-top
    return ConnectionError, TimeoutError, aiohttp.ClientError
  except ImportError:
    return ConnectionError, TimeoutError


def _storage_failure(e: BaseException):
  """A gs:// server's or connection's failure in `e` or its causes (its first line), if any."""
  for e in _chain(e):
    text = f"{type(e).__name__}: {e}"
    if (isinstance(e, _connection_errors())
        or any(t in text for t in _REMOTE_FAILURES + ("RESOURCE_EXHAUSTED",))):
      return (text.strip().splitlines() or [""])[0][:200]
  return None


def out_of_memory(e: BaseException) -> bool:
  """Whether `e` or a cause is a device (or host) running out of memory: nothing wrong with the
  checkpoint or the storage."""
  return any(isinstance(c, MemoryError) or "out of memory" in str(c).lower() for c in _chain(e))


def require_step(workdir: str, steps: list, step, quantized: bool = False) -> None:
  """A one-line ConfigError unless `step` (None: the latest) is one of the saved `steps` (a
  quantized workdir's one step)."""
  if not steps:
    raise ConfigError(f"no checkpoint in {workdir}/checkpoints")
  if step is not None and step not in steps:
    raise ConfigError(f"{workdir} holds step {steps[0]} quantized, not step {step}" if quantized
                      else f"no checkpoint for step {step} in {workdir}/checkpoints (steps: "
                      f"{', '.join(map(str, steps))})")


def set_aside(workdir: str, describe=(), dest: str = "", every_process: bool = True) -> str:
  """Moves WORKDIR/checkpoints to `dest` (default: a new aside_path; kept, never deleted), with
  a copy of the workdir's files named in `describe` (config.json, ...: what the checkpoints need
  to be read, which the new run rewrites). Process 0 moves, all wait (unless `every_process`)."""
  dest = dest or aside_path(workdir)
  if jax.process_index() == 0:
    paths.move(paths.join(paths.abspath(workdir), "checkpoints"), dest)
    for name in describe:
      if paths.isfile(paths.join(workdir, name)):
        paths.write_text(paths.join(dest, name), paths.read_text(paths.join(workdir, name)))
  if every_process and jax.process_count() > 1:
    multihost_utils.sync_global_devices("set aside checkpoints")
  return dest


def aside_path(workdir: str) -> str:
  """A new WORKDIR/checkpoints_previous-TIME (-1, -2, ... within the same second)."""
  stamped = paths.join(paths.abspath(workdir),
                       f"checkpoints_previous-{time.strftime('%Y%m%d-%H%M%S')}")
  named = itertools.chain([stamped], (f"{stamped}-{k}" for k in itertools.count(1)))
  return next(d for d in named if not paths.exists(d))


def drop_closed_loop_reports():
  """Orbax's reads still in flight when a restore fails finish later on TensorStore's threads,
  each reporting `RuntimeError: Event loop is closed` through sys.unraisablehook: ~100
  tracebacks around the one line that says the checkpoint is unreadable; and its reads that
  were never awaited report their errors when collected. Those are dropped (for this process);
  any other report goes on to the hook that was there."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop", False):
    return
  def hook(report):
    closed = (isinstance(report.exc_value, RuntimeError)
              and str(report.exc_value) == "Event loop is closed")
    # (and a read Orbax left un-awaited when another failed: its error, collected with it)
    code = getattr(report.object, "cr_code", None)
    if not (closed or "orbax" in getattr(code, "co_filename", "")):
      previous(report)
  hook.drops_closed_loop = True
  sys.unraisablehook = hook


def first_line(e: BaseException) -> str:
  return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _top(name: str) -> str:
  return name[2:].partition("']")[0]  # (a keystr: ['top']['...'])


# The saved modules a model may leave unread when it has none of them: BERT's sentence head
# (models/encoder.py, model.sentence_head) and distillation's projection (training/distill.py).
HEADS = ("pooler", "pooler_bias", "sentence", "sentence_bias", "distill_projection")


def _droppable(name: str, our_tops: set) -> bool:
  """Whether saved parameter `name` is of a head the model has none of (HEADS), left unread: a
  sentence head turned off for on_mismatch=params, a distilled student's projection read by
  sample or a teacher. Anything else the model lacks (a layer, a final norm) is refused."""
  return _top(name) not in our_tops and _top(name) in HEADS


def _check_shapes(state_dir: str, abstract_params, what: str) -> None:
  """One line when a saved parameter's shape is not the model's (orbax's restore raised a
  ValueError, its background reads more), or the model lacks saved parameters other than
  whole heads (a partial restore dropped them: a smaller model took the first layers of a
  larger one's checkpoint): read from the checkpoint's metadata first."""
  meta = ocp.PyTreeCheckpointer().metadata(state_dir)
  tree = getattr(getattr(meta, "item_metadata", meta), "tree", None)
  if not isinstance(tree, dict) or "params" not in tree:
    return
  saved = {jax.tree_util.keystr(p): tuple(leaf.shape)
           for p, leaf in jax.tree_util.tree_leaves_with_path(tree["params"])
           if hasattr(leaf, "shape")}
  ours = set()
  for p, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
    name = jax.tree_util.keystr(p)
    ours.add(name)
    if name in saved and saved[name] != tuple(leaf.shape):
      raise ConfigError(f"{what} holds parameters of other shapes than this config's model "
                        f"({name}: {saved[name]}, the model's {tuple(leaf.shape)}): the config "
                        "does not describe the checkpoint")
  tops = {_top(n) for n in ours}
  if extra := sorted(n for n in set(saved) - ours if not _droppable(n, tops)):
    raise ConfigError(f"{what} holds parameters this config's model lacks ({extra[0]}; "
                      f"{len(extra)} in all): the config does not describe the checkpoint")


def _every_process(code: int) -> list[int]:
  """Every process's `code`, by process index (one collective when the job has several)."""
  if jax.process_count() == 1:
    return [code]
  return [int(c) for c in multihost_utils.process_allgather(np.int32(code))]


class _Stop(Exception):
  """A restore's error that is not the checkpoint's fault: raised, never set aside."""
  def __init__(self, error: BaseException):
    super().__init__(str(error))
    self.error = error


class Checkpoints:
  """Async saves, keep-last-N plus a periodic keep, and restore of the latest step."""

  def __init__(self, workdir: str, ckpt_cfg, *, read_only: bool = False,
               folder: str = "checkpoints"):
    if refusal := paths.orbax_refusal(workdir):  # (a teacher's, a workdir to evaluate, ...)
      raise ConfigError(f"workdir {refusal}")
    self.directory = paths.join(paths.abspath(workdir), folder)
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
    self._reader = ocp.CompositeCheckpointHandler(  # (restore: the manager's, less a barrier)
        state=ocp.StandardCheckpointHandler(), data=DataHandler())
    self._pending = None  # the step of the save in flight
    self._listed = []  # the complete steps, as last listed (named when the storage is gone)

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    self._listed = sorted(self.manager.all_steps())
    return self._listed

  def save(self, step: int, state, data_iterator=None, *, force: bool = False,
           data_writes=None) -> bool:
    """Saves (asynchronously if configured); `data_writes` are the data shards this process
    writes (default all it reads; processes that read the same shard must not both write)."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = data_save_args(data_iterator, data_writes)
    self.wait()  # an earlier async save's failure surfaces here, under its own step
    self._pending = step
    failure = self._probe()  # (its collective outside _writing: a lost peer is no storage's)
    with self._writing():
      if failure is not None:
        raise failure
      return self.manager.save(step, args=ocp.args.Composite(**items), force=force,
                               custom_metadata={integrity.KEY: integrity.fingerprint(state)})

  def _probe(self) -> BaseException | None:
    """Creates and removes a file in the checkpoints folder: a folder that cannot be written
    fails here (the error returned), at once, with its cause, instead of in Orbax's background
    threads (which wait for each other for minutes, then report a timeout). The processes share
    their verdicts (one collective): storage that this probe finds failing on one process alone
    (its host's disk full or read-only) stops every process with its one line (the others
    stopped in Orbax's barrier, with a traceback). A failure found before it on one process (the
    previous async save's, process 0's metrics) stops the others through their collective or
    the heartbeat."""
    probe = paths.path(paths.join(self.directory, f".probe-{jax.process_index()}-{os.getpid()}"))
    failure = None
    try:
      probe.write_text("")
      probe.unlink()
    except Exception as e:  # pylint: disable=broad-except
      failure = e
    codes = _every_process(int(failure is not None))
    if failure is None and max(codes):
      failure = OSError(f"process {codes.index(1)} could not write to it (its log says why)")
    return failure

  @contextlib.contextmanager
  def _writing(self):
    """An OSError while writing becomes a WriteError naming the step and the intact ones."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      reason = write_failure(e, self.directory)
      if reason is None:
        raise
      good, where = self._complete(), "on disk"
      fix = "Free space or fix the workdir"
      if paths.is_remote(self.directory):
        where, fix = "in the bucket", "Fix the bucket or the connection to it"
      failed, self._pending = self._pending, None  # (never listed as complete by a wait)
      raise WriteError(
          f"saving {'a checkpoint' if failed is None else f'checkpoint {failed}'} to "
          f"{self.directory} failed: {reason}; "
          + (f"complete checkpoints {where}: {', '.join(map(str, good))} (an unfinished save is "
             f"never loaded). {fix}, then re-run the same command to resume from step "
             f"{good[-1]}" if good else f"no complete checkpoint exists. {fix}, then re-run the "
             "same command")) from None

  def _complete(self):
    """Finalized checkpoints only (a save that failed before its commit is not listed; one whose
    data was committed before a later write failed is, and restores). When the storage cannot be
    listed (a bucket out of reach): the latest step known complete (listed, or saved since)."""
    try:
      self.manager.reload()
      return self.all_steps()
    except Exception:  # pylint: disable=broad-except
      return self._listed[-1:]

  def restore(self, abstract_state, data_iterator=None, step=None, report=print):
    """Restores `step` (default: the latest) onto the shardings in `abstract_state`; the
    iterator's position is restored in place. Returns (step, state), or (None, None) when there
    is no checkpoint. A checkpoint that cannot be read (truncated or missing file, missing item,
    arrays that are not those saved: their fingerprint, integrity.py) is reported in one line,
    moved to WORKDIR/checkpoints_unreadable/ (never deleted, never loaded) and the next older
    one is tried.

    Each process reads only its own shards, so a damaged file may fail one process's read
    alone: the processes agree on every verdict (`_verdicts`) before any acts on it. Orbax's
    CheckpointManager.restore ends in a barrier that a process whose read failed never
    reaches; the reads here go through the same handlers without it (and without its wait for
    a save in flight: `self.wait()` here, or a rollback read a checkpoint still being written)."""
    self.wait()
    steps = [s for s in self.all_steps() if step is None or s <= step]
    drop_closed_loop_reports()
    for s in reversed(steps):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = DataRestore(data_iterator)
      restored, failure = None, None
      try:
        restored = self._reader.restore(paths.path(paths.join(self.directory, str(s))),
                                        args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        failure = self._why_unreadable(s, e, abstract_state)
      if not (failure := self._verdicts(s, failure)):
        if not (failure := self._verdicts(s, self._damaged(s, restored["state"]))):
          return s, restored["state"]
      report(f"checkpoint {s} is unreadable ({first_line(failure)}); moved it to "
             f"{self._set_aside(s)} and trying the previous one")
    if steps:
      raise ConfigError(f"no readable checkpoint left in {self.directory} (the unreadable ones "
                        f"are in {self.unreadable_dir}); use a new --workdir to start over")
    return None, None

  def _why_unreadable(self, step, error, abstract_state) -> BaseException:
    """`error`, from reading checkpoint `step`, when the checkpoint itself is at fault; else the
    one-line error to stop with: a config's (a mismatched train state), memory, storage."""
    if isinstance(error, ConfigError):
      return _Stop(error)
    if cause := self._not_the_checkpoints(step, error):
      return _Stop(cause)
    if other := self._other_structure(step, abstract_state):  # (a sound checkpoint, other state)
      return _Stop(ConfigError(
          f"checkpoint {step} in {self.directory} holds a train state that this config's does "
          f"not match ({other}): a setting that shapes the optimizer state changed (e.g. "
          f"optimizer.grad_clip turned on or off); re-run with the saved config.json's, or "
          f"use a new --workdir"))
    return error

  def _verdicts(self, step, failure):
    """Every process's verdict on reading checkpoint `step` (one collective, on every path): None
    when all read it; the error to stop with when any must stop (its own, or one naming the process
    that stopped); else why it is unreadable (its own, or one naming a process that could not)."""
    codes = _every_process(0 if failure is None else 2 if isinstance(failure, _Stop) else 1)
    if max(codes) == 2 and not isinstance(failure, _Stop):
      failure = _Stop(ConfigError(
          f"process {codes.index(2)} stopped while restoring checkpoint {step} from "
          f"{self.directory}: its log says why"))
    elif max(codes) == 1 and failure is None:
      failure = OSError(f"process {codes.index(1)} could not read its part of it")
    if isinstance(failure, _Stop):  # (our one-line errors alone without their context)
      if isinstance(failure.error, (ConfigError, WriteError)):
        raise failure.error from None
      raise failure.error
    return failure

  def _other_structure(self, step, abstract_state) -> str:
    """How the saved train state's leaves (paths and shapes, from its metadata) differ from
    `abstract_state`'s, when it holds as many; "" when they do not, or when the metadata cannot
    be read or lacks leaves (then the checkpoint itself is what is wrong)."""
    try:
      saved = self.manager.item_metadata(step)["state"]
    except Exception:  # pylint: disable=broad-except
      return ""
    def leaves(tree):
      return {integrity.leaf_name(path): tuple(getattr(leaf, "shape", ()))
              for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    have, want = leaves(saved), leaves(abstract_state)
    if len(have) != len(want):
      return ""
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    shapes = sorted(k for k in set(have) & set(want) if have[k] != want[k])
    parts = ([f"not saved: {missing[0]}"] if missing else []) + (
        [f"saved, not wanted: {extra[0]}"] if extra else []) + (
        [f"{shapes[0]} saved as {have[shapes[0]]}, wanted {want[shapes[0]]}"] if shapes else [])
    return "; ".join(parts)

  def _not_the_checkpoints(self, step, error) -> BaseException | None:
    """The error to stop with when reading checkpoint `step` failed for no fault of its own:
    `error` itself when memory ran out (this mesh cannot hold it), a one-line WriteError when a
    gs:// read failed for the storage's sake (a server's or connection's failure, or the folder
    cannot be listed now). A checkpoint is set aside only for what is wrong with it, never for
    a passing outage. None otherwise."""
    if out_of_memory(error):
      return error
    if not paths.is_remote(self.directory):
      return None
    reason = _storage_failure(error)
    try:
      paths.listdir(self.directory)
    except Exception as e:  # pylint: disable=broad-except
      reason = paths.why(e, self.directory)
    if not reason:
      return None
    return WriteError(f"reading checkpoint {step} from {self.directory} failed: {reason}; fix "
                      "the bucket or the connection to it, then re-run the same command")

  @property
  def unreadable_dir(self):
    return paths.join(paths.dirname(self.directory), "checkpoints_unreadable")

  def _set_aside(self, step):
    """Process 0 moves the checkpoint; every process waits for it, then rescans."""
    dest = paths.join(self.unreadable_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      paths.move(paths.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self.manager.reload()
    return dest

  def restore_params(self, abstract_params, step=None, reads: int = 5):
    """Only the parameters (sampling, evaluation). A step deleted while it is read (a live run's
    checkpoint.keep) is no unreadable one: the newest is read instead, `reads` times at most."""
    self.wait()  # (a save in flight: see restore)
    for attempt in range(1, reads + 1):
      now = self.latest_step() if step is None else step
      if now is None:
        return None, None
      restored, failure = self._read_params(now, abstract_params)
      if not (failure := self._verdicts(now, failure)):  # (every process raises when any stops)
        if damaged := self._verdicts(now, self._damaged(now, restored)):
          raise self._params_failure(now, damaged)
        break
      if step is not None or attempt == reads:
        raise ConfigError(
            f"checkpoint {now} in {self.directory} was deleted while it was read, by the run "
            f"training this workdir (it keeps the newest checkpoint.keep); saved steps now: "
            f"{', '.join(map(str, self.all_steps())) or 'none'}"
            + ("" if step is not None else f" ({reads} deleted in a row: try again)"))
    missing = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(
        restored["params"]) if isinstance(leaf, jax.ShapeDtypeStruct)]
    if missing:  # (orbax leaves what the checkpoint lacks abstract)
      raise ConfigError(f"checkpoint {now} in {self.directory} has no parameter "
                        f"{missing[0]} of this config's model ({len(missing)} missing): the "
                        f"config does not describe the checkpoint")
    return now, restored["params"]

  def _read_params(self, step, abstract_params):
    """(restored, None), or (None, a _Stop to raise, or OSError: the step was deleted)."""
    item = {"params": abstract_params}
    drop_closed_loop_reports()
    try:  # (Orbax's handler: its Checkpointer ends in a barrier that a failed read never reaches)
      _check_shapes(paths.join(self.directory, str(step), "state"), abstract_params,
                    f"checkpoint {step} in {self.directory}")
      return ocp.PyTreeCheckpointHandler().restore(
          paths.path(paths.join(self.directory, str(step), "state")),
          args=ocp.args.PyTreeRestore(
              item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
              partial_restore=True)), None
    except ConfigError as e:  # (_check_shapes': the config does not describe the checkpoint)
      return None, _Stop(e)
    except Exception as e:  # pylint: disable=broad-except
      if self._deleted(step):
        return None, OSError(f"checkpoint {step} was deleted")
      return None, _Stop(self._params_failure(step, e))

  def _damaged(self, step, tree) -> BaseException | None:
    """Why the arrays read from checkpoint `step` into `tree` are not those saved (their
    fingerprint's, training/integrity.py), None when they are or it has none."""
    try:
      saved = (self.manager.metadata(step).custom_metadata or {}).get(integrity.KEY)
    except Exception:  # pylint: disable=broad-except  (no record to compare: nothing compared)
      saved = None
    if name := integrity.mismatch(saved, tree):
      return ValueError(f"its array {name} is not the one saved: its checksum differs")
    return None

  def _deleted(self, step) -> bool:
    """Whether `step` is no longer listed (listed again: a deletion may take a moment)."""
    for wait in (0.0, 0.5):
      time.sleep(wait)
      with contextlib.suppress(Exception):  # (a listing that fails says nothing)
        self.manager.reload()
        if step not in self.all_steps():
          return True
    return False

  def _params_failure(self, step, error) -> BaseException:
    """The one-line error for a failed read of checkpoint `step`'s parameters."""
    if cause := self._not_the_checkpoints(step, error):
      return cause
    if isinstance(error, ValueError) and "Requested shape" in str(error):
      return ConfigError(  # (a shape _check_shapes missed)
          f"checkpoint {step} in {self.directory} holds parameters of other shapes than this "
          f"config's model ({str(error).splitlines()[0][:160]}): the config does not describe the"
          " checkpoint")
    return ConfigError(
        f"checkpoint {step} in {self.directory} is unreadable ({first_line(error)}); saved "
        f"steps: {', '.join(map(str, self.all_steps()))} (a training run resumed in this "
        "workdir sets it aside and goes on from the one before)")

  def wait(self):
    with self._writing():
      self.manager.wait_until_finished()
    if self._pending is not None and self._pending not in self._listed:
      self._listed = sorted(self._listed + [self._pending])

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()
