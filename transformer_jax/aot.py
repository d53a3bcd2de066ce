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
bandwidth, collective bytes / link bandwidth), of the compiled program (perf/roofline.py;
perf/collectives.py prices the program's all-gathers, reduce-scatters, all-reduces, permutes and
an MoE layer's all-to-alls over the torus links their groups span, and over the DCN across
slices; `collectives:` lists the time of each kind); it leaves out latency, contention
and kernel inefficiency, so it is a lower bound and the MFU it implies an upper bound. A scanned
model's FLOPs take two more (small) compiles; `--estimate=false` skips them and checks the fit only.
A GPU compile without a device has no cost analysis: for GPUs the check is the fit alone, against
XLA_PYTHON_CLIENT_MEM_FRACTION (0.9 unless set, as every `python -m transformer_jax.X` and
launch/gpu_slurm.sh set it) of the memory.
On every platform `kernels:` (perf/kernels.py) says what the compiled program runs: its matmuls
by operand and result dtypes, its fusions by kind (Triton GEMMs on GPUs), its custom calls (cuDNN
attention, cuBLAS, Pallas kernels); in a bfloat16 model the matmuls with fp32 operands are named
by where they come from.
"""

import copy
import importlib
import json
import math
import os
import re
import sys
import time

from transformer_jax import cli
from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.perf import hardware
from transformer_jax.perf import kernels
from transformer_jax.perf import roofline
from transformer_jax.perf import topology


def check(config, topo: topology.Topology, slices: int, estimate: bool = True) -> dict:
  """Compiles the train step for `slices` x `topo` and returns the report (see the module doc).
  estimate=False skips the FLOP counting compiles of a scanned model (and the roofline)."""
  # jax (and what imports it) only now: main loads JAX's CUDA plugin quietly first.
  from transformer_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import fit  # pylint: disable=g-import-not-at-top
  from transformer_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top
  devices = topology.topology_devices(topo, slices)
  try:
    mesh = sharding.make_mesh(config, devices)
  except NotImplementedError as e:  # jax.make_mesh: an axis no product of whole torus dimensions
    m = re.search(r"logical_axis_index (\d+) of size (\d+)", str(e))
    axis = f"mesh.{sharding.MESH_AXES[int(m.group(1))]}={m.group(2)}" if m else "a mesh axis"
    raise ConfigError(f"{axis} is no product of whole torus dimensions of "
                      f"{topo.compiler_topology} (jax.make_mesh splits none; "
                      f"--config.mesh.allow_split_physical_axes=true splits them)") from None
  trainer = Trainer(config, mesh)
  report = describe(config, topo, slices, trainer, mesh)
  t0 = time.perf_counter()
  chosen = None  # the compile fit.choose ended at, when no count fits (then it does not fit)
  if not config.train.microbatches:  # the fewest that fit this chip's HBM (training/fit.py)
    say = lambda msg: print(msg, file=sys.stderr)  # pylint: disable=unnecessary-lambda-assignment
    config = copy.deepcopy(config)
    try:
      m = fit.choose(trainer, report["hbm_capacity_bytes"], say, lambda t: _compile(t, topo))
    except fit.NoFit as e:  # reported as any config that does not fit: at its largest count
      say(str(e))
      m, chosen = e.count, e.result
    config.train.microbatches = report["microbatches"] = m
  compiled = compile_step(trainer, topo, report, chosen)
  report["compile_s"] = time.perf_counter() - t0
  if compiled is None:  # out of memory: report says by how much
    return report
  report.update(roofline.hbm(compiled.memory_analysis(), report["hbm_capacity_bytes"]))
  report["fits"] = report["fits"] and chosen is None  # (fit's 5 % left free counts there)
  report["kernels"] = kernels.census(compiled.as_text())
  if topo.platform == "cuda" or (not estimate and report["scan_layers"]):
    how = ("none (a GPU compile without a device has no cost analysis)"
           if topo.platform == "cuda" else "skipped (--estimate=false)")
    report.update(dict.fromkeys(NO_ESTIMATE), cost_source=how)
    return report
  # The SPMD program is one chip's: its costs are per chip.
  cost, report["cost_source"] = roofline.step_cost(
      config, list(mesh.devices.flat), compiled, topo.chip,
      lambda probe: Trainer(probe, mesh).lower_train_step().compile())
  report.update(roofline.estimate(cost, report["model_flops_per_step"], len(devices), topo.chip,
                                  config.train.batch_size * config.data.seq_len))
  return report


NO_ESTIMATE = ("flops_per_step", "flops_per_step_per_chip", "step_time_estimate_s",
               "mfu_estimate")


def describe(config, topo, slices, trainer, mesh) -> dict:
  """The report's description of the run: topology, mesh, model size, the model's FLOPs."""
  import jax  # pylint: disable=g-import-not-at-top
  from transformer_jax.perf import counting  # pylint: disable=g-import-not-at-top
  c = config
  tokens = c.train.batch_size * c.data.seq_len
  return {
      "topology": topo.name, "compiler_topology": topo.compiler_topology, "slices": slices,
      "chips": mesh.size, "generation": topo.generation,
      "mesh": dict(mesh.shape), "mesh_dcn": config_lib.mesh_dcn_shape(c.mesh),
      "params": sum(math.prod(p.shape) for p in jax.tree.leaves(trainer.abstract_state.params)),
      "batch_size": c.train.batch_size, "seq_len": c.data.seq_len,
      "microbatches": c.train.microbatches, "remat": c.model.remat,
      "scan_layers": bool(c.model.scan_layers), "dtype": c.model.dtype,
      "model_flops_per_step": counting.for_config(c, trainer.model.cfg,
                                                  trainer.abstract_state.params) * tokens,
      "hbm_capacity_bytes": int(topo.capacity_bytes),
  }


def compile_step(trainer, topo, report: dict, result=None):
  """The compiled train step (`result`: its fit.compile_step already), or None when it does not
  fit (the report then holds the needed and available bytes from XLA's out-of-memory message)."""
  program, needed, available, refusal = result or _compile(trainer, topo)
  if program is None:
    if available:
      report["hbm_capacity_bytes"] = int(available)
    report.update(dict.fromkeys(NO_ESTIMATE), fits=False,
                  hbm_per_chip_bytes=int(needed) if needed else None,
                  compiler_message=refusal.splitlines()[0][:300])
  return program


def _compile(trainer, topo):
  """fit.compile_step quietly (XLA's own lines), a missing cuDNN in one line."""
  from transformer_jax.training import fit  # pylint: disable=g-import-not-at-top
  try:
    with topology.quiet_fd2():
      return fit.compile_step(trainer)
  except RuntimeError as e:  # jax checks for the library when it traces cuDNN attention
    if "cuDNN" not in str(e) or "RESOURCE_EXHAUSTED" in str(e):
      raise
    raise ConfigError(f"model.attention_impl={trainer.config.model.attention_impl} needs cuDNN to "
                      f"compile for {topo.generation} ({e}): pip install -e .[gpu]") from None


def gib(b) -> str:
  if b is None:
    return "?"
  return f"{b / hardware.GiB:.1f} GiB" if b >= hardware.GiB // 10 else f"{b / 2 ** 20:.1f} MiB"


def _count(n: int) -> str:
  """A parameter count: 0.12B, 1.14M."""
  return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


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
      f"{r['chips']} {'GPUs' if r['generation'] in hardware.GPUS else 'chips'}; mesh {mesh} "
      f"(dcn {r['mesh_dcn']})",
      f"model      {_count(r['params'])} params, batch {r['batch_size']} x {r['seq_len']}, "
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
  if r.get("kernels"):
    k = r["kernels"]
    lines.append(f"kernels    {sum(k['matmuls'].values())} matmuls (" + ", ".join(
        f"{sig} {n}" for sig, n in k["matmuls"].items()) + "); fusions " + ", ".join(
            f"{kind} {n}" for kind, n in k["fusions"].items()) + "; custom calls " + (", ".join(
                f"{t} {n}" for t, n in k["custom_calls"].items()) or "none"))
    wide = kernels.wide_matmuls(k, r["dtype"])
    if wide:
      lines.append("           fp32 operands in a bfloat16 model: " + ", ".join(
          f"{place} {n}" for place, n in wide.items()))
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
    raise ConfigError(f"--topology=NAME is required; valid: {topology.valid_topologies()}")
  topo = topology.parse_topology(flags["topology"])
  slices = flags["slices"]
  if slices < 1:
    raise ConfigError(f"--slices must be >= 1, got {slices}")
  if slices > 1 and topo.platform == "cuda":
    raise ConfigError(f"--slices is for TPU slices; several GPU hosts are one topology: "
                      f"--topology={topo.generation}-{hardware.GPUS_PER_HOST * slices}")
  if topo.platform == "cuda":
    topology.gpu_mem_fraction()  # a bad XLA_PYTHON_CLIENT_MEM_FRACTION stops here, before compiling
    with topology.quiet_fd2():  # importing jax loads the CUDA plugin: it logs that there is no GPU
      importlib.import_module("jax")
  if not spec:
    raise ConfigError("--config=FILE.py[:ARG] is required")
  config = config_lib.load(spec, overrides)
  dcn = config_lib.mesh_dcn_shape(config.mesh)
  if slices > 1 and math.prod(dcn.values()) == 1:
    config_lib.set_value(config, "mesh.dcn_data", str(slices))  # data parallel across slices
  elif math.prod(dcn.values()) != slices:
    raise ConfigError(f"mesh.dcn_* = {math.prod(dcn.values())} slices but "
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
    share = (f" (XLA_PYTHON_CLIENT_MEM_FRACTION={topology.gpu_mem_fraction()} of its memory)"
             if topo.platform == "cuda" else "")
    gib_ = hardware.GiB
    size = (f"needs {need / gib_:.1f} GiB per chip, {topo.generation} has {cap / gib_:.1f} GiB"
            f"{share}: {(need - cap) / gib_:.1f} GiB over" if need else
            f"does not fit ({report['compiler_message']})")
    tries = ([] if config.train.microbatches == 0 else
             ["--config.train.microbatches=0 (the fewest microbatches that fit)"])
    tries += [] if config.model.remat == "full" else ["--config.model.remat=full"]
    print(f"error: {size}; try {', '.join(tries + ['more mesh.fsdp', 'a smaller batch'])}",
          file=sys.stderr)
    sys.exit(1)
  return report


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only: never take a local TPU
  cli.entry(main, compile_cache=False)  # its figures include compile times
