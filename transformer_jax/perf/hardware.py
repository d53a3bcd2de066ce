"""The hardware catalog: every chip's and GPU's figures in one place (peak FLOP/s, HBM, links),
what MFU divides by, what the AOT check compiles against and prices with.

Importing it does not import jax: the AOT check must load JAX's CUDA plugin under quiet_fd2
(topology.py), which it cannot once jax is imported."""

import dataclasses
import json
import os
import platform
import time

from transformer_jax.config import paths
from transformer_jax.perf import caches

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation. `hbm_usable_gib` is the HBM the compiler lets one program use per chip
  (the 'available HBM' of libtpu 0.0.42's out-of-memory message); the spec sheets give v4 32 GiB,
  v5e 16 GB, v5p 95 GB, v6e 32 GB. Peak and bandwidth: Cloud TPU docs, per chip."""
  topology_prefix: str  # the generation's name in libtpu topology strings ("v5p:2x2x1")
  cores_per_chip: int  # TensorCores per chip, as counted in Cloud TPU names (v5p-8 = 4 chips)
  torus_dims: int  # 3: v4/v5p (AxBxC), 2: v5e/v6e (AxB)
  chip_config: str  # libtpu chip_config_name: megacore = one device per chip
  hbm_usable_gib: float
  hbm_gbps: float  # HBM bandwidth, GB/s
  peak_tflops: float  # dense bf16
  max_chips: int  # the largest single slice this tool names
  # One ICI link, one way, GB/s: the docs' bidirectional ICI bandwidth per chip / 2 / links per
  # chip (6 on a 3-D torus, 4 on a 2-D one); and the DCN bandwidth per chip, GB/s (v5p: 50 Gbps;
  # v5e, v6e: the host's NICs, 2 x 100 and 4 x 200 Gbps, over its 8 chips). 0: not published.
  ici_link_gbps: float = 0.0
  dcn_gbps: float = 0.0

  def wraps(self, extent) -> tuple[bool, ...]:
    """Which dimensions of a slice `extent` chips long close into rings: a v4 or v5p slice of
    whole 4x4x4 cubes is a full 3-D torus, a smaller one has no wraparound links (Cloud TPU v5p
    docs). v5e and v6e are taken to wrap along every dimension (unpublished for their smaller
    slices; the links' time stays a lower bound)."""
    if self.torus_dims == 3:
      return (all(e % 4 == 0 for e in extent),) * len(extent)
    return (True,) * len(extent)


CHIPS = {
    "v4": Chip("v4", 2, 3, "megacore", 30.75, 1200.0, 275.0, 4096),
    "v5p": Chip("v5p", 2, 3, "megacore", 95.74, 2765.0, 459.0, 4096, 1200 / 12, 50 / 8),
    "v5e": Chip("v5e", 1, 2, "default", 15.75, 819.0, 197.0, 256, 400 / 8, 200 / 8 / 8),
    "v6e": Chip("v6e", 1, 2, "default", 31.25, 1638.0, 918.0, 256, 800 / 8, 800 / 8 / 8),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class Gpu:
  """One NVIDIA GPU, as XLA's GPU compiler needs it described when no device is present (a
  GpuTargetConfig). Memory: the total CUDA reports (nvidia-smi's MiB); SMs, clock, L2 and
  bandwidth: NVIDIA's SXM data sheets."""
  description: str
  memory_bytes: int
  hbm_gbps: float
  sms: int
  clock_ghz: float
  l2_bytes: int
  compute_capability: tuple[int, int]
  peak_tflops: float  # dense bf16


GPUS = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", 81559 * 2 ** 20, 3350.0, 132, 1.98, 50 * 2 ** 20, (9, 0),
                989.0),
    "h200": Gpu("NVIDIA H200", 143771 * 2 ** 20, 4800.0, 132, 1.98, 50 * 2 ** 20, (9, 0), 989.0),
}
GPUS_PER_HOST = 8


# Dense bf16 peak TFLOP/s per device, keyed by a substring of jax's device_kind (lower case); the
# first key found in device_kind wins (the PCIe and NVL parts before the SXM ones). The catalogued
# chips' figures come from CHIPS and GPUS; the others are NVIDIA's data sheets.
PEAK_TFLOPS = (
    ("v6 lite", CHIPS["v6e"].peak_tflops), ("v6e", CHIPS["v6e"].peak_tflops),
    ("v5p", CHIPS["v5p"].peak_tflops), ("v5 lite", CHIPS["v5e"].peak_tflops),
    ("v5e", CHIPS["v5e"].peak_tflops),
    ("tpu v5", CHIPS["v5p"].peak_tflops),  # v5p chips report device_kind "TPU v5"
    ("v4", CHIPS["v4"].peak_tflops),
    ("h200 nvl", 835.0), ("h200", GPUS["h200"].peak_tflops),
    ("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h100", GPUS["h100"].peak_tflops),
    ("a100", 312.0),
)


def measure_cpu_peak(dtype="float32", n: int = 1536, reps: int = 10, options=None) -> float:
  """FLOP/s of one square matmul through XLA on this host's CPU (best of `reps`), compiled with
  the step's compiler `options` (perf/compiler.py): the peak of the matmuls the step runs."""
  import jax  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  a = jax.numpy.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x, compiler_options=options)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


