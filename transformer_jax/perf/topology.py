"""TPU slices and GPU hosts by name (`v5p-256`, `v5e:4x4`, `h100-16`), and their devices for an
ahead-of-time compile on a machine that has none (libtpu's or JAX's CUDA plugin's topology)."""

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import sys
import tempfile

from transformer_jax.config import ConfigError
from transformer_jax.perf.hardware import ALIASES, CHIPS, GPUS, GPUS_PER_HOST, Chip, GiB, Gpu


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # Cloud TPU name, e.g. v5p-256, or GPUs: h100-8
  generation: str
  chips: int  # per slice
  shape: str  # e.g. 4x4x8; GPUs: hosts x GPUs per host, e.g. 2x8

  @property
  def platform(self) -> str:
    return "cuda" if self.generation in GPUS else "tpu"

  @property
  def chip(self) -> Chip | Gpu:
    return GPUS[self.generation] if self.platform == "cuda" else CHIPS[self.generation]

  @property
  def compiler_topology(self) -> str:
    """The topology as the compiler's plugin names it: libtpu's GEN:AxBxC, or the CUDA plugin's
    partitions x hosts x GPUs per host."""
    if self.platform == "cuda":
      return f"1x{self.shape}"
    return f"{self.chip.topology_prefix}:{self.shape}"

  @property
  def capacity_bytes(self) -> float:
    """What one program may use per chip: libtpu's available HBM, or the share of a GPU's memory
    that JAX's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION)."""
    if self.platform == "tpu":
      return self.chip.hbm_usable_gib * GiB
    return gpu_mem_fraction() * self.chip.memory_bytes


GPU_MEM_FRACTION = "0.9"  # our commands' XLA_PYTHON_CLIENT_MEM_FRACTION unless set (cli.entry)


def gpu_mem_fraction() -> float:
  value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION)
  try:
    fraction = float(value)
  except ValueError:
    fraction = -1.0
  if not 0 < fraction <= 1:
    raise ConfigError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={value!r}: expected a number in (0, 1]")
  return fraction


def valid_topologies() -> str:
  return ("v4-8 .. v4-8192, v5p-8 .. v5p-8192 (TensorCores, 2 per chip), v5e-1, v5e-4 .. "
          "v5e-256, v6e-1, v6e-4 .. v6e-256 (chips), powers of two; or GEN:AxBxC / GEN:AxB; "
          "h100-N / h200-N GPUs (1, 2, 4, 8, then hosts of 8), or h100:HOSTSxGPUS")


