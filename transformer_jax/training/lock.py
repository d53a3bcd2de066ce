"""A live run owns its workdir: two runs writing one workdir would interleave their checkpoints,
metrics and config.json.

The lock is an exclusive `flock` on WORKDIR/lock, taken by process 0 for the whole job and held
for the run's life. The kernel drops it when the process dies however it dies (SIGKILL, OOM, a
lost host), so a dead run's leftover file never holds the workdir; the file only names the owner
for the refusal's message. Every process of a job learns whether process 0 got it."""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

from transformer_jax.config import ConfigError


def _owner() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}


def _describe(path: str) -> str:
  try:
    with open(path) as f:
      o = json.load(f)
    return f"pid {o['pid']} on {o['host']} since {o['since']} ({o['command']})"
  except (OSError, ValueError, KeyError):
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


@contextlib.contextmanager
def hold(workdir: str):
  """Owns `workdir` for the block; raises a one-line ConfigError naming the owner when a live
  run holds it."""
  path = os.path.join(workdir, "lock")
  f = _take(path) if jax.process_index() == 0 else None
  held = f is not None
  if jax.process_count() > 1:
    held = bool(multihost_utils.broadcast_one_to_all(np.int32(held)))
  if not held:
    raise ConfigError(f"{workdir} is in use by {_describe(path)}: wait for that run or stop it, "
                      f"or use another --workdir")
  try:
    yield
  finally:
    if f is not None:
      f.close()  # the flock goes with the descriptor; the file stays, naming the last owner
