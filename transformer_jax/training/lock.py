"""A live run owns its workdir: two runs writing one workdir would interleave their checkpoints,
metrics and config.json.

Process 0 takes the lock for the whole job and holds it for the run's life; every process of a
job learns whether it got it.

A local workdir: an exclusive `flock` on WORKDIR/lock. The kernel drops it when the process dies
however it dies (SIGKILL, OOM, a lost host), so a dead run's leftover file never holds the workdir;
the file only names the owner for the refusal's message.

A gs:// workdir (no flock on an object store): the object WORKDIR/lock names its owner (host, pid,
command, a random token) and a heartbeat time that a thread of the live run rewrites every
HEARTBEAT_S seconds. A run that ends deletes its own. A killed run's leftover holds nothing once
its heartbeat is STALE_S old, or at once on the host that ran it when its pid is gone (re-running
a killed command there is not refused). Every write is conditional on the object's generation,
which the store checks (ifGenerationMatch): a free lock is created only where there is none, a dead
run's is replaced, and a heartbeat rewritten, only while it is the one read. Of two runs that take
the lock at once, one write fails (FileExistsError): that run is refused; a heartbeat that fails
so has lost the lock and never overwrites the new owner's."""

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid

import jax
from jax.experimental import multihost_utils
import numpy as np

from transformer_jax.config import ConfigError
from transformer_jax.config import paths

HEARTBEAT_S = 30.0  # how often a live run on gs:// rewrites its lock's heartbeat
STALE_S = 120.0  # a gs:// lock not refreshed for this long belongs to a dead run
_ENDED = set()  # tokens of this process's gs:// locks whose runs ended (a delete may have failed)


def _owner() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}


def _describe(path: str) -> str:
  try:
    o = json.loads(paths.read_text(path))
    beat = (f", heartbeat {time.time() - float(o['heartbeat']):.0f} s ago (a lock without one "
            f"for {STALE_S:.0f} s is free)" if "heartbeat" in o else "")
    return f"pid {o['pid']} on {o['host']} since {o['since']} ({o['command']}){beat}"
  except Exception:  # pylint: disable=broad-except  # gone, torn, or out of reach
    return "another run"


def _take(path: str):
  """The open lock file (held), or None when another live process holds it."""
  f = open(path, "a+")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.close()
    return None
  f.seek(0)
  f.truncate()
  f.write(json.dumps(_owner()))
  f.flush()
  return f


class _ObjectLock:
  """The gs:// lock: an owner object with a heartbeat (see the module's docstring)."""

  def __init__(self, path: str):
    self.path, self.token = path, uuid.uuid4().hex
    self.since = time.strftime("%Y-%m-%d %H:%M:%S")
    self._stop = threading.Event()
    self._thread = None
    self.generation = 0  # of the lock object this run last wrote
    self.lost = ""  # who holds the lock now, once another run has taken it over

  def _read(self):
    """(owner or None, generation or 0) of the lock object: a torn or foreign object is
    nobody's, its generation the one to replace."""
    got = paths.read_generation(self.path)
    if got is None:
      return None, 0
    try:
      held = json.loads(got[0])
    except ValueError:
      held = None
    return (held if isinstance(held, dict) else None), got[1]

  def _put(self, generation: int) -> bool:
    """Writes this run's owner object while the lock's generation is `generation` (0: while
    there is none); False when another writer came first."""
    text = json.dumps(dict(_owner(), since=self.since, token=self.token, heartbeat=time.time()))
    try:
      self.generation = paths.write_if_generation(self.path, text, generation)
      return True
    except FileExistsError:  # or our own write, retried after its answer was lost
      held, now = self._read()
      if held and held.get("token") == self.token:
        self.generation = now
        return True
      return False

  def take(self) -> bool:
    """True when this run now holds the lock; False when a live run does (or took it first)."""
    for _ in range(3):  # a dead run's lock that another run replaced first: read again
      held, generation = self._read()
      if held and _alive(held):
        return False
      if self._put(generation):
        self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
        self._thread.start()
        return True
    return False

  def verify(self):
    """Sets `lost` when the lock object is no longer this run's: another run's token (it took
    the workdir while this run was out of reach past STALE_S), or no lock at all (that run
    also ended, or someone deleted it). A read that fails says nothing: tried again later."""
    if self.lost:
      return
    try:
      held, _ = self._read()
    except Exception:  # pylint: disable=broad-except  # out of reach now
      return
    if not held or held.get("token") != self.token:
      self.lost = _describe(self.path)

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_S):
      self.verify()
      if self.lost:
        return
      try:
        if not self._put(self.generation):  # replaced since the look above
          self.lost = _describe(self.path)
          return
      except Exception:  # pylint: disable=broad-except  # out of reach now: try again later
        pass

  def release(self):
    _ENDED.add(self.token)
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=30)
    try:
      held, generation = self._read()
      if held and held.get("token") == self.token:
        paths.remove_if_generation(self.path, generation)
    except Exception:  # pylint: disable=broad-except  # left behind: it goes stale by itself
      pass


