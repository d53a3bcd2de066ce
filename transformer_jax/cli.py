"""Shared command-line plumbing: `--config=FILE.py[:ARG]`, `--config.KEY=VALUE`, `--name=value`
flags, and one-line errors (exit code 2, no traceback) for user mistakes."""

import glob
import importlib.util
import os
import platform
import sys
import traceback

from transformer_jax import config as config_lib
import transformer_jax
from transformer_jax.config import ConfigError


def parse(argv, flags: dict):
  """Returns (config spec or None, config overrides, flag values). `flags` maps names to
  defaults; a flag's type is its default's (a bool flag may be given bare: `--data-only`).
  A value follows its flag after `=` or as the next argument (`--workdir runs/x`)."""
  if any(arg in ("--help", "-h") for arg in argv):
    print(usage(flags))
    sys.exit(0)
  spec, overrides, values, given = None, [], dict(flags), set()
  for arg in _joined(argv, flags):
    if not arg.startswith("--"):
      raise ConfigError(f"unexpected argument {arg!r}; flags look like --name=value")
    name, sep, value = arg[2:].partition("=")
    if (name == "config" or name.startswith("config.")) and not sep:  # (set to '' silently)
      what = "FILE.py[:ARG]" if name == "config" else "VALUE"
      raise ConfigError(f"--{name} needs a value: --{name}={what} or --{name} {what}")
    if name == "config":
      value = _home(value)
      if spec is not None and spec != value:  # the last one silently won
        raise ConfigError(f"--config given twice ({spec!r}, {value!r}); give one")
      spec = value
    elif name.startswith("config."):
      _override(overrides, name[len("config."):], value)
    elif name.replace("-", "_") in flags:
      key = name.replace("-", "_")
      value = _flag_value(name, flags[key], sep, _home(value) if key in PATH_FLAGS else value)
      if key in given and values[key] != value:  # the last one silently won
        raise ConfigError(f"--{name} given twice ({values[key]!r}, {value!r}); give one")
      values[key] = value
      given.add(key)
    else:
      known = ", ".join(["--config", "--config.KEY"] + [f"--{k}" for k in flags])
      raise ConfigError(f"unknown flag --{name} (known: {known})")
  return spec, overrides, values


def _override(overrides: list, key: str, value: str) -> None:
  """Appends KEY=VALUE; the same key again with another value is refused (the last one
  silently won, as a flag given twice is refused), with the same value it is one override."""
  for item in overrides:
    if item.partition("=")[0] == key:
      if item != f"{key}={value}":
        raise ConfigError(f"--config.{key} given twice ({item.partition('=')[2]!r}, {value!r}); "
                          "give one")
      return
  overrides.append(f"{key}={value}")


# Flags that name a file or folder: a leading ~/ is the home folder's, as the shell would make
# it (it does not after `--flag=`, and ./~/... would be a new folder).
PATH_FLAGS = ("workdir", "out", "hf_dir", "dir", "data_dir", "file", "fewshot_file", "data",
              "corpus", "profile_dir")


def check_flags(flags: dict, checks) -> None:
  """Each (name, whether it holds, what it must be) of `checks`: the first that fails is one
  line naming that flag and its value (a NaN fails every comparison)."""
  for name, holds, want in checks:
    if not holds:
      raise ConfigError(f"--{name}={flags[name]} must be {want}")


def not_a_workdir(flag: str, path: str) -> None:
  """An output folder that is a training workdir's own (config.json, checkpoints) is refused."""
  from transformer_jax.config import paths  # pylint: disable=g-import-not-at-top
  held = [n for n in ("config.json", "checkpoints") if paths.exists(paths.join(path, n))]
  if held:
    raise ConfigError(f"--{flag}={path} is a training workdir (it holds {held[0]}); give a "
                      f"folder of its own")


def output_folder(flag: str, path: str) -> str:
  """Checks, before any work, that the local folder a command writes to (--out, --hf_dir) can be
  made: a file where it or a folder above it should be is one line (NotADirectoryError or
  FileExistsError tracebacks at the end). A gs:// one is written to and read back (a missing
  bucket was a traceback naming the storage server's upload URL, after the work)."""
  if not path:
    raise ConfigError(f"--{flag} is empty: give a folder to write to")
  if "://" in path:
    from transformer_jax.config import paths  # pylint: disable=g-import-not-at-top
    try:
      paths.check_writable(path)
    except Exception as e:  # pylint: disable=broad-except  # (the storage client's own errors)
      raise ConfigError(f"--{flag}={path} is not writable: {paths.why(e, path)}") from None
    return path
  at = os.path.abspath(path)
  while not os.path.exists(at) and os.path.dirname(at) != at:
    at = os.path.dirname(at)
  if not os.path.isdir(at):
    raise ConfigError(f"--{flag}={path} cannot be made a folder: {at} is a file")
  return path


