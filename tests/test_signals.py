"""Signals and kills: SIGTERM and a closed terminal (SIGHUP) save and stop, Ctrl-C at awkward
moments (a garbage-collector callback, an import, a re-exec, a compile) is neither lost nor a
crash, and kill -9 at random moments resumes exactly."""

import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from transformer_jax.training import loop
from tests.conftest import REPO, TEST_XLA_FLAGS, tiny_overrides
from tests.test_faults import _config, _lines  # pylint: disable=protected-access

ONE = lambda: jax.devices()[:1]  # pylint: disable=unnecessary-lambda-assignment


RESUMED = {"train.log_every": 1, "model.num_layers": 1}


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
  """{step: loss} of an uninterrupted 40-step run logging every step, which the SIGTERM and
  kill -9 tests' resumed runs must reproduce (the kill -9 test's 20 steps decay over 40: the
  same schedule, so its losses are this run's first 20; checkpoint settings change no loss, so
  this run saves only at its end). One layer (RESUMED): each of those tests' launches compiles
  its steps in about half the time."""
  ref = str(tmp_path_factory.mktemp("uninterrupted"))
  loop.train(_config(tiny_data, **RESUMED, **{"train.steps": 40, "checkpoint.every_steps": 40}),
             ref, quiet=True, devices=ONE())
  return {r["step"]: r["loss"] for r in _lines(ref) if "loss" in r}


def _on_a_terminal(cmd, **kwargs):
  """Starts `cmd` in a new session whose controlling terminal is a new pseudo-terminal, its
  standard input, output and error; returns (process, the terminal's master side, a thread
  that reads what it writes there into a list until `closing` is set)."""
  master, follower = pty.openpty()
  # In the new session (start_new_session), a small program takes its standard input as the
  # controlling terminal and becomes `cmd` (a preexec_fn would run Python in a fork of this
  # multithreaded process), with SIGHUP's default action, as a terminal gives it (a suite run
  # under nohup ignores SIGHUP, and `cmd` would inherit that).
  take = ("import fcntl, os, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
          "signal.signal(signal.SIGHUP, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])")
  proc = subprocess.Popen([sys.executable, "-c", take, *cmd], stdin=follower, stdout=follower,
                          stderr=follower, start_new_session=True, **kwargs)
  os.close(follower)
  read, closing = [], threading.Event()

  def drain():  # (a full terminal buffer would block the run's prints)
    while not closing.is_set():
      if select.select([master], [], [], 0.05)[0]:
        try:
          read.append(os.read(master, 65536).decode(errors="replace"))
        except OSError:
          return
  reader = threading.Thread(target=drain, daemon=True)
  reader.start()
  return proc, master, read, (closing, reader)


def _checkpoints(workdir):
  return sorted(int(s) for s in os.listdir(f"{workdir}/checkpoints") if s.isdigit())


def _logged_steps(workdir):
  if not os.path.exists(f"{workdir}/metrics.jsonl"):
    return set()
  return {r["step"] for r in _lines(workdir) if "loss" in r}


def test_sigterm_saves_exits_and_resumes_with_identical_losses(tiny_data, tmp_path, uninterrupted,
                                                               capsys):
  """The terminal a run was started from closing (its SIGHUP) mid-run: a checkpoint and exit
  status 129 (it ended the run unsaved, and the save's own prints would fail on it: EIO). The
  re-run (output to a pipe) resumes from it; SIGTERM mid-run: a checkpoint and exit status 143.
  Re-running again (here, in this process) resumes from that one, and every logged loss equals
  an uninterrupted run's."""
  flags = [f"--config.{kv}" for kv in tiny_overrides(tiny_data, **RESUMED,
                                                     **{"train.steps": 40})]
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "transformer_jax.train", f"--config={REPO}/configs/gpt2.py:tiny",
         f"--workdir={workdir}"] + flags
  env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS, JAX_PLATFORMS="cpu")

  def wait_for(proc, steps):  # until training is under way: `steps` logged
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      if steps <= _logged_steps(workdir):
        return
      time.sleep(0.05)  # (one layer: 37 steps left are a few seconds)

  proc, master, read, (closing, reader) = _on_a_terminal(cmd, cwd=REPO, env=env)
  wait_for(proc, {1, 2, 3})
  closing.set()
  reader.join()
  os.close(master)  # the terminal hangs up: SIGHUP to its session's leader, the run
  proc.wait(timeout=120)
  assert proc.returncode == 129, "".join(read)[-2000:]
  assert "matmul params" in "".join(read)  # (it did write to the terminal before)
  hung_up = _checkpoints(workdir)[-1]
  assert 3 <= hung_up < 40
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  wait_for(proc, {hung_up + 1, hung_up + 2, hung_up + 3})
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 143, out[-2000:]
  assert f"resumed from {workdir}/checkpoints/{hung_up}" in out
  assert "SIGTERM received: stopped after step" in out
  stopped = _checkpoints(workdir)[-1]
  assert hung_up + 3 <= stopped < 40
  capsys.readouterr()
  loop.train(_config(tiny_data, **RESUMED, **{"train.steps": 40}), workdir, devices=ONE())
  assert f"resumed from {workdir}/checkpoints/{stopped}" in capsys.readouterr().out
  got = {r["step"]: r["loss"] for r in _lines(workdir) if "loss" in r}
  want = uninterrupted
  assert sorted(got) == sorted(want) == list(range(1, 41))
  for step, loss in want.items():
    assert got[step] == pytest.approx(loss, rel=1e-6, abs=0), step


