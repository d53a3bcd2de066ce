"""The gs:// workdir lock (training/lock.py) when two runs reach for it at once, against the local
Cloud Storage emulator (tests/gcs_emulator.py): its writes are conditional on the lock object's
generation, so of two runs that take a free lock, or replace a dead run's, at the same moment one
is refused; and a heartbeat never writes over the run that took the lock over. The moment is made
exact: the second run acts while the first run's upload is on its way."""

import asyncio
import json
import socket
import time

import pytest

from transformer_jax.config import paths
from transformer_jax.training import lock
from tests.gcs_emulator import BUCKET


@pytest.fixture
def on_upload(monkeypatch):
  """on_upload(n, act): act() runs, in another thread, as the n-th upload (an object written)
  from now on is about to be sent; the upload waits for it and then goes as it would have."""
  import gcsfs  # pylint: disable=g-import-not-at-top
  request, seen, hooks = gcsfs.GCSFileSystem._request, [0], {}

  async def hooked(self, method, path, *args, **kwargs):
    if method == "POST" and "/upload/" in str(path):
      seen[0] += 1
      act = hooks.pop(seen[0], None)
      if act is not None:
        await asyncio.to_thread(act)
    return await request(self, method, path, *args, **kwargs)
  monkeypatch.setattr(gcsfs.GCSFileSystem, "_request", hooked)

  def arm(n, act):
    seen[0] = 0
    hooks[n] = act
  return arm


def _token(p):
  return json.loads(paths.read_text(p))["token"]


def _dead_runs_lock(p):
  paths.write_text(p, json.dumps({"host": "elsewhere", "pid": 1, "since": "then",
                                  "command": "train", "token": "dead",
                                  "heartbeat": time.time() - lock.STALE_S - 1}))


@pytest.mark.parametrize("left", ["nothing", "a dead run's lock"])
def test_of_two_runs_taking_the_lock_at_once_one_is_refused(gcs, on_upload, left):
  """B takes the lock between A's look (free, or a dead run's) and A's write: A's write is
  refused, not laid over B's (each run read its own token back and both trained)."""
  p = f"gs://{BUCKET}/race/{left.split()[0]}/lock"
  if left != "nothing":
    _dead_runs_lock(p)
  a, b, got = lock._ObjectLock(p), lock._ObjectLock(p), {}  # pylint: disable=protected-access
  on_upload(1, lambda: got.setdefault("b", b.take()))
  got["a"] = a.take()
  try:
    assert got == {"b": True, "a": False}
    assert _token(p) == b.token
    b.verify()
    assert not b.lost
  finally:
    a.release()
    b.release()
  assert not paths.exists(p)  # B's own, deleted as B ended


def test_a_heartbeat_does_not_write_over_the_run_that_took_the_lock_over(gcs, on_upload,
                                                                          monkeypatch):
  """Another run takes the lock over just as this run's heartbeat is being written (after the
  heartbeat's own look): the heartbeat is refused and this run knows it lost the lock; the
  other run's lock stays, and this run's end does not delete it."""
  monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
  p = f"gs://{BUCKET}/race/beat/lock"
  other = {"host": socket.gethostname(), "pid": 1, "since": "now", "command": "train",
           "token": "other"}
  a = lock._ObjectLock(p)  # pylint: disable=protected-access
  on_upload(2, lambda: paths.write_text(p, json.dumps(dict(other, heartbeat=time.time()))))
  assert a.take()
  deadline = time.time() + 10
  while not a.lost and time.time() < deadline:
    time.sleep(0.05)
  try:
    assert _token(p) == "other"
    assert a.lost.startswith("pid 1 on ")
  finally:
    a.release()
  assert _token(p) == "other"
  paths.remove(p)
