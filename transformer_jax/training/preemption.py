"""Preemption: SIGTERM / SIGINT / SIGHUP let the step in flight finish, then the loop saves and
returns."""

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils

import transformer_jax


class Preemption:
  """SIGTERM / SIGINT only set a flag: the loop finishes the step in flight, saves a checkpoint
  (waiting for any async save) and returns, so re-running the same command resumes. After that,
  only SIGINT aborts (Ctrl-C twice); a repeated SIGTERM is ignored: one preemption, one save.

  With several processes they must all stop after the same step: SIGTERM then goes to JAX's
  preemption notifier (jax.distributed installs it), which agrees on that step with the other
  processes (`reached`), and SIGINT is turned into a SIGTERM to this process.

  SIGINT is taken over only once the first step has returned (`started`): before, the state is
  the restored checkpoint or a fresh one, and a Ctrl-C while that step compiles (minutes for a
  large model) ends the run at once (`interrupted`, exit 130) rather than after the compile, a
  step and a save. A SIGTERM (a preemption) saves from the start all the same.

  SIGHUP (the terminal the run was started from closed, an ssh connection dropped) is a SIGTERM
  too, the run's output to that terminal going to /dev/null from then on: it used to end the
  run unsaved, like a kill -9. Under `nohup` (SIGHUP ignored) it is left ignored."""

  def __init__(self):
    self.signum, self._old = None, {}
    self.multi = jax.process_count() > 1
    self._take(transformer_jax.stop_signals(signal.SIGHUP) if self.multi else
               transformer_jax.stop_signals(signal.SIGTERM, signal.SIGHUP))

  def _take(self, signals):
    if threading.current_thread() is threading.main_thread():
      for sig in set(signals) - set(self._old):
        self._old[sig] = signal.signal(sig, self._handle)

  def started(self):
    """The first step returned: from now on a Ctrl-C, too, finishes the step in flight and
    saves."""
    self._take((signal.SIGINT,))

  def _handle(self, signum, frame):
    if signum == signal.SIGHUP:
      transformer_jax.hung_up()
    if self.signum is not None:
      # A second SIGINT is a user pressing Ctrl-C again: abort now. A second SIGTERM (or SIGHUP)
      # is the same preemption told twice (a job's every process signalled, and a parent, such
      # as `sweep run`, passing its own on): aborting would cut the checkpoint it asked for
      # short.
      if signum == signal.SIGINT:
        transformer_jax.interrupt(signum, frame)
      return
    if self.multi:
      self.signum = signal.SIGTERM
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self.signum = signum

  def reached(self, step: int) -> bool:
    """Whether to stop after `step` (the same step on every process)."""
    if self.multi:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM
        return True
      return False
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name

  def close(self):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
