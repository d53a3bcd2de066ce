"""transformer_jax: pretraining Transformer language models with JAX, Flax, Optax and Orbax.

Importing the package installs its Ctrl-C handler first (`keep_ctrl_c`, before anything else
loads: this module imports only the standard library). SIGINT raises KeyboardInterrupt, as
Python's own handler does, except where that would lose it or break the program:

- Inside a garbage-collector callback (jax registers one, and collections are frequent while
  modules import), CPython prints the exception as "ignored" and the run goes on.
- Inside an import, it leaves a module half-initialized: numpy's and jaxlib's extensions turn it
  into an ImportError, and the interpreter can crash (exit 139) on its way out.

There the signal is sent again a moment later, until it lands outside both. A command that
re-executes itself (cli.reexec_with_tuned_malloc) keeps a signal so deferred, or one that comes
during the exec, pending for the new program (`execve`).
"""

import atexit
import gc
import os
import signal
import stat
import sys
import threading

__version__ = "0.1.0"

_BLOCKED = "TJAX_SIGINT_BLOCKED"  # set for a program started by execve with SIGINT held for it
_deferred = []  # signals delivered again later: not yet raised as KeyboardInterrupt


def interrupt(signum, frame):
  """SIGINT handler: raise KeyboardInterrupt, or deliver the signal again 10 ms later from inside
  a garbage-collector callback or an import (see the module doc)."""
  callbacks = {getattr(callback, "__code__", None) for callback in gc.callbacks}
  while frame is not None:
    code = frame.f_code
    if code in callbacks or code.co_filename.startswith("<frozen importlib"):
      _deferred.append(signum)
      threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
      return
    frame = frame.f_back
  _deferred.clear()
  raise KeyboardInterrupt


def keep_ctrl_c() -> None:
  """Installs `interrupt` for SIGINT if Python's default handler is there (the main thread of a
  process that no one else has set up)."""
  if (threading.current_thread() is threading.main_thread()
      and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
    signal.signal(signal.SIGINT, interrupt)
  if os.environ.pop(_BLOCKED, None):  # a Ctrl-C held over the exec arrives now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def execve(path: str, args: list, env: dict):
  """os.execve with SIGINT blocked across it and a deferred Ctrl-C pending: the new program,
  once it has imported the package, gets it (a timer would die with this program)."""
  signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
  if _deferred:  # (its timer may have fired, its handler not yet run: that one would be lost)
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # pending on this thread
  os.execve(path, args, {**env, _BLOCKED: "1"})


def stop_signals(*signals) -> tuple:
  """`signals` whose handlers a command may install: SIGHUP is left out where it is ignored
  (`nohup`, which asked for the run to outlive its terminal)."""
  ignored = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
  return tuple(s for s in signals if not (s == signal.SIGHUP and ignored))


_relayed = set()  # the descriptors whose output goes through a relay (_relay)


def hung_up() -> None:
  """For a SIGHUP handler (the terminal closed). Standard output and error that went to the
  terminal go to /dev/null from now on: writes to a hung-up terminal fail (EIO), so the next
  print would end the program, mid-save perhaps (a character device: a hung-up terminal no
  longer answers isatty). Ones that went to a pipe (`2>&1 | tee LOG`, whose reader the same
  hangup may end: EPIPE) go to a pipe of this process's own, whose thread copies them on and
  drops what the old pipe no longer takes. Files are left alone."""
  for fd in (1, 2):
    try:
      mode = os.fstat(fd).st_mode
    except OSError:  # (a closed descriptor)
      continue
    if stat.S_ISCHR(mode):
      null = os.open(os.devnull, os.O_WRONLY)
      os.dup2(null, fd)
      os.close(null)
    elif stat.S_ISFIFO(mode) and fd not in _relayed:
      _relayed.add(fd)
      _relay(fd)


def _relay(fd: int) -> None:
  old, (read, write) = os.dup(fd), os.pipe()
  os.dup2(write, fd)
  os.close(write)

  def copy():
    taken = True
    while data := os.read(read, 65536):
      while taken and data:
        try:
          data = data[os.write(old, data):]
        except OSError:  # (the reader is gone: drop the rest)
          taken = False
  thread = threading.Thread(target=copy, daemon=True)
  thread.start()
  atexit.register(_drain, fd, thread)


def _drain(fd: int, thread: threading.Thread) -> None:
  """At exit: the relay's last lines copied before the process ends."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  null = os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, fd)  # (closes the relay's last writer: its thread reads the end)
  os.close(null)
  thread.join(timeout=2)


keep_ctrl_c()