def torus_shape(chips: int, dims: int) -> str:
  """The usual slice shape for a power-of-two chip count: 2-D AxB with A <= B (v5e/v6e), 3-D
  AxBxC with the doublings spread C, B, A in turn from 2x2x1 (v4/v5p)."""
  k = chips.bit_length() - 1
  if dims == 2:
    a = 2 ** (k // 2)
    return f"{a}x{chips // a}"
  if chips == 4:
    return "2x2x1"
  sizes = [1, 1, 1]
  for i in range(k):
    sizes[2 - i % 3] *= 2
  return "x".join(map(str, sizes))


def parse_topology(name: str) -> Topology:
  """`v5p-8` (Cloud TPU accelerator type) or `v5p:2x2x1` (generation:torus shape); `h100-16`
  (GPUs: two hosts of 8) or `h100:2x8` (hosts x GPUs per host)."""
  error = ConfigError(f"--topology={name!r} is not a TPU slice or GPU host this tool knows; "
                      f"valid: {valid_topologies()}")
  name = name.strip().lower()
  m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", name)
  if not m:
    raise error
  gen = ALIASES.get(m.group(1), m.group(1))
  if gen in GPUS:
    if m.group(3):
      sizes = [int(v) for v in m.group(3).split("x")]
      if len(sizes) != 2 or min(sizes) < 1 or sizes[1] > GPUS_PER_HOST:
        raise error
      hosts, per_host = sizes
    else:
      count = int(m.group(2))
      per_host = min(count, GPUS_PER_HOST)
      if count < 1 or count % per_host or per_host & (per_host - 1) or count > 4096:
        raise error
      hosts = count // per_host
    return Topology(f"{gen}-{hosts * per_host}", gen, hosts * per_host, f"{hosts}x{per_host}")
  if gen not in CHIPS:
    raise error
  chip = CHIPS[gen]
  if m.group(3):  # an explicit shape
    sizes = [int(s) for s in m.group(3).split("x")]
    if len(sizes) != chip.torus_dims or min(sizes) < 1:
      raise error
    chips = math.prod(sizes)
    if chips > 1 and (sizes[0] % 2 or sizes[1] % 2):  # (libtpu's traceback)
      raise ConfigError(f"--topology={name!r}: a slice of more than one chip is made of hosts "
                        "of 2x2 chips, so its first two sizes must be even")
    if chip.torus_dims == 2 and chips > chip.max_chips:  # (some larger ones abort libtpu)
      raise ConfigError(f"--topology={name!r}: a {gen} slice has at most {chip.max_chips} chips")
    return Topology(f"{gen}-{chips * chip.cores_per_chip}", gen, chips, m.group(3))
  count = int(m.group(2))
  chips, odd = divmod(count, chip.cores_per_chip)
  smallest = 4 if chip.torus_dims == 3 else 1
  if (odd or chips < smallest or chips > chip.max_chips or chips & (chips - 1)
      or (chip.torus_dims == 2 and chips == 2)):
    raise error
  return Topology(f"{gen}-{count}", gen, chips, torus_shape(chips, chip.torus_dims))


@contextlib.contextmanager
def quiet_fd2():
  """libtpu logs from C++ straight to file descriptor 2 while it looks for a TPU host it will not
  use (metadata server, worker hostnames); hide that unless TJAX_VERBOSE=1."""
  if os.environ.get("TJAX_VERBOSE"):
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def cuda_plugin() -> int | None:
  """The CUDA major version of JAX's installed CUDA plugin (jax_plugins.xla_cuda12 or 13)."""
  for major in (12, 13):
    try:
      if importlib.util.find_spec(f"jax_plugins.xla_cuda{major}") is not None:
        return major
    except ModuleNotFoundError:  # no jax_plugins package at all
      return None
  return None


def gpu_target_config(gpu: Gpu) -> str:
  """The GpuTargetConfig text XLA compiles against when no GPU is present. The cuDNN and CUDA
  runtime versions are those of the NVIDIA wheels for the plugin's CUDA (the `gpu` extra: cu12),
  else 9.8 / 12.8."""
  cuda = cuda_plugin() or 12
  def version(packages, default):
    for package in packages:
      try:
        return tuple(int(v) for v in importlib.metadata.version(package).split(".")[:2])
      except importlib.metadata.PackageNotFoundError:
        pass
    return default
  dnn = version([f"nvidia-cudnn-cu{cuda}"], (9, 8))
  runtime = version([f"nvidia-cuda-runtime-cu{cuda}"] + ["nvidia-cuda-runtime"] * (cuda > 12),
                    (12, 8))
  major, minor = gpu.compute_capability
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 shared_memory_per_block_optin: 232448 threads_per_core_limit: 2048
  core_count: {gpu.sms} fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {int(gpu.hbm_gbps * 1e9)} l2_cache_size: {gpu.l2_bytes}
  clock_rate_ghz: {gpu.clock_ghz} device_memory_size: {gpu.memory_bytes}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} }}
runtime_version {{ major: {runtime[0]} minor: {runtime[1]} }}
device_description_str: "{gpu.description}"
"""


def topology_devices(topo: Topology, slices: int):
  if topo.platform == "cuda":
    if cuda_plugin() is None:
      raise ConfigError("JAX's CUDA plugin is not installed; GPU AOT checks need it: "
                        "pip install -e .[gpu] (or jax[cuda12-local])")
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    with quiet_fd2():  # the plugin logs that this machine has no CUDA driver
      return topologies.get_topology_desc(platform="cuda", topology=topo.compiler_topology,
                                          target_config=gpu_target_config(topo.chip)).devices
  if importlib.util.find_spec("libtpu") is None:
    raise ConfigError("libtpu is not installed; AOT checks need it: pip install -e .[tpu]")
  # libtpu reads these when it loads: skip the metadata server, tolerate other processes that
  # loaded it (nothing here runs on a TPU).
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # libtpu's hosts default to 2x2 chips; a one-chip slice (v5e-1, v6e-1) is a host of one
  one_chip = {"chips_per_host_bounds": [1, 1, 1]} if topo.chips == 1 else {}
  try:
    with quiet_fd2():
      desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.compiler_topology,
                                          chip_config_name=topo.chip.chip_config,
                                          num_slices=slices, **one_chip)
  except Exception as e:  # pylint: disable=broad-except  # (JaxRuntimeError: a shape it refuses)
    raise ConfigError(f"--topology={topo.generation}:{topo.shape}: libtpu refuses it: "
                      f"{str(e).strip().splitlines()[0]}") from None
  return desc.devices