def _home(value: str) -> str:
  return os.path.expanduser(value) if value == "~" or value.startswith("~/") else value


def usage(flags: dict) -> str:
  """--help: the running command's docstring, then its flags with their defaults."""
  doc = (sys.modules["__main__"].__doc__ or "").strip()
  lines = [doc, "", "flags (--name=value or --name value; defaults shown):",
           "  --config=FILE.py[:ARG]     a config recipe (configs/*.py)",
           "  --config.KEY=VALUE         override one config value, e.g. --config.train.steps=100"]
  lines += [f"  --{name}={default!r}" if isinstance(default, str) else f"  --{name}={default}"
            for name, default in flags.items()]
  return "\n".join(lines)


def _joined(argv, flags: dict) -> list:
  """`--name value` -> `--name=value` for every flag that takes a value (not a bare bool)."""
  out = []
  for arg in argv:
    prev = out[-1][2:] if out and out[-1].startswith("--") and "=" not in out[-1] else None
    takes_value = prev is not None and (prev == "config" or prev.startswith("config.") or not
                                        isinstance(flags.get(prev.replace("-", "_"), True), bool))
    if takes_value and not arg.startswith("--"):
      out[-1] += "=" + arg
    else:
      out.append(arg)
  return out


def _flag_value(name: str, default, sep: str, value: str):
  if isinstance(default, bool):
    if not sep:
      return True
    if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
      raise ConfigError(f"flag --{name} expects a bool (true/false), got {value!r}")
    return value.lower() in ("1", "true", "yes")
  if not sep:
    raise ConfigError(f"flag --{name} needs a value: --{name}=VALUE or --{name} VALUE")
  try:
    return type(default)(value) if default is not None else value
  except ValueError:
    raise ConfigError(f"flag --{name} expects {type(default).__name__}, got {value!r}") from None


def load_config(spec, overrides, workdir=None):
  """From --config, or else the workdir's saved config.json (so re-running resumes)."""
  if spec:
    return config_lib.load(spec, overrides)
  if workdir:
    from transformer_jax.config import paths  # pylint: disable=g-import-not-at-top
    saved = paths.join(workdir, "config.json")  # a gs:// workdir's too
    with paths.storage_errors(workdir, f"--workdir={workdir} cannot be read", ConfigError):
      config = config_lib.from_json_file(saved) if paths.isfile(saved) else None
      missing = "" if config is not None else paths.missing_bucket(workdir)
    if config is not None:
      for item in overrides:
        key, _, value = item.partition("=")
        config_lib.set_value(config, key, value)
      return config
    if missing:  # (not the --config flag's fault)
      raise ConfigError(f"--workdir={workdir}: {missing}")
  raise ConfigError("--config=FILE.py[:ARG] is required (or a --workdir with a saved config.json)")


# One arena, no mmap for large blocks, no trimming: freed blocks are kept and reused.
MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=68719476736")


def reexec_with_tuned_malloc():
  """XLA:CPU allocates each step's temporaries as one block (725 MB for gpt2.py:bench_cpu) and
  glibc serves blocks above 32 MB with fresh mmap pages, so every step page-faults and zeroes
  them again: ~0.4 s of kernel time per bench_cpu step. Re-executes this same command once with
  MALLOC_TUNABLES in GLIBC_TUNABLES, which makes glibc keep and reuse those blocks. Skipped when
  GLIBC_TUNABLES is already set (yours win), off glibc, or with TJAX_SYSTEM_MALLOC=1."""
  if ("GLIBC_TUNABLES" in os.environ or os.environ.get("TJAX_SYSTEM_MALLOC")
      or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc"):
    return
  env = dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES)
  transformer_jax.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


