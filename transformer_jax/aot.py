"""Ahead-of-time check of a TPU pod or GPU host config from any machine (no TPU or GPU needed):
`python -m transformer_jax.aot --config=configs/NAME.py[:ARG] --topology=v5p-256|h100-8
[--slices=N] [--config.KEY=VALUE ...]`.

libtpu (`pip install -e .[tpu]`) describes a TPU slice's chips; JAX's CUDA plugin describes GPUs
from a target description of the chip (`jax[cuda12-local]` suffices; cuDNN attention also needs
cuDNN: `pip install -e .[gpu]`). The real train step is compiled for them with the config's mesh
and shardings, then the compiled program tells whether it fits in HBM and what one step costs.
Prints a summary, then as its last line one JSON object. Exit status 0 when it fits, 1 when it
does not (one line says by how much, after the JSON), 2 for a bad config, flag or topology name
(before anything is compiled).

The step-time estimate is a per-chip roofline, max(FLOPs / peak FLOP/s, HBM bytes / HBM
bandwidth, collective bytes / link bandwidth), of the compiled program (collectives.py prices the
program's all-gathers, reduce-scatters and all-reduces over the torus links their groups span, and
over the DCN across slices); it leaves out latency, contention and kernel inefficiency, so it is a
lower bound and the MFU it implies an upper bound. A scanned model's
FLOPs take two more (small) compiles; `--estimate=false` skips them and checks the fit only.
A GPU compile without a device has no cost analysis: for GPUs the check is the fit alone, against
XLA_PYTHON_CLIENT_MEM_FRACTION (0.9 unless set, as launch/gpu_slurm.sh sets it) of the memory.
"""

import contextlib
import copy
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time

from transformer_jax import cli
from transformer_jax import collectives
from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError

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


GPUS = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", 81559 * 2 ** 20, 3350.0, 132, 1.98, 50 * 2 ** 20, (9, 0)),
    "h200": Gpu("NVIDIA H200", 143771 * 2 ** 20, 4800.0, 132, 1.98, 50 * 2 ** 20, (9, 0)),
}
GPUS_PER_HOST = 8


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


def gpu_mem_fraction() -> float:
  value = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
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


def gpu_target_config(gpu: Gpu) -> str:
  """The GpuTargetConfig text XLA compiles against when no GPU is present. The cuDNN and CUDA
  runtime versions are those of the installed NVIDIA wheels (the `gpu` extra), else 9.8 / 12.8."""
  def version(package, default):
    try:
      return tuple(int(v) for v in importlib.metadata.version(package).split(".")[:2])
    except importlib.metadata.PackageNotFoundError:
      return default
  dnn, runtime = version("nvidia-cudnn-cu12", (9, 8)), version("nvidia-cuda-runtime-cu12", (12, 8))
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
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
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
  with quiet_fd2():
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.compiler_topology,
                                        chip_config_name=topo.chip.chip_config,
                                        num_slices=slices)
  return desc.devices


def argument_bytes_per_chip(trainer) -> int:
  """Train state bytes on one chip, from its shardings (the donated state's outputs reuse these
  buffers; the batch's few MB are left out)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return sum(int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(trainer.abstract_state))


_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def parse_oom(message: str, argument_bytes: int):
  """(bytes needed per chip, bytes available) from XLA:TPU's out-of-memory message, or Nones.
  'HLO temporaries (X) exceeds available HBM (Y)' counts temporaries only: the arguments are
  added; 'Used X of Y hbm' is the total."""
  num = r"([\d.]+)([KMGT])?B?"
  m = re.search(rf"temporaries \({num}\) exceeds available HBM \({num}\)", message)
  if m:
    return (float(m.group(1)) * _UNITS.get(m.group(2), 1) + argument_bytes,
            float(m.group(3)) * _UNITS.get(m.group(4), 1))
  m = re.search(rf"Used {num} of {num} hbm", message)
  if m:
    return (float(m.group(1)) * _UNITS.get(m.group(2), 1),
            float(m.group(3)) * _UNITS.get(m.group(4), 1))
  return None, None


COLLECTIVES = collectives.KINDS
COSTS = ("flops", "bytes", "ici_s", "dcn_s", "ici_bytes", "dcn_bytes") + COLLECTIVES  # kinds: s


def program_cost(compiled, devices, chip: Chip) -> dict:
  """Per-chip COSTS of a compiled program: FLOPs and HBM bytes accessed from XLA's cost analysis,
  and its collectives' seconds and bytes over ICI and DCN (collectives.py)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0]
  if chip.ici_link_gbps:
    comm = collectives.link_time(collectives.collectives(compiled.as_text()), devices,
                                 chip.ici_link_gbps, chip.dcn_gbps)
  else:  # no published link bandwidth (v4): not priced
    comm = dict.fromkeys(COSTS[2:6], 0.0) | {"by_kind_s": {}}
  return {"flops": float(analysis.get("flops", 0.0)),
          "bytes": float(analysis.get("bytes accessed", 0.0)),
          **{k: comm[k] for k in COSTS[2:6]},
          **{k: comm["by_kind_s"].get(k, 0.0) for k in COLLECTIVES}}