def _alive(owner: dict) -> bool:
  """Whether the run that wrote a gs:// lock may still be running."""
  if owner.get("token") in _ENDED:
    return False
  pid = owner.get("pid")
  if owner.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    except OSError:  # another user's process: alive
      pass
  try:
    return time.time() - float(owner.get("heartbeat", 0)) < STALE_S
  except (TypeError, ValueError):
    return False


def _acquire(workdir: str, path: str):
  """(held, release, why not) for process 0: the lock taken, or who or what prevents it."""
  try:
    if paths.is_remote(workdir):
      obj = _ObjectLock(path)
      if obj.take():
        return True, obj.release, None
    else:
      f = _take(path)
      if f is not None:
        return True, f.close, None
  except Exception as e:  # pylint: disable=broad-except
    if not (isinstance(e, OSError) or paths.is_remote(workdir)):
      raise
    return False, None, f"cannot take the lock {path}: {paths.why(e, path)}"
  return False, None, None


def held_by(workdir: str) -> str:
  """Who holds `workdir`'s lock, or "" when no live run does, without taking it (`sweep run`:
  a run that another driver, or one killed with -9 whose trains live on, is training). A local
  lock is probed with a shared flock, released at once (a train's exclusive one excludes it)."""
  path = paths.join(workdir, "lock")
  if paths.is_remote(workdir):
    try:
      owner = json.loads(paths.read_text(path))
    except Exception:  # pylint: disable=broad-except  # none, torn or out of reach: not held
      return ""
    alive = isinstance(owner, dict) and _alive(owner)
    return _describe(path) if alive else ""
  try:
    with open(path, encoding="utf-8") as f:
      try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
      except BlockingIOError:
        return _describe(path)
      fcntl.flock(f, fcntl.LOCK_UN)
  except OSError:  # no lock file: never started
    return ""
  return ""


class LockLost(ConfigError):
  """Another run took over this run's gs:// lock (its heartbeat was out of reach too long)."""


@contextlib.contextmanager
def hold(workdir: str):
  """Owns `workdir` for the block; raises a one-line ConfigError naming the owner when a live
  run holds it. Yields `check()`, which every process calls before it writes a checkpoint: it
  raises LockLost on all of them once another run has taken over a gs:// lock; `check.mine()`
  is process 0's look alone."""
  path = paths.join(workdir, "lock")
  held, release, error = _acquire(workdir, path) if jax.process_index() == 0 else (
      False, None, None)
  owner = getattr(release, "__self__", None)
  owner = owner if isinstance(owner, _ObjectLock) else None  # a gs:// workdir's, on process 0
  if jax.process_count() > 1:
    held = bool(multihost_utils.broadcast_one_to_all(np.int32(held)))
  if error:
    raise ConfigError(error)
  if not held:
    raise ConfigError(f"{workdir} is in use by {_describe(path)}: wait for that run or stop it, "
                      f"or use another --workdir")

  def check():
    lost = ""
    if owner is not None:  # read now: the heartbeat's last look may be 30 s old
      owner.verify()
      lost = owner.lost
    if jax.process_count() > 1:
      lost = "another run" if multihost_utils.broadcast_one_to_all(np.int32(bool(lost))) else ""
    if lost:
      raise LockLost(f"{workdir} was taken over by {lost} while this run could not reach it; "
                     f"stopped without writing to it")

  def mine() -> bool:
    """Process 0's own look at a gs:// lock, with no collective: whether it is still this
    run's (the metrics writer's, before it rewrites metrics.jsonl)."""
    if owner is not None:
      owner.verify()
      return not owner.lost
    return True

  check.mine = mine
  try:
    yield check
  finally:
    if release is not None:  # a local flock goes with the descriptor; the file stays
      release()
