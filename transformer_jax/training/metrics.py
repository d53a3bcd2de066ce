"""The metric writers: metrics.jsonl + TensorBoard (FLOP counting and MFU: perf/counting.py).

A local workdir gets each metrics.jsonl line appended and flushed as it is logged. A gs:// workdir
(config/paths.py) cannot be appended to: an object is only ever written whole. There the lines
are buffered and metrics.jsonl is rewritten as one object once per window, never once per line:
when a checkpoint step is logged (so every line up to a saved step is in the bucket before that
checkpoint can be resumed from), at least every FLUSH_S seconds, at `flush()` and at `close()`.
TensorBoard's event file is written the same way (buffered, the object rewritten at each of
tensorboardX's flushes, every FLUSH_S seconds). A run killed between windows loses the lines since
the last one; the resumed run logs the steps after its checkpoint again."""

import importlib
import io
import json
import os
import sys
import time
import uuid
import weakref

import jax
import numpy as np

from transformer_jax.config import paths

FLUSH_S = 60.0  # on gs://: the longest a logged line waits in memory


def _import_tensorboardx():
  """Imports tensorboardX with torch and google-cloud-storage hidden. tensorboardX imports torch,
  where it is installed, only to accept torch tensors, which are never passed here; that import
  was 1.5 of the 7.5 s a warm two-step smoke run took (more with a CUDA build). It imports
  google.cloud.storage for its own gs:// event files, which _ObjectRecordWriter replaces here:
  0.2 s of every start. Both import as usual afterwards."""
  hidden = [name for name in ("torch", "google.cloud.storage") if name not in sys.modules]
  for name in hidden:
    sys.modules[name] = None  # `import` raises ImportError, which tensorboardX expects
  try:
    importlib.import_module("tensorboardX")
  finally:
    for name in hidden:
      del sys.modules[name]


# At import, before a run starts threads: while torch is hidden, another thread's `import torch`
# would fail.
_import_tensorboardx()


class Writer:
  """metrics.jsonl (one JSON object per line) + TensorBoard events; only process 0 writes.

  A run resumed from step `resume_step` first drops the lines (and TensorBoard events) of later
  steps, which an earlier run logged after its last checkpoint and this one replays: the file
  stays one clean history. A local metrics.jsonl deleted during the run is created again.
  `wandb_config` (the run's config) also says which steps are checkpoint steps. `still_ours`
  (lock.hold's check.mine) is asked before each gs:// rewrite of metrics.jsonl: once another run
  has taken the workdir over, this writer writes nothing more (the next checkpoint's lock check
  then stops the run)."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0,
               wandb_config=None, still_ours=None):
    self.enabled, self._still_ours = enabled, still_ours
    self._jsonl = self._tb = self._wandb = None
    self.path = paths.join(workdir, "metrics.jsonl")
    self.remote = paths.is_remote(workdir)
    self._text, self._flushed, self._dirty = "", time.monotonic(), False  # gs:// only
    ckpt = getattr(wandb_config, "checkpoint", None)
    self._every = ckpt.every_steps if ckpt is not None else 0
    self._last = wandb_config.train.steps if ckpt is not None else 0
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb_args = dict(logdir=paths.join(workdir, "tensorboard"),
                           **({"flush_secs": FLUSH_S} if self.remote else {}))
      try:  # (a full disk here: one line, as for any later write)
        kept = _drop_after(self.path, resume_step)
        if self.remote:
          _use_epath_for_tensorboard()
          self._text = kept
        else:
          self._jsonl = open(self.path, "a")
        self._tb, self._reopened = SummaryWriter(purge_step=resume_step + 1, **self._tb_args), 0
      except OSError as e:
        self._failed(e, getattr(e, "filename", None) or "")
      if wandb_config is not None and wandb_config.metrics.wandb:
        self._wandb = _wandb_run(workdir, wandb_config, resume_step)

  def write(self, step: int, values: dict):
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: (float(v) if isinstance(v, (int, float, np.number, jax.Array)) else v)
                for k, v in values.items()})
    if self.remote:
      self._text += json.dumps(row) + "\n"
      self._dirty = True
      at_checkpoint = self._every and (step % self._every == 0 or step == self._last)
      if at_checkpoint or time.monotonic() - self._flushed >= FLUSH_S:
        self._flush_lines()
        if not self.enabled:  # taken over: no events either (add_scalar would reopen a file)
          return
    else:
      self._append(json.dumps(row) + "\n")
    scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, float)}
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, int(step))
    if self._wandb is not None:
      self._wandb.log(scalars, step=int(step))

  def _append(self, line: str):
    try:
      if not os.path.exists(self.path):  # deleted under us: lines to the unlinked file are lost
        self._jsonl.close()
        self._jsonl = open(self.path, "a")
      self._jsonl.write(line)
      self._jsonl.flush()
    except OSError as e:
      self._failed(e)

  def _failed(self, e: BaseException, path: str = ""):
    from transformer_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
    fix = "fix the bucket or the connection to it" if self.remote else \
        "free space or fix the workdir"
    path = path or self.path
    raise checkpoint.WriteError(f"writing {path} failed: {paths.why(e, path)}; {fix}, "
                                "then re-run the same command to resume from its latest "
                                "checkpoint") from None

  def flush(self):
    """Before a checkpoint is saved: puts the lines logged so far in storage, and TensorBoard's
    events (into a new events file from here on). A resume never logs the steps up to its
    checkpoint again: events still buffered when the run died (tensorboardX writes every 120 s)
    were lost for good."""
    if self.enabled:  # tensorboardX's flush leaves its queue to a thread: close it, go on anew
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      try:
        self._tb.close()
        self._reopened += 1  # a new name: the closed file's (time and host) may be this second's
        self._tb = SummaryWriter(filename_suffix=f".{self._reopened}", **self._tb_args)
      except OSError as e:  # a full disk: one line, as for metrics.jsonl (a traceback, exit 1)
        self._failed(e, self._tb_args["logdir"])
    self._flush_lines()

  def _flush_lines(self):
    """On gs://: rewrites metrics.jsonl once with the lines logged so far."""
    if not (self.enabled and self.remote and self._dirty):
      return
    if self._still_ours is not None and not self._still_ours():
      print(f"warning: {self.path} is another run's now (the workdir was taken over): not "
            "written", file=sys.stderr, flush=True)
      self.stop_writing()
      return
    try:
      paths.write_text(self.path, self._text)
    except Exception as e:  # pylint: disable=broad-except
      self._failed(e)
    self._flushed, self._dirty = time.monotonic(), False

  def stop_writing(self):
    """Another run has taken the workdir over: nothing more goes into it. TensorBoard's buffered
    events are dropped, not flushed there when its writer is closed (or at exit)."""
    if self.enabled and self.remote:
      logdir = self._tb_args["logdir"] + "/"
      for record_writer in list(_OPEN):
        if record_writer.path.startswith(logdir) and not record_writer.closed:
          record_writer.dropped = True
      self._tb.close()
    self.enabled = False

  def close(self):
    try:
      if self.enabled:
        try:
          if self.remote:
            self._flush_lines()
          else:
            self._jsonl.close()
        except OSError as e:
          self._failed(e)
        finally:
          try:
            self._tb.close()
          except OSError as e:
            self._failed(e, self._tb_args["logdir"])
    finally:
      if self._wandb is not None:  # (its own service's files, not the workdir's)
        import wandb  # pylint: disable=g-import-not-at-top
        self._wandb.finish()
        wandb.teardown()  # waits for wandb's service to write everything out
        self._wandb = None