_CTRL_C_IN_GC_CALLBACK = """
import gc, os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's foreground process
import transformer_jax
if sys.argv[1] == "default":
  signal.signal(signal.SIGINT, signal.default_int_handler)
fired = []
def callback(phase, info):  # like jax's: runs on every collection, often while modules import
  if not fired:
    fired.append(os.kill(os.getpid(), signal.SIGINT))
    sum(range(10))  # the handler runs here, inside the callback
gc.callbacks.append(callback)
try:
  gc.collect()
  time.sleep(1.5)
  print("lost")
except KeyboardInterrupt:
  print("interrupted")
"""


def test_ctrl_c_inside_a_gc_callback_is_not_lost():
  """A Ctrl-C that lands in a garbage-collector callback (jax registers one) is an "ignored"
  exception to CPython: seen as a run that went on after Ctrl-C in its first seconds. Importing
  the package installs a handler that delivers it again outside the collection."""
  def run(mode):
    return subprocess.run([sys.executable, "-c", _CTRL_C_IN_GC_CALLBACK, mode], cwd=REPO,
                          capture_output=True, text=True, timeout=60).stdout.strip()
  assert run("default") == "lost"  # Python's own handler: the fault
  assert run("ours") == "interrupted"


_CTRL_C_IN_AN_IMPORT = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal's foreground process
import transformer_jax
if sys.argv[1] == "default":
  signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, sys.argv[2])
try:
  import slow_module  # sends itself SIGINT halfway through its own code
  time.sleep(1.5)
  print("lost")
except KeyboardInterrupt:
  print("after the import" if "slow_module" in sys.modules else "inside the import")
