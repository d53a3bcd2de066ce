"""The persistent compilation cache, on by default for every command that trains or serves (not
for `benchmark` and `aot`, whose figures include compile times).

A second start of the same program on the same machine (or on any host of a job, with a shared
directory) loads the compiled step instead of compiling it again: JAX's compilation cache, keyed
by the program, the devices, jax/jaxlib versions and the XLA flags. On GPUs JAX also keeps XLA's
per-fusion autotuning results beside it (jax_persistent_cache_enable_xla_caches), written by
process 0 and read by the others, so the Triton GEMM autotuning of a first start is not redone.

  TJAX_CACHE_DIR   where (default $XDG_CACHE_HOME/transformer_jax, else ~/.cache/transformer_jax);
                   the compiled programs go in its jax/ folder. `off` turns the cache off. A
                   gs://BUCKET/PATH is shared by every host of a job (the autotuning results,
                   which XLA writes with local file I/O only, are then not kept).

An explicit JAX_COMPILATION_CACHE_DIR (or jax.config's jax_compilation_cache_dir) wins. A local
cache keeps every program, the small ones too (init, evaluation, metrics: a warm two-step smoke
run took 4.1 s instead of 4.8 s with JAX's default of keeping only programs that compile in 1 s
or more); a gs:// cache keeps JAX's default, as small objects cost a round trip each.
JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, if set, wins.

A local cache directory also keeps a CPU's measured matmul peak, what MFU divides by on a CPU
(cpu_peak.json, perf/hardware.py): measured once per machine instead of at every start.

  TJAX_CACHE_MAX_GB  bounds a local cache (default 20): past it JAX deletes the programs used
                   least recently (jax_compilation_cache_max_size, an explicit
                   JAX_COMPILATION_CACHE_MAX_SIZE wins). A gs:// cache is not pruned.
"""

import math
import os

from transformer_jax.config import ConfigError
from transformer_jax.config import paths

ENV = "TJAX_CACHE_DIR"
MIN_COMPILE_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
MAX_ENV, JAX_MAX_ENV, MAX_GB = "TJAX_CACHE_MAX_GB", "JAX_COMPILATION_CACHE_MAX_SIZE", 20.0
OFF = ("off", "none", "0", "false", "")


def cache_dir(environ=None) -> str:
  """The cache directory TJAX_CACHE_DIR names (or the default); "" when it is off."""
  env = os.environ if environ is None else environ
  value = env.get(ENV)
  if value is None:
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "transformer_jax")
  if value.strip().lower() in OFF:
    return ""
  if not paths.is_remote(value) and not os.path.isabs(os.path.expanduser(value)):
    raise ConfigError(f"{ENV}={value!r} must be an absolute path, a gs:// URL or 'off'")
  return paths.abspath(os.path.expanduser(value))


def setup(environ=None) -> str:
  """Points JAX's persistent compilation cache at cache_dir()/jax unless something already
  chose one; returns the directory JAX uses ("" when none). Before the first compile."""
  import jax  # pylint: disable=g-import-not-at-top
  chosen = jax.config.jax_compilation_cache_dir
  if chosen:
    return chosen
  d = cache_dir(environ)
  if not d:
    return ""
  where = paths.join(d, "jax")
  jax.config.update("jax_compilation_cache_dir", where)
  if paths.is_remote(where):
    paths.use_emulator()
    jax.config.update("jax_persistent_cache_enable_xla_caches", "none")
    return where
  env = os.environ if environ is None else environ
  if MIN_COMPILE_ENV not in env:  # a local cache keeps the small programs too
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if JAX_MAX_ENV not in env:
    jax.config.update("jax_compilation_cache_max_size", max_bytes(env))
    _stamp_unused(where)
  return where


def max_bytes(environ=None) -> int:
  """The bound TJAX_CACHE_MAX_GB puts on a local cache, in bytes."""
  env = os.environ if environ is None else environ
  text = env.get(MAX_ENV, str(MAX_GB))
  try:
    gb = float(text)
  except ValueError:
    gb = -1.0
  if not (gb > 0 and math.isfinite(gb)):
    raise ConfigError(f"{MAX_ENV}={text!r} must be a number of GB > 0")
  return int(gb * 2**30)


def _stamp_unused(where: str):
  """Gives each program a cache written without a bound holds the access time that JAX's
  pruning reads (its file's mtime); without one, every later write to the cache would fail."""
  if not os.path.isdir(where):
    return
  names = set(os.listdir(where))
  for name in names:
    key = name.removesuffix("-cache")
    if name.endswith("-cache") and key + "-atime" not in names:
      mtime = os.stat(os.path.join(where, name)).st_mtime_ns
      with open(os.path.join(where, key + "-atime"), "wb") as f:
        f.write(mtime.to_bytes(8, "little"))