def skip_absent_tpu():
  """With libtpu installed (the tpu or test extra) but no TPU here, JAX would probe for one and
  print libtpu's warnings on every start: use the CPU (or CUDA, when its plugin is installed)
  instead. A TPU VM (/dev/accel*, /dev/vfio) or an explicit JAX_PLATFORMS is left alone; AOT
  compiles for TPU topologies need no TPU backend."""
  if ("JAX_PLATFORMS" in os.environ or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
      or importlib.util.find_spec("libtpu") is None):
    return
  cuda = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
  os.environ["JAX_PLATFORMS"] = "cuda,cpu" if cuda else "cpu"


def entry(main, compile_cache: bool = True):
  """A `python -m transformer_jax.X` process: tuned malloc (one re-exec), then run(main), with
  the persistent compilation cache (perf/caches.py) unless `compile_cache` is False. On a GPU
  JAX takes XLA_PYTHON_CLIENT_MEM_FRACTION of its memory; ours default it (yours win) to the
  share that `aot --topology=GPU` checks a program against and launch/gpu_slurm.sh sets, not
  to JAX's 0.75: a program that fits there fits here."""
  helping = any(arg in ("--help", "-h") for arg in sys.argv[1:])  # (parse answers it: no jax)
  try:
    if not helping:
      reexec_with_tuned_malloc()
    skip_absent_tpu()
  except KeyboardInterrupt:
    _interrupted()

  def prepared(argv):  # inside run: a Ctrl-C while these import is `interrupted` too
    from transformer_jax.perf import topology  # pylint: disable=g-import-not-at-top
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", topology.GPU_MEM_FRACTION)
    if compile_cache and not helping:
      from transformer_jax.perf import caches  # pylint: disable=g-import-not-at-top
      caches.setup()
    return main(argv)
  return run(prepared)


def run(main):
  """Runs main(argv); a ConfigError becomes `error: ...` on stderr and exit code 2.
  Library chatter (absl INFO/WARNING from TFDS and Orbax; gcsfs's retries and tracebacks of a
  storage server out of reach, which our `error:` line names) is hidden unless TJAX_VERBOSE=1."""
  try:
    if not os.environ.get("TJAX_VERBOSE"):
      from absl import logging  # pylint: disable=g-import-not-at-top
      logging.set_verbosity(logging.FATAL)  # our errors say what happened; TJAX_VERBOSE=1: theirs
      import logging as std_logging  # pylint: disable=g-import-not-at-top
      std_logging.getLogger("gcsfs").setLevel(std_logging.CRITICAL)
    return main(sys.argv[1:])
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    _exit(2)
  except KeyboardInterrupt:
    _interrupted()
  except Exception as e:  # pylint: disable=broad-except
    if not out_of_memory(e) or os.environ.get("TJAX_VERBOSE"):
      if _job_processes() == 1:
        raise
      traceback.print_exc()
      print(f"error: this process of {_job_processes()} stopped on the error above and leaves "
            "at once, so that the others stop too (if the error says a peer was lost, that "
            "peer's log says why)", file=sys.stderr)
      _exit(1)
    first, *details = str(e).strip().splitlines()
    if details:  # XLA's account of the memory (a GPU's allocations), then our one line
      print("\n".join(details), file=sys.stderr)
    print(f"error: out of memory: {first} (a smaller batch, length or --max_new_tokens fits; "
          "TJAX_VERBOSE=1 shows the traceback)", file=sys.stderr)
    _exit(1)


def _job_processes() -> int:
  distributed = sys.modules.get("transformer_jax.parallel.distributed")  # (no JAX import here)
  return distributed.processes() if distributed else 1


def _exit(code: int):
  """sys.exit(code); in a job of several processes, os._exit: a process that stops on its own
  error must not wait in JAX's shutdown for peers still in a collective with it (they waited
  too: up to its 300 s shutdown timeout, then the heartbeat's). Gone, it is declared dead
  within the heartbeat timeout and the coordination service stops the others."""
  if _job_processes() == 1:
    sys.exit(code)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def out_of_memory(e: BaseException) -> bool:
  """XLA's RESOURCE_EXHAUSTED (an allocation or a compiled program past the device's memory)."""
  return (type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError")
          and "RESOURCE_EXHAUSTED" in str(e))


def _interrupted():
  print("interrupted", file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  # Not sys.exit: a Ctrl-C during a compile leaves XLA's compile threads running, and
  # finalizing the interpreter under them crashed (exit 139, "Segmentation fault").
  os._exit(130)