"""


def test_ctrl_c_inside_an_import_is_delivered_after_it(tmp_path):
  """A KeyboardInterrupt raised inside an import leaves a module half-initialized: numpy's and
  jaxlib's extensions made it an ImportError traceback, or a crash (exit 139), in a command's
  first second. The package's handler delivers it once the import is done."""
  (tmp_path / "slow_module.py").write_text(
      "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nsum(range(10))\nDONE = 1\n")
  def run(mode):
    return subprocess.run([sys.executable, "-c", _CTRL_C_IN_AN_IMPORT, mode, str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60).stdout.strip()
  assert run("default") == "inside the import"  # Python's own handler: the fault
  assert run("ours") == "after the import"


_CTRL_C_OVER_AN_EXEC = """
import os, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import transformer_jax
if sys.argv[1] == "parent":  # a Ctrl-C deferred (transformer_jax.interrupt) when re-executing
  threading.Timer(30, print).start()  # another thread, as the deferring timers are
  transformer_jax._deferred.append(signal.SIGINT)
  transformer_jax.execve(sys.executable, [sys.executable, "-c", sys.argv[2], "child", ""],
                         os.environ)
try:
  time.sleep(1.5)
  print("lost")
except KeyboardInterrupt:
  print("interrupted")
"""


def test_a_deferred_ctrl_c_survives_the_re_exec():
  """cli.reexec_with_tuned_malloc re-executes a command, often while a Ctrl-C waits for an import
  to finish: it stays pending (blocked) on the exec-ing thread, and the new program gets it. Sent
  to the process, another thread took it and it died with the old program."""
  out = subprocess.run([sys.executable, "-c", _CTRL_C_OVER_AN_EXEC, "parent",
                        _CTRL_C_OVER_AN_EXEC], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert out.stdout.strip() == "interrupted", out.stderr[-2000:]


_CTRL_C_DURING_COMPILE = """
import os, signal, threading
signal.signal(signal.SIGINT, signal.default_int_handler)
from transformer_jax import cli
import jax, jax.numpy as jnp

def main(argv):
  def f(x):  # ~2 s of XLA compile on a 2-core CPU
    for i in range(400):
      x = jnp.sin(x @ x.T + i) if i % 2 else jnp.cumsum(x, axis=i % 2)
    return x
  lowered = jax.jit(f).lower(jnp.ones((64, 64)))
  timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
  timer.start()
  lowered.compile()
  timer.cancel()
  print("compiled")

cli.run(main)
"""


def test_ctrl_c_during_a_compile_exits_130_without_a_crash():
  """Ctrl-C while XLA compiles: `interrupted`, exit 130. Finalizing the interpreter under the
  still-running compile threads used to crash (exit 139, SIGSEGV in PjRtLoadedExecutable)."""
  proc = subprocess.run([sys.executable, "-c", _CTRL_C_DURING_COMPILE], cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=120)
  assert "compiled" not in proc.stdout  # the signal landed during the compile
  assert proc.returncode == 130, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == "interrupted"


def test_kill_9_at_random_moments_then_resume_gives_identical_losses(tiny_data, tmp_path,
                                                                    uninterrupted):
  """SIGKILL twice at seeded random moments of a run with async saves every 3 steps (so some
  kills land during a write); re-running (here, in this process) resumes from the last complete
  checkpoint and every step's final logged loss equals an uninterrupted run's."""
  extra = {**RESUMED, "train.steps": 20, "optimizer.decay_steps": 40,
           "checkpoint.every_steps": 3, "checkpoint.async_save": True}
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "transformer_jax.train", f"--config={REPO}/configs/gpt2.py:tiny",
         f"--workdir={workdir}"] + [f"--config.{kv}" for kv in tiny_overrides(tiny_data, **extra)]
  env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS, JAX_PLATFORMS="cpu")
  rng = np.random.default_rng(0)
  for _ in range(2):
    seen = len(_lines(workdir)) if os.path.exists(f"{workdir}/metrics.jsonl") else 0
    target = seen + int(rng.integers(2, 9))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(f"{workdir}/metrics.jsonl") and len(_lines(workdir)) >= target:
        break
      time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=60)
  assert loop.train(_config(tiny_data, **extra), workdir, quiet=True, devices=ONE())["step"] == 20
  got = {r["step"]: r["loss"] for r in _lines(workdir) if "loss" in r}  # last write wins
  want = {step: loss for step, loss in uninterrupted.items() if step <= 20}
  assert sorted(got) == sorted(want) == list(range(1, 21))
  for step, loss in want.items():
    assert got[step] == pytest.approx(loss, rel=1e-6, abs=0), step


_HUNG_UP_ON_A_PIPE = """
import sys, transformer_jax
transformer_jax.hung_up()  # its standard output: the test's pipe (as `2>&1 | tee LOG`)
print("before", flush=True)
sys.stdin.readline()  # the pipe's reader is gone now, as tee after the same hangup
for i in range(2000):
  print("x" * 100, flush=True)
"""


def test_after_a_hangup_a_pipe_whose_reader_went_too_takes_no_write_down():
  """`train ... 2>&1 | tee LOG` on a terminal that closes: tee ends on the same SIGHUP, and the
  run's next print raised BrokenPipeError (exit 1, before its save). After hung_up, output to a
  pipe goes through the process's own, which drops what the old one no longer takes; and what
  it still takes arrives ("before")."""
  proc = subprocess.Popen([sys.executable, "-c", _HUNG_UP_ON_A_PIPE], cwd=REPO,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  assert proc.stdout.readline() == "before\n"
  proc.stdout.close()
  _, err = proc.communicate("go\n", timeout=60)
  assert proc.returncode == 0, err[-2000:]


def test_under_nohup_a_hangup_stays_ignored():
  """nohup (SIGHUP ignored) asks a run to outlive its terminal: the preemption handler took
  SIGHUP over all the same, and a closed terminal stopped the run."""
  from transformer_jax.training.preemption import Preemption  # pylint: disable=g-import-not-at-top
  before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
  try:
    preemption = Preemption()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    handle = preemption._handle  # pylint: disable=protected-access
    assert signal.getsignal(signal.SIGTERM) == handle
    preemption.close()
  finally:
    signal.signal(signal.SIGHUP, before)