_CPU_PEAKS = {}  # this process's measured CPU peaks, by _cpu_key
CPU_PEAK_FILE = "cpu_peak.json"


def _cpu_key(dtype, options) -> str:
  """What a measured CPU peak depends on: the CPU model and the cores this process may use, the
  jax/jaxlib versions, XLA_FLAGS (the host device count among them), the dtype and the compiler
  options."""
  import jax  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import jaxlib  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), model)
  except OSError:
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return json.dumps([model, cores, jax.__version__, jaxlib.__version__,
                     os.environ.get("XLA_FLAGS", "").split(), str(jax.numpy.dtype(dtype)),
                     sorted((options or {}).items())], default=str)


def cpu_peak(dtype="float32", options=None, fresh=False) -> float:
  """This host's CPU matmul peak (measure_cpu_peak), measured once per machine: kept for the
  process and in TJAX_CACHE_DIR/cpu_peak.json (a local cache directory; delete the file to
  measure again), where a later measurement under the same key keeps the larger figure. A
  measurement takes ~1 s of both cores of a 2-core host; every CPU run used to pay it at
  start-up. `fresh`: measure now (the benchmark's rounds), and keep the larger figure."""
  key = _cpu_key(dtype, options)
  if key in _CPU_PEAKS and not fresh:
    return _CPU_PEAKS[key]
  try:
    folder = caches.cache_dir()
  except ValueError:  # (a bad TJAX_CACHE_DIR: said by caches.setup, where it matters)
    folder = ""
  path = os.path.join(folder, CPU_PEAK_FILE) if folder and not paths.is_remote(folder) else ""
  stored = _read_peaks(path)
  if key in stored and not fresh:
    _CPU_PEAKS[key] = stored[key]
    return stored[key]
  peak = max(measure_cpu_peak(dtype, options=options), _CPU_PEAKS.get(key, 0.0))
  _CPU_PEAKS[key] = peak
  if path:
    stored = _read_peaks(path)  # (another process may have written since)
    stored[key] = max(peak, stored.get(key, 0.0))
    try:
      os.makedirs(folder, exist_ok=True)
      paths.write_texts({path: json.dumps(stored, indent=0)})  # (no temporary file left)
    except OSError:  # an unwritable cache (or a full disk): kept for this process only
      pass
  return peak


def _read_peaks(path: str) -> dict:
  """The peaks a cpu_peak.json holds ({} when there is none, or it is unreadable)."""
  try:
    with open(path, encoding="utf-8") as f:
      stored = json.load(f)
  except (OSError, ValueError):
    return {}
  if not isinstance(stored, dict):
    return {}
  return {k: v for k, v in stored.items() if isinstance(v, float) and v > 0}


def peak_flops_per_device(dtype="float32", options=None, fresh=False) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from); `options`: the step's compiler
  options, for a CPU's measured peak (cpu_peak: measured once per machine; `fresh`: now)."""
  import jax  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  dev = jax.devices()[0]
  kind = dev.device_kind.lower()
  for key, tflops in PEAK_TFLOPS:
    if key in kind:
      return tflops * 1e12, f"table:{dev.device_kind}"
  if dev.platform == "cpu":
    # Forced host devices (--xla_force_host_platform_device_count) share the same cores.
    onednn = ":onednn" if (options or {}).get("xla_cpu_use_onednn") else ""
    return (cpu_peak(dtype, options, fresh) / jax.local_device_count(),
            f"measured:cpu_matmul{onednn}")
  return float("nan"), f"unknown:{dev.device_kind}"
