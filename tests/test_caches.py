"""The persistent compilation cache (perf/caches.py): where it goes, and a second start of the
same training program loads its compiled steps instead of compiling them; a CPU's measured peak
is kept beside it."""

import json
import os
import subprocess
import sys

import pytest

from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.perf import caches
from transformer_jax.perf import hardware
from tests.conftest import REPO, TEST_XLA_FLAGS, tiny_overrides


def test_the_cache_directory():
  home = os.path.expanduser("~")
  assert caches.cache_dir({}) == os.path.join(home, ".cache", "transformer_jax")
  assert caches.cache_dir({"XDG_CACHE_HOME": "/x/cache"}) == "/x/cache/transformer_jax"
  assert caches.cache_dir({"TJAX_CACHE_DIR": "/shared/c"}) == "/shared/c"
  assert caches.cache_dir({"TJAX_CACHE_DIR": "~/c"}) == os.path.join(home, "c")
  assert caches.cache_dir({"TJAX_CACHE_DIR": "gs://b/c"}) == "gs://b/c"
  for off in ("off", "OFF", "0", ""):
    assert caches.cache_dir({"TJAX_CACHE_DIR": off}) == ""
  with pytest.raises(ConfigError, match=r"^TJAX_CACHE_DIR='rel/c' must be an absolute path, a "
                                        r"gs:// URL or 'off'$"):
    caches.cache_dir({"TJAX_CACHE_DIR": "rel/c"})
  assert caches.max_bytes({}) == 20 * 2**30
  assert caches.max_bytes({"TJAX_CACHE_MAX_GB": "0.5"}) == 2**29
  for bad in ("0", "-1", "lots", "nan", "inf"):
    with pytest.raises(ConfigError, match=rf"^TJAX_CACHE_MAX_GB='{bad}' must be a number of GB"):
      caches.max_bytes({"TJAX_CACHE_MAX_GB": bad})