def step_cost(config, mesh, compiled, chip: Chip) -> tuple[dict, str]:
  """(COSTS, how) per chip of one train step. XLA's cost analysis counts a loop body once, not
  once per iteration, so a microbatch scan is multiplied out here, and a
  scanned layer stack (whose program's cost is no simple sum of its parts) is replaced by two more
  compiles, unrolled with 1 and 2 layers and one microbatch of the same rows: cost(L) = c1 +
  (L - 1)(c2 - c1). Times the microbatches, which counts the optimizer update and the gradient
  reduction that many times (a small excess for FLOPs, an over-count for a data-parallel
  gradient all-reduce, which runs once)."""
  m, layers = config.train.microbatches, config.model.num_layers
  devices = list(mesh.devices.flat)  # the programs' device ids index this order
  if not config.model.get("scan_layers", False):
    cost = program_cost(compiled, devices, chip)  # collectives.py counts the loop's trips itself
    return ({k: m * v if k in ("flops", "bytes") else v for k, v in cost.items()},
            "compiled program" + (f" x {m} microbatches" if m > 1 else ""))
  from transformer_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top
  probes = []
  for n in (1, 2):
    probe = copy.deepcopy(config)
    for key, value in (("model.num_layers", n), ("model.scan_layers", False),
                       ("train.microbatches", 1),
                       ("train.batch_size", config.train.batch_size // m)):
      config_lib.set_value(probe, key, str(value))
    with quiet_fd2():
      probes.append(program_cost(Trainer(probe, mesh).lower_train_step().compile(), devices,
                                 chip))
  c1, c2 = probes
  return ({k: m * (c1[k] + (layers - 1) * (c2[k] - c1[k])) for k in COSTS},
          "unrolled 1- and 2-layer compiles, extrapolated to all layers")


def check(config, topo: Topology, slices: int, estimate: bool = True) -> dict:
  """Compiles the train step for `slices` x `topo` and returns the report (see the module doc).
  estimate=False skips the FLOP counting compiles of a scanned model (and the roofline)."""
  import jax  # pylint: disable=g-import-not-at-top
  from transformer_jax.models.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  from transformer_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import metrics  # pylint: disable=g-import-not-at-top
  from transformer_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top
  chip = topo.chip
  devices = topology_devices(topo, slices)
  mesh = sharding.make_mesh(config, devices)
  trainer = Trainer(config, mesh)
  c = config
  params = jax.tree.leaves(trainer.abstract_state.params)
  model_cfg = ModelConfig.from_config(c.model)
  n_matmul = metrics.matmul_params(trainer.abstract_state.params, c.model.tie_embeddings)
  tokens = c.train.batch_size * c.data.seq_len
  model_flops = metrics.flops_per_token(model_cfg, n_matmul, c.data.seq_len) * tokens
  capacity = topo.capacity_bytes
  report = {
      "topology": topo.name, "compiler_topology": topo.compiler_topology, "slices": slices,
      "chips": len(devices), "generation": topo.generation,
      "mesh": dict(mesh.shape), "mesh_dcn": config_lib.mesh_dcn_shape(c.mesh),
      "params": sum(int(math.prod(p.shape)) for p in params),
      "batch_size": c.train.batch_size, "seq_len": c.data.seq_len,
      "microbatches": c.train.microbatches, "remat": c.model.remat,
      "scan_layers": bool(c.model.get("scan_layers", False)), "dtype": c.model.dtype,
      "model_flops_per_step": model_flops, "hbm_capacity_bytes": int(capacity),
  }
  t0 = time.perf_counter()
  try:
    lowered = trainer.lower_train_step()
  except RuntimeError as e:  # jax checks for the library when it traces cuDNN attention
    if "cuDNN" not in str(e):
      raise
    raise ConfigError(f"model.attention_impl={c.model.attention_impl} needs cuDNN to compile "
                      f"for {topo.generation} ({e}): pip install -e .[gpu]") from None
  try:
    with quiet_fd2():
      compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
      raise
    needed, available = parse_oom(message, argument_bytes_per_chip(trainer))
    if available:
      report["hbm_capacity_bytes"] = int(available)
    report.update(fits=False, hbm_per_chip_bytes=int(needed) if needed else None,
                  compile_s=time.perf_counter() - t0, flops_per_step=None,
                  flops_per_step_per_chip=None, step_time_estimate_s=None, mfu_estimate=None,
                  compiler_message=message.splitlines()[0][:300])
    return report
  report["compile_s"] = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  # Peak HBM per chip = arguments + outputs - aliased + temporaries + code. The state is donated,
  # so its outputs alias its arguments (counted once); temp_size is XLA's buffer assignment of
  # every intermediate, already packed by liveness (the peak, not a sum); the executable itself
  # also lives in HBM.
  hbm = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
         + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  report.update(
      fits=hbm <= report["hbm_capacity_bytes"], hbm_per_chip_bytes=int(hbm),
      hbm_breakdown={"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
                     "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
                     "code": mem.generated_code_size_in_bytes})
  if topo.platform == "cuda" or (not estimate and report["scan_layers"]):
    how = ("none (a GPU compile without a device has no cost analysis)"
           if topo.platform == "cuda" else "skipped (--estimate=false)")
    report.update(flops_per_step=None, flops_per_step_per_chip=None, step_time_estimate_s=None,
                  mfu_estimate=None, cost_source=how)
    return report
  # The SPMD program is one chip's: its costs are per chip.
  cost, report["cost_source"] = step_cost(config, mesh, compiled, chip)
  flops_chip, bytes_chip = cost["flops"], cost["bytes"]
  n = len(devices)
  # A chip does at least its share of the model's FLOPs; XLA's count can be lower (on v5e it
  # reports 0.65-0.85x the model's for models that count 1.2x on v5p).
  compute_s = max(flops_chip, model_flops / n) / (chip.peak_tflops * 1e12)
  memory_s = bytes_chip / (chip.hbm_gbps * 1e9)
  # Collectives: only where the chip's link bandwidths are published (not v4).
  comm_s = cost["ici_s"] + cost["dcn_s"] if chip.ici_link_gbps else None
  terms = {"compute": compute_s, "memory": memory_s, "communication": comm_s or 0.0}
  bound = max(terms, key=terms.get)
  step_s = terms[bound]
  report.update(
      flops_per_step_per_chip=flops_chip, flops_per_step=flops_chip * n,
      bytes_accessed_per_chip=bytes_chip, compute_time_s=compute_s, memory_time_s=memory_s,
      communication_time_s=comm_s,
      **{key: cost[k] if comm_s is not None else None for key, k in (
          ("ici_time_s", "ici_s"), ("dcn_time_s", "dcn_s"), ("ici_bytes_per_chip", "ici_bytes"),
          ("dcn_bytes_per_chip", "dcn_bytes"))},
      communication_by_kind_s={k: cost[k] for k in COLLECTIVES if cost[k]},
      step_time_estimate_s=step_s, bound=bound,
      tokens_per_s_estimate=tokens / step_s if step_s else None,
      mfu_estimate=model_flops / (step_s * n * chip.peak_tflops * 1e12) if step_s else None,
      hardware_flops_ratio=flops_chip * n / model_flops if model_flops else None)
  return report


def gib(b) -> str:
  if b is None:
    return "?"
  return f"{b / GiB:.1f} GiB" if b >= GiB // 10 else f"{b / 2 ** 20:.1f} MiB"


def comm(r: dict) -> str:
  """The collectives' part of the roofline line."""
  if r.get("communication_time_s") is None:
    return f"collectives not priced ({r['generation']}'s link bandwidth is not published)"
  text = f"ICI {r['ici_time_s'] * 1e3:.1f} ms for {gib(r['ici_bytes_per_chip'])} per chip"
  if r["dcn_bytes_per_chip"]:
    text += f", DCN {r['dcn_time_s'] * 1e3:.1f} ms for {gib(r['dcn_bytes_per_chip'])}"
  return text


def summary(r: dict) -> str:
  mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
  lines = [
      f"topology   {r['topology']} ({r['compiler_topology']}) x {r['slices']} slice(s): "
      f"{r['chips']} {'GPUs' if r['generation'] in GPUS else 'chips'}; mesh {mesh} "
      f"(dcn {r['mesh_dcn']})",
      f"model      {r['params'] / 1e9:.2f}B params, batch {r['batch_size']} x {r['seq_len']}, "
      f"microbatches {r['microbatches']}, remat {r['remat']}, scan_layers {r['scan_layers']}, "
      f"{r['dtype']}",
      f"HBM        {gib(r['hbm_per_chip_bytes'])} per chip of {gib(r['hbm_capacity_bytes'])}: "
      f"{'fits' if r['fits'] else 'DOES NOT FIT'} (compiled in {r['compile_s']:.0f} s, "
      f"{r['wall_s']:.0f} s in all)",
  ]
  if r.get("hbm_breakdown"):
    b = r["hbm_breakdown"]
    lines.append(f"           arguments {gib(b['arguments'])} + outputs {gib(b['outputs'])} - "
                 f"aliased {gib(b['aliased'])} + temporaries {gib(b['temporaries'])} + code "
                 f"{gib(b['code'])}")
  if r.get("cost_source", "").startswith("none"):
    lines.append(f"roofline   {r['cost_source']}")
  if r.get("step_time_estimate_s"):
    lines += [
        f"FLOPs      {r['flops_per_step_per_chip']:.3e} per chip per step, "
        f"{r['flops_per_step']:.3e} in all ({r['hardware_flops_ratio']:.2f}x the model's "
        f"{r['model_flops_per_step']:.3e})",
        f"roofline   {r['step_time_estimate_s'] * 1e3:.1f} ms per step ({r['bound']}-bound: "
        f"compute {r['compute_time_s'] * 1e3:.1f} ms, HBM {r['memory_time_s'] * 1e3:.1f} ms, "
        f"{comm(r)}), {r['tokens_per_s_estimate']:,.0f} tokens/s, "
        f"MFU <= {100 * r['mfu_estimate']:.1f}%",
    ]
    if r.get("communication_by_kind_s"):
      lines.append("           collectives: " + ", ".join(
          f"{k} {v * 1e3:.1f} ms" for k, v in r["communication_by_kind_s"].items()))
  return "\n".join(lines)


def main(argv):
  spec, overrides, flags = cli.parse(argv, {"topology": "", "slices": 1, "estimate": True})
  if not flags["topology"]:
    raise ConfigError(f"--topology=NAME is required; valid: {valid_topologies()}")
  topo = parse_topology(flags["topology"])
  slices = flags["slices"]
  if slices < 1:
    raise ConfigError(f"--slices must be >= 1, got {slices}")
  if slices > 1 and topo.platform == "cuda":
    raise ConfigError(f"--slices is for TPU slices; several GPU hosts are one topology: "
                      f"--topology={topo.generation}-{GPUS_PER_HOST * slices}")
  if topo.platform == "cuda":
    gpu_mem_fraction()  # a bad XLA_PYTHON_CLIENT_MEM_FRACTION stops here, before compiling
    with quiet_fd2():  # importing jax loads the CUDA plugin, which logs that there is no driver
      import jax  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel
  if not spec:
    raise ConfigError("--config=FILE.py[:ARG] is required")
  config = config_lib.load(spec, overrides)
  dcn = config_lib.mesh_dcn_shape(config.mesh)
  if slices > 1 and math.prod(dcn.values()) == 1:
    config_lib.set_value(config, "mesh.dcn_data", str(slices))  # data parallel across slices
  elif math.prod(dcn.values()) != slices:
    raise ConfigError(f"mesh.dcn_data*dcn_fsdp*dcn_tensor = {math.prod(dcn.values())} but "
                      f"--slices={slices}")
  config_lib.validate(config, topo.chips * slices)
  t0 = time.perf_counter()
  report = check(config, topo, slices, flags["estimate"])
  report["wall_s"] = time.perf_counter() - t0
  print(summary(report))
  print(json.dumps(report, sort_keys=True))
  sys.stdout.flush()
  if not report["fits"]:
    need, cap = report["hbm_per_chip_bytes"], report["hbm_capacity_bytes"]
    share = (f" (XLA_PYTHON_CLIENT_MEM_FRACTION={gpu_mem_fraction()} of its memory)"
             if topo.platform == "cuda" else "")
    size = (f"needs {need / GiB:.1f} GiB per chip, {topo.generation} has {cap / GiB:.1f} GiB"
            f"{share}: {(need - cap) / GiB:.1f} GiB over" if need else
            f"does not fit ({report['compiler_message']})")
    print(f"error: {size}; try --config.model.remat=full, more mesh.fsdp, more "
          f"train.microbatches or a smaller batch", file=sys.stderr)
    sys.exit(1)
  return report


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: never take a local TPU
  cli.entry(main)