class _ObjectRecordWriter:
  """tensorboardX's file for a gs:// event file, through etils.epath: the records are buffered
  and the object rewritten whole at each flush (tensorboardX's own gs:// writer needs
  google-cloud-storage). A failed upload is said once on stderr and tried again at the next
  flush: TensorBoard's events never stop the training."""

  def __init__(self, path: str):
    self.path, self._buffer, self._said = path, io.BytesIO(), False
    self.dropped = self.closed = False  # dropped: Writer.stop_writing
    _OPEN.add(self)

  def write(self, data: bytes):
    self._buffer.write(data)

  def flush(self):
    if self.dropped:
      return
    try:
      paths.path(self.path).write_bytes(self._buffer.getvalue())
    except Exception as e:  # pylint: disable=broad-except
      if not self._said:
        print(f"warning: writing {self.path} failed: {paths.why(e, self.path)} (tried again at "
              "the next flush)", file=sys.stderr, flush=True)
        self._said = True

  def close(self):
    self.flush()
    self.closed = True


_OPEN = weakref.WeakSet()  # the _ObjectRecordWriters not yet collected


class _ObjectRecordWriterFactory:

  def open(self, path):
    return _ObjectRecordWriter(path)

  def directory_check(self, path):
    del path  # an object store has no folders to create


def _use_epath_for_tensorboard():
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  record_writer.register_writer_factory("gs", _ObjectRecordWriterFactory())


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
  id_file = paths.join(workdir, "wandb_id")
  if paths.isfile(id_file):
    run_id = paths.read_text(id_file).strip()
  else:
    run_id = uuid.uuid4().hex[:12]
    paths.write_text(id_file, run_id)
  m = config.metrics
  try:
    return wandb.init(project=m.wandb_project, entity=m.wandb_entity or None, id=run_id,
                      resume="allow" if resume_step else None,
                      dir=None if paths.is_remote(workdir) else workdir,  # wandb writes locally
                      name=paths.abspath(workdir).rstrip("/").rsplit("/", 1)[-1],
                      config=config.to_dict())
  except wandb.errors.Error as e:  # no API key, a malformed one, a bad entity: before compiling
    from transformer_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f"metrics.wandb=true: {e} (WANDB_MODE=offline logs without a login)") \
        from None


def last_logged(workdir: str) -> dict:
  """Each metric's last logged value in WORKDIR/metrics.jsonl (events left out)."""
  out = {}
  try:
    text = paths.read_text(paths.join(workdir, "metrics.jsonl"))
  except (OSError, ValueError):
    text = ""
  for line in text.splitlines():
    try:
      row = json.loads(line)
    except ValueError:  # a torn last line
      continue
    if "event" not in row:
      out.update(row)
  out.pop("step", None)
  return out


def _drop_after(path: str, step: int) -> str:
  """Rewrites metrics.jsonl (atomically) without its lines of steps after `step`; returns the
  lines kept. A run that starts at step 0 (a new run in a workdir whose checkpoints were set aside
  or lost) keeps the old lines in metrics-<time>.jsonl instead."""
  if not paths.isfile(path):
    return ""
  if step == 0:
    paths.move(path, path[:-len(".jsonl")] + time.strftime("-%Y%m%d-%H%M%S.jsonl"))
    return ""
  lines = paths.read_text(path).splitlines(keepends=True)
  keep = [line for line in lines if _step(line) <= step]
  if len(keep) != len(lines):
    paths.write_text(path, "".join(keep))
  return "".join(keep)


def _step(line: str) -> float:
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return float("inf")  # a torn last line of a killed run: dropped