def test_a_second_start_loads_the_compiled_steps(tiny_data, tmp_path):
  """Two runs of the same config in two workdirs: the first compiles and stores the train step
  under TJAX_CACHE_DIR/jax, the second loads it (JAX's own debug log says which);
  an explicit JAX_COMPILATION_CACHE_DIR wins, and `off` stores nothing. A bound smaller
  than the cache prunes the programs used least recently, those of a cache written without a
  bound too."""
  cache = tmp_path / "cache"
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(XLA_FLAGS=TEST_XLA_FLAGS, JAX_PLATFORMS="cpu", TJAX_CACHE_DIR=str(cache),
             JAX_DEBUG_LOG_MODULES="jax._src.compiler")
  flags = [f"--config.{kv}" for kv in tiny_overrides(tiny_data, **{
      "train.steps": 1, "checkpoint.every_steps": 1, "eval.every_steps": 0,
      "train.sample_prompt": "", "model.num_layers": 1})]  # (1 layer: each compile halves)
  logs, peaks = [], []
  for name in ("first", "second"):
    done = subprocess.run(
        [sys.executable, "-m", "transformer_jax.train", f"--config={REPO}/configs/gpt2.py:tiny",
         f"--workdir={tmp_path / name}"] + flags, cwd=REPO, env=env, capture_output=True,
        text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    logs.append(done.stderr)
    peaks.append(os.stat(cache / hardware.CPU_PEAK_FILE).st_mtime_ns)
  assert peaks[0] == peaks[1]  # the CPU's peak: measured by the first run, read by the second
  for step in ("jit__train_step",):
    assert f"PERSISTENT COMPILATION CACHE MISS for '{step}'" in logs[0]
    assert f"Persistent compilation cache hit for '{step}'" in logs[1]
    assert f"CACHE MISS for '{step}'" not in logs[1]
    assert any(f.startswith(step + "-") for f in os.listdir(cache / "jax"))
  # Each probe prints what caches.setup() chose and then JAX's minimum compile time (a local
  # cache keeps the programs that compile in under a second too, unless JAX's own setting is
  # given): four probes (each pays a jax import) where five were.
  probe = [sys.executable, "-c", "from transformer_jax.perf import caches; print(caches.setup())"
           "; import jax; print(jax.config.jax_persistent_cache_min_compile_time_secs)"]
  env.pop(caches.MIN_COMPILE_ENV, None)
  said = [subprocess.run(probe, cwd=REPO, env=dict(env, **e), capture_output=True, text=True,
                         check=True).stdout.splitlines()
          for e in ({}, {"JAX_COMPILATION_CACHE_DIR": "/elsewhere"}, {"TJAX_CACHE_DIR": "off"},
                    {caches.MIN_COMPILE_ENV: "2.5"})]
  assert said[0] == [str(cache / "jax"), "0.0"]
  assert said[1][0] == "/elsewhere" and len(said[1]) == 2
  assert said[2][0] == "" and len(said[2]) == 2
  assert said[3] == [str(cache / "jax"), "2.5"]
  # Bounded to half its size, with the access times that a cache written without a bound
  # lacks: a new program is still written, the oldest go, and the rest fits the bound.
  jax_dir = cache / "jax"
  for name in os.listdir(jax_dir):
    if name.endswith("-atime"):
      os.remove(jax_dir / name)
  before = {n: os.path.getsize(jax_dir / n) for n in os.listdir(jax_dir) if n.endswith("-cache")}
  bound = sum(before.values()) // 2
  probe[-1] = ("from transformer_jax.perf import caches; caches.setup(); import jax; "
               "jax.jit(lambda x: x * 3 + 1)(jax.numpy.ones(7))")
  del env["JAX_DEBUG_LOG_MODULES"]
  done = subprocess.run(probe, cwd=REPO, env=dict(env, TJAX_CACHE_MAX_GB=str(bound / 2**30)),
                        capture_output=True, text=True, check=True)
  assert "Error writing persistent compilation cache" not in done.stderr, done.stderr
  after = {n: os.path.getsize(jax_dir / n) for n in os.listdir(jax_dir) if n.endswith("-cache")}
  new = [n for n in after if n not in before]
  assert any(n.startswith("jit__lambda-") for n in new), new
  assert sum(after.values()) <= bound and len(after) < len(before)


def test_a_cpu_peak_is_measured_once_per_machine_and_kept_in_the_cache(tmp_path, monkeypatch):
  """The measured matmul peak (~1 s of both cores here) is kept for the process and in
  TJAX_CACHE_DIR/cpu_peak.json, keyed by what it depends on (compiler options, XLA_FLAGS, ...);
  `fresh` measures again and keeps the larger; an unreadable file is measured over; `off` or a
  cache that cannot be written keeps it for the process only."""
  measured = []

  def measure(dtype, options=None):
    measured.append(options)
    return 1e11 * len(measured)

  monkeypatch.setattr(hardware, "measure_cpu_peak", measure)
  monkeypatch.setattr(hardware, "_CPU_PEAKS", {})
  monkeypatch.setenv("TJAX_CACHE_DIR", str(tmp_path))
  path = tmp_path / hardware.CPU_PEAK_FILE
  assert hardware.cpu_peak("float32") == 1e11 and len(measured) == 1 and path.exists()
  hardware._CPU_PEAKS.clear()  # pylint: disable=protected-access  (a new process)
  assert hardware.cpu_peak("float32") == 1e11 and len(measured) == 1
  assert hardware.cpu_peak("float32", {"xla_cpu_use_onednn": True}) == 2e11
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math")
  assert hardware.cpu_peak("float32") == 3e11 and len(measured) == 3
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "").replace(
      " --xla_cpu_enable_fast_math", ""))
  assert hardware.cpu_peak("float32", fresh=True) == 4e11 and len(measured) == 4
  hardware._CPU_PEAKS.clear()  # pylint: disable=protected-access
  assert hardware.cpu_peak("float32") == 4e11 and len(measured) == 4
  assert len(json.loads(path.read_text())) == 3
  path.write_text("{not json")
  hardware._CPU_PEAKS.clear()  # pylint: disable=protected-access
  assert hardware.cpu_peak("float32") == 5e11 and len(json.loads(path.read_text())) == 1
  monkeypatch.setenv("TJAX_CACHE_DIR", "off")
  path.unlink()
  hardware._CPU_PEAKS.clear()  # pylint: disable=protected-access
  assert hardware.cpu_peak("float32") == 6e11 and hardware.cpu_peak("float32") == 6e11
  assert len(measured) == 6 and not path.exists()
  # A cache that cannot be written (a full disk here): the figure still comes, no file is left.
  monkeypatch.setenv("TJAX_CACHE_DIR", str(tmp_path))
  class FullDisk:  # (the file is made; its write fails)
    def __init__(self, name, *args):
      open(name, *args).close()  # pylint: disable=unspecified-encoding

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def write(self, text):
      raise OSError(28, "No space left on device")

  monkeypatch.setattr(paths, "open", FullDisk, raising=False)
  hardware._CPU_PEAKS.clear()  # pylint: disable=protected-access
  assert hardware.cpu_peak("float32") == 7e11 and os.listdir(tmp_path) == []
