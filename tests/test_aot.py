"""Multi-slice meshes and the ahead-of-time TPU check (transformer_jax.aot).

The AOT runs compile configs/gpt2.py:tiny for small TPU slices and GPU hosts on this CPU. They
need libtpu (`pip install -e .[tpu]`, also in the `test` extra on Linux x86-64) and JAX's CUDA
plugin (launch/test.sh installs it in .venv/cuda_aot, $TJAX_CUDA_AOT), and are skipped without.
"""

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import jax
import pytest

from tests.conftest import REPO
from transformer_jax import aot
from transformer_jax import config as config_lib
from transformer_jax.perf import collectives, hardware, roofline, topology
from transformer_jax.config import ConfigError
from transformer_jax.parallel import sharding

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e .[tpu])")
CUDA_AOT = os.environ.get("TJAX_CUDA_AOT", os.path.join(REPO, ".venv", "cuda_aot"))
needs_cuda_plugin = pytest.mark.skipif(
    not os.path.isdir(os.path.join(CUDA_AOT, "jax_plugins", "xla_cuda12")),
    reason="JAX's CUDA plugin not in $TJAX_CUDA_AOT (launch/test.sh installs it)")


@pytest.mark.parametrize("name, generation, chips, compiler_topology", [
    ("v5p-8", "v5p", 4, "v5p:2x2x1"),
    ("v5p-16", "v5p", 8, "v5p:2x2x2"),
    ("v5p-256", "v5p", 128, "v5p:4x4x8"),
    ("v5p-1024", "v5p", 512, "v5p:8x8x8"),
    ("v4-8", "v4", 4, "v4:2x2x1"),
    ("v4-128", "v4", 64, "v4:4x4x4"),
    ("v5e-1", "v5e", 1, "v5e:1x1"),
    ("v5e-8", "v5e", 8, "v5e:2x4"),
    ("V5litepod-16", "v5e", 16, "v5e:4x4"),
    ("v5e-256", "v5e", 256, "v5e:16x16"),
    ("v6e-32", "v6e", 32, "v6e:4x8"),
    ("v5p:4x4x12", "v5p", 192, "v5p:4x4x12"),
    ("h100-1", "h100", 1, "1x1x1"),
    ("H100-8", "h100", 8, "1x1x8"),
    ("h100-64", "h100", 64, "1x8x8"),
    ("h200-4", "h200", 4, "1x1x4"),
    ("h100:2x4", "h100", 8, "1x2x4"),
])
def test_parse_topology(name, generation, chips, compiler_topology):
  topo = topology.parse_topology(name)
  assert (topo.generation, topo.chips, topo.compiler_topology) == (generation, chips,
                                                                   compiler_topology)
  if ":" not in name:  # the canonical name parses back
    assert topology.parse_topology(topo.name) == topo


@pytest.mark.parametrize("name", ["v5p-6", "v5p-4", "v5p-12", "v5e-2", "v5e-512", "v7-8",
                                  "tpu", "v5p", "v5e:2x2x2", "v5p:2x2", "v4-0", "h100-0", "h100-3",
                                  "h100-12", "h100:1x16", "h100:2x2x2", "a100-8"])
def test_bad_topology_names(name):
  with pytest.raises(ConfigError, match="valid: v4-8"):
    topology.parse_topology(name)


@pytest.mark.parametrize("name,message", [
    ("v5e:1x2", "first two sizes must be even"), ("v4:3x2x1", "first two sizes must be even"),
    ("v5e:32x32", "a v5e slice has at most 256 chips")])  # (libtpu: a traceback, an abort)
def test_explicit_shapes_libtpu_cannot_make_are_one_line(name, message):
  with pytest.raises(ConfigError, match=f"--topology='{name}': .*{message}"):
    topology.parse_topology(name)


@needs_libtpu
def test_a_shape_libtpu_refuses_is_one_line(monkeypatch):
  """Whatever else libtpu refuses is its first line, not its traceback (exit 1: "no fit")."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  def refuse(**kwargs):
    raise jax.errors.JaxRuntimeError(f"INVALID_ARGUMENT: {kwargs['topology_name']} no\nmore")
  monkeypatch.setattr(topologies, "get_topology_desc", refuse)
  with pytest.raises(ConfigError, match=r"--topology=v5p:2x2x5: libtpu refuses it: "
                                        r"INVALID_ARGUMENT: v5p:2x2x5 no$"):
    topology.topology_devices(topology.parse_topology("v5p:2x2x5"), 1)


@needs_libtpu
@pytest.mark.parametrize("name", ["v5e-1", "v6e-1"])
def test_a_one_chip_slice_has_its_device(name):
  """libtpu's default host of 2x2 chips cannot hold a 1x1 slice (a raw JaxRuntimeError)."""
  devices = topology.topology_devices(topology.parse_topology(name), 1)
  assert len(devices) == 1 and tuple(devices[0].coords) == (0, 0, 0)


def tiny(*overrides):
  return config_lib.load(f"{REPO}/configs/gpt2.py:tiny", list(overrides))


def test_hybrid_mesh_on_simulated_slices():
  """2 slices of 4 CPU devices (consecutive blocks: no slice_index on CPU): ICI data 2 x fsdp 2
  per slice, dcn_data 2 -> data 4 x fsdp 2; each half of the data axis is one slice."""
  config = tiny("mesh.dcn_data=2", "mesh.data=2", "mesh.fsdp=2")
  assert config_lib.mesh_shape(config.mesh, 8) == {"data": 4, "fsdp": 2, "expert": 1,
                                                   "sequence": 1, "tensor": 1}
  mesh = sharding.make_mesh(config, jax.devices()[:8])
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 1}
  ids = [[d.id for d in row] for row in mesh.devices[:, :, 0, 0, 0]]
  assert {i for row in ids[:2] for i in row} == {0, 1, 2, 3}
  assert {i for row in ids[2:] for i in row} == {4, 5, 6, 7}
  # fsdp across slices instead: each fsdp row spans both slices, data stays within one.
  mesh = sharding.make_mesh(tiny("mesh.dcn_fsdp=2", "mesh.data=-1", "mesh.fsdp=2"),
                            jax.devices()[:8])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "sequence": 1, "tensor": 1}
  for row in mesh.devices[:, :, 0, 0, 0]:
    assert [d.id < 4 for d in row] == [True, True, False, False]


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  slice_index: int
  process_index: int = 0
  platform: str = "cpu"
  device_kind: str = "fake"


def test_hybrid_grid_groups_by_slice_index():
  """With slice_index (TPU multi-slice) create_hybrid_device_mesh groups by it, whatever the
  device order."""
  devices = [FakeDevice(i, slice_index=i % 2) for i in range(8)]
  axes = {"expert": 1, "sequence": 1, "tensor": 1}
  grid = sharding.hybrid_device_grid({"data": 2, "fsdp": 2, **axes},
                                     {"data": 2, "fsdp": 1, **axes}, devices)
  assert grid.shape == (4, 2, 1, 1, 1)
  assert {d.slice_index for d in grid[:2].flat} == {0}
  assert {d.slice_index for d in grid[2:].flat} == {1}
  with pytest.raises(ConfigError, match="4 slices but the devices have 2 distinct slice_index"):
    sharding.hybrid_device_grid({"data": 2, "fsdp": 1, **axes}, {"data": 4, "fsdp": 1, **axes},
                                devices)


@pytest.mark.parametrize("overrides, message", [
    (["mesh.dcn_data=0"], "mesh.dcn_data must be a positive int, got 0"),
    (["mesh.dcn_fsdp=3"], "3 slices ({'data': 1, 'fsdp': 3, 'expert': 1, 'sequence': 1, "
                          "'tensor': 1}) do not divide the device count 8"),
    (["mesh.dcn_data=2", "mesh.data=8"], "does not equal the devices per slice 4 (2 slices)"),
    (["mesh.dcn_data=2", "mesh.data=-1", "mesh.fsdp=3"], "cannot fill the devices per slice 4"),
])
def test_dcn_validation(overrides, message):
  with pytest.raises(ConfigError) as e:
    config_lib.validate(tiny(*overrides), 8)
  assert message in str(e.value)
  assert "\n" not in str(e.value)


@pytest.fixture
def no_cache_writes():
  """jax's persistent compilation cache (tests/conftest.py) off for writes: it writes each
  compile-only XLA:TPU executable (~6 % of the compile's CPU) and never loads one back (the same
  program compiled again misses)."""
  before = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
  try:
    yield
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


# Where no figure depends on the vocabulary (the tiny recipes' is 8192): a TPU compile in about
# half the CPU.
SMALL_VOCAB = ("--config.model.vocab_size=256",)


def aot_args(*args):
  """aot's flags for gpt2 tiny (one layer), or for the --config among `args`."""
  recipe = [] if any(a.startswith("--config=") for a in args) else [
      f"--config={REPO}/configs/gpt2.py:tiny"]
  return [*recipe, "--config.model.num_layers=1", *args]


def run_aot(*args):
  """`python -m transformer_jax.aot` with aot_args(*args)."""
  cmd = [sys.executable, "-m", "transformer_jax.aot", *aot_args(*args)]
  return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


def aot_here(capsys, *args):
  """run_aot's check by aot.main in this process (no interpreter to start and modules to import:
  ~4 s of CPU a run; the CLI's own start, exit codes and stderr are run_aot's tests'): its exit
  code and output, as run_aot's."""
  try:
    aot.main(aot_args(*args))
    code = 0
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


@needs_libtpu
@pytest.mark.usefixtures("no_cache_writes")
def test_a_scanned_stack_of_mixed_windows_is_priced_as_it_runs():
  """Scanned, layers whose windows differ get them as traced values: every layer attends to all
  keys under a mask, as an all-global stack does. Its probes had static windows (skipping key
  blocks): 31 % of its FLOPs left out. (aot.check in this process: the CLI's own path is the
  other tests'. A vocabulary of 256 and 128 tokens, not 8192 and 256: each TPU compile takes
  half the time, and static-window probes still price it 4.5 % low.)"""
  common = ["model.num_layers=2", "model.position=rotary", "model.attention_window=16",
            "data.seq_len=128", "model.max_len=128", "model.vocab_size=256",
            "train.batch_size=4", "mesh.data=4", "model.attention_impl=xla"]
  topo = topology.parse_topology("v5e-4")
  flops = []
  for extra in (["model.window_pattern=LG", "model.scan_layers=True"],
                ["model.window_pattern=G", "model.scan_layers=False"]):
    config = tiny(*common, *extra)
    config_lib.validate(config, topo.chips)
    report = aot.check(config, topo, 1)
    assert report["fits"] is True
    flops.append(report["flops_per_step_per_chip"])
  mixed, dense = flops
  # (equal here; an all-local stack prices 9.0 % less: probes with static windows left out
  # about half of that, 4.5 %)
  assert mixed == pytest.approx(dense, rel=0.005)


@needs_libtpu
@pytest.mark.usefixtures("no_cache_writes")
def test_aot_chooses_the_microbatches_against_the_chips_hbm(monkeypatch, capsys):
  """train.microbatches=0: aot compiles, reports and prices the count training/fit.py chooses
  against the chip's HBM. (The whole batch's step is refused here as XLA:TPU refuses a program
  past its HBM, without compiling it: tests/test_fit.py checks the choice on real programs.)"""
  from transformer_jax.training import fit  # pylint: disable=g-import-not-at-top
  compile_step = fit.compile_step

  compiled = {}

  def whole_batch_refused(trainer):
    if trainer.microbatches == 1:
      return fit.Compiled(None, 10**12, None, "RESOURCE_EXHAUSTED: the test's refusal")
    compiled[trainer.microbatches] = compile_step(trainer)
    return compiled[trainer.microbatches]
  monkeypatch.setattr(fit, "compile_step", whole_batch_refused)
  config = tiny("model.num_layers=1", "train.batch_size=16", "mesh.data=4",
                "model.attention_impl=xla", "train.microbatches=0",
                "model.vocab_size=256")  # (a TPU compile in half the time of 8192's)
  report = aot.check(config, topology.parse_topology("v5e-4"), 1, estimate=False)
  assert report["microbatches"] == 4 and report["fits"] is True, report  # 16 rows / 4 shards
  assert 0 < report["hbm_per_chip_bytes"] < report["hbm_capacity_bytes"]
  assert "train.microbatches=0: 4 microbatches of 4 rows (the step needs" in capsys.readouterr().err
  assert report["step_time_estimate_s"] > 0 and report["mfu_estimate"] > 0  # priced at 4
  assert config.train.microbatches == 0  # (the caller's config is left as it was)
  # No count fits: reported as any config that does not fit, at the largest count, from the
  # compile the search ended at (not compiled again)
  tried = []

  def every_count_refused(trainer):
    tried.append(trainer.microbatches)
    return fit.Compiled(None, 2**40 // trainer.microbatches, None, "RESOURCE_EXHAUSTED: test")
  monkeypatch.setattr(fit, "compile_step", every_count_refused)
  report = aot.check(config, topology.parse_topology("v5e-4"), 1, estimate=False)
  assert (report["fits"], report["microbatches"], report["hbm_per_chip_bytes"]) == (
      False, 4, 2**38) and tried[-1] == 4 and tried.count(4) == 1, (report, tried)
  assert "at no microbatch count: 4 microbatches of 4 rows need 256.00 GiB" in (
      capsys.readouterr().err)
  # ... and where the largest count compiles but takes more than fit leaves it (a GPU's
  # compile, which no memory refuses): not fitting either, as training would refuse it
  capacity = report["hbm_capacity_bytes"]
  monkeypatch.setattr(fit, "compile_step", lambda t: fit.Compiled(
      compiled[4].program, capacity - fit.room_for_step(capacity) // 100))
  report = aot.check(config, topology.parse_topology("v5e-4"), 1, estimate=False)
  assert (report["fits"], report["microbatches"]) == (False, 4), report


def test_bad_topology_is_one_line_before_compiling():
  out = run_aot("--topology=v5p-6")
  assert out.returncode == 2
  assert out.stderr.startswith("error: --topology='v5p-6' is not a TPU slice or GPU host")
  assert len(out.stderr.strip().splitlines()) == 1 and not out.stdout


@needs_libtpu
@pytest.mark.usefixtures("no_cache_writes")
def test_aot_fits_on_v5e_8(capsys):
  out = aot_here(capsys, "--topology=v5e-8")
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["fits"] is True and report["topology"] == "v5e-8" and report["chips"] == 8
  assert report["mesh"] == {"data": 8, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 1}
  assert 0 < report["hbm_per_chip_bytes"] < report["hbm_capacity_bytes"]
  assert report["hbm_capacity_bytes"] == int(15.75 * hardware.GiB)
  # The per-chip program does about the model's FLOPs / 8 (6N + attention; no remat here).
  assert 0.9 < report["hardware_flops_ratio"] < 1.2
  assert report["flops_per_step"] == pytest.approx(8 * report["flops_per_step_per_chip"])
  assert report["step_time_estimate_s"] > 0 and 0 < report["mfu_estimate"] < 1
  # Data parallel over all 8 chips (2x4: one link along x, a ring both ways along y): each chip
  # sends at least 2 * 7/8 of the fp32 gradients for their all-reduce, at most twice that (the
  # tied table's lookup and output gradients are reduced apart).
  grads = 4 * report["params"]
  assert 2 * 7 / 8 * grads <= report["ici_bytes_per_chip"] <= 2 * 2 * 7 / 8 * grads
  assert report["communication_time_s"] == pytest.approx(
      report["ici_bytes_per_chip"] / (3 * hardware.CHIPS["v5e"].ici_link_gbps * 1e9))
  assert report["dcn_bytes_per_chip"] == 0 and report["dcn_time_s"] == 0


@needs_libtpu
@pytest.mark.usefixtures("no_cache_writes")
def test_aot_prices_what_crosses_slices_over_the_dcn(capsys):
  out = aot_here(capsys, "--topology=v5p-8", "--slices=2", "--config.mesh.fsdp=4",
                 "--config.mesh.data=1", *SMALL_VOCAB)
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["mesh"] == {"data": 2, "fsdp": 4, "expert": 1, "sequence": 1, "tensor": 1}
  # Each slice holds the whole model, sharded 4 ways: the gradients are summed across the two
  # slices, at least this chip's quarter of them (2 * 1/2 of it for two slices).
  grads = 4 * report["params"]
  assert report["dcn_bytes_per_chip"] >= grads / 4
  assert report["dcn_time_s"] == pytest.approx(
      report["dcn_bytes_per_chip"] / (hardware.CHIPS["v5p"].dcn_gbps * 1e9))
  assert report["ici_bytes_per_chip"] > 0
  assert report["communication_time_s"] == pytest.approx(report["ici_time_s"] +
                                                         report["dcn_time_s"])
  (roofline,) = [line for line in out.stdout.splitlines() if line.startswith("roofline")]
  assert "ICI" in roofline and "DCN" in roofline
  assert set(report["communication_by_kind_s"]) <= set(collectives.KINDS)
  assert sum(report["communication_by_kind_s"].values()) == pytest.approx(
      report["communication_time_s"])


@needs_libtpu
def test_aot_does_not_fit_exits_1_with_json_first():
  out = run_aot("--topology=v5e-8", "--config.train.batch_size=1048576", *SMALL_VOCAB)
  assert out.returncode == 1, out.stderr[-2000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["fits"] is False
  assert report["hbm_per_chip_bytes"] > report["hbm_capacity_bytes"]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: needs "), out.stderr
  assert "GiB per chip, v5e has 15.8 GiB" in lines[0] and "GiB over" in lines[0]


@needs_libtpu
@pytest.mark.usefixtures("no_cache_writes")
def test_aot_two_slices_data_parallel_over_dcn(capsys):
  out = aot_here(capsys, "--topology=v5p-8", "--slices=2", "--config.mesh.fsdp=2",
                 "--config.mesh.data=2", "--config.model.scan_layers=True", "--estimate=false",
                 *SMALL_VOCAB)
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["chips"] == 8 and report["slices"] == 2
  assert report["mesh"] == {"data": 4, "fsdp": 2, "expert": 1, "sequence": 1, "tensor": 1}
  assert report["mesh_dcn"] == {"data": 2, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 1}
  assert report["fits"] is True and report["hbm_per_chip_bytes"] > 0
  assert report["scan_layers"] is True and report["flops_per_step"] is None  # --estimate=false


@pytest.mark.parametrize("spec, billions", [("llama.py:7b", 6.74), ("llama.py:13b", 13.02),
                                            ("llama.py:70b", 68.98), ("gpt3.py:6.7b", 6.66),
                                            ("gpt3.py:175b", 174.6)])
def test_big_config_parameter_counts(spec, billions):
  """The published sizes, from abstract shapes only (nothing is allocated)."""
  from transformer_jax.models import families  # pylint: disable=g-import-not-at-top
  config = config_lib.load(f"{REPO}/configs/{spec}")
  model = families.build_model(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 8), "int32")))
  total = sum(x.size for x in jax.tree.leaves(shapes))
  assert total / 1e9 == pytest.approx(billions, rel=2e-3)


def test_missing_libtpu_is_one_line(monkeypatch):
  monkeypatch.setattr(topology.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ConfigError, match=r"libtpu is not installed.*pip install -e \.\[tpu\]"):
    topology.topology_devices(topology.parse_topology("v5e-8"), 1)


@needs_libtpu
@pytest.mark.parametrize("order", ["cpu_first", "tpu_first"])
def test_one_process_traces_cpu_and_tpu_forms(order):
  """The projections are flat 2-D dots when compiling for CPU and einsums for TPU (ops.dense).
  The platform comes from the trace's mesh, so one process that lowers the same step for both,
  in either order, gets each its own form: no trace made for one is reused for the other."""
  from transformer_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top
  config = tiny()

  def rank3_dots(devices):
    text = Trainer(config, sharding.make_mesh(config, devices)).lower_train_step().as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert dots
    return sum(bool(re.search(r"\(tensor<\d+x\d+x\d+xf32>, tensor<\d+x\d+xf32>\)", d))
               for d in dots)

  cpu = lambda: rank3_dots(jax.devices("cpu")[:1])
  tpu = lambda: rank3_dots(topology.topology_devices(topology.parse_topology("v5e-8"), 1))
  if order == "cpu_first":
    got_cpu, got_tpu = cpu(), tpu()
  else:
    got_tpu, got_cpu = tpu(), cpu()
  assert got_cpu == 0 and got_tpu > 0, (got_cpu, got_tpu)


@pytest.mark.parametrize("args, env, message", [
    (["--topology=h100-8", "--slices=2"], {}, "--slices is for TPU slices; several GPU hosts are "
                                                "one topology: --topology=h100-16"),
    (["--topology=h100-8"], {"XLA_PYTHON_CLIENT_MEM_FRACTION": "1.5"},
     "XLA_PYTHON_CLIENT_MEM_FRACTION='1.5': expected a number in (0, 1]"),
])
def test_gpu_flag_errors_are_one_line(args, env, message):
  out = subprocess.run([sys.executable, "-m", "transformer_jax.aot",
                        f"--config={REPO}/configs/gpt2.py:tiny", *args], capture_output=True,
                       text=True, cwd=REPO, timeout=300, env={**os.environ, **env})
  assert out.returncode == 2 and out.stderr == f"error: {message}\n" and not out.stdout


@needs_cuda_plugin
def test_aot_for_an_h100_host_checks_the_fit_against_the_allocators_share():
  """8 H100s, no GPU here: the step compiles data-parallel over them; the fit is checked against
  XLA_PYTHON_CLIENT_MEM_FRACTION of the memory; a GPU compile has no cost analysis. The CUDA
  plugin's complaint that this machine has no driver stays out of stderr."""
  env = {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5",
         "PYTHONPATH": os.pathsep.join(filter(None, [CUDA_AOT, os.environ.get("PYTHONPATH")]))}
  cmd = [sys.executable, "-m", "transformer_jax.aot", f"--config={REPO}/configs/gpt2.py:tiny",
         "--config.model.num_layers=1", "--config.model.dtype=bfloat16", "--topology=h100-8"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  # What the GPU program runs: its matmuls are Triton GEMM fusions (no device to autotune
  # against cuBLAS), most of them in bf16; the summary names any with fp32 operands.
  k = report["kernels"]
  assert sum(k["matmuls"].values()) == sum(k["matmuls_by_place"].values()) > 0
  assert k["matmuls"].get("bf16xbf16->bf16", 0) + k["matmuls"].get("bf16xbf16->f32", 0) > 0
  assert k["fusions"].get("__triton_nested_gemm_fusion", 0) + k["fusions"].get(
      "__triton_gemm", 0) > 0
  assert "\nkernels    " in out.stdout
  assert report["chips"] == 8 and report["compiler_topology"] == "1x1x8"
  assert report["mesh"] == {"data": 8, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 1}
  assert report["hbm_capacity_bytes"] == int(0.5 * 81559 * 2 ** 20)
  assert 0 < report["hbm_per_chip_bytes"] < report["hbm_capacity_bytes"] and report["fits"]
  assert report["mfu_estimate"] is None and report["cost_source"].startswith("none")
  big = subprocess.run(cmd + ["--config.train.batch_size=1048576"], capture_output=True,
                       text=True, cwd=REPO, timeout=300, env=env)
  assert big.returncode == 1, big.stderr[-2000:]
  assert json.loads(big.stdout.strip().splitlines()[-1])["fits"] is False
  assert re.fullmatch(r"error: needs [\d.]+ GiB per chip, h100 has 39\.8 GiB "
                      r"\(XLA_PYTHON_CLIENT_MEM_FRACTION=0\.5 of its memory\): [\d.]+ GiB over; "
                      r"try .*\n", big.stderr), big.stderr


@needs_cuda_plugin
def test_cudnn_runs_its_own_sliding_window_on_the_window_layers():
  """For an H100, with no GPU here: a causal windowed layer's cuDNN attention (forward and
  backward) carries the window itself (sliding_window_length), a global layer's has none."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [CUDA_AOT,
                                                                    os.environ.get("PYTHONPATH")]))}
  cmd = [sys.executable, "-m", "transformer_jax.aot", f"--config={REPO}/configs/llama.py:tiny",
         "--config.model.num_layers=2", "--config.model.dtype=bfloat16", "--topology=h100-1",
         "--config.model.attention_impl=cudnn", "--config.model.attention_window=16",
         "--config.model.window_pattern=LG", "--config.model.scan_layers=false"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-2000:]
  calls = json.loads(out.stdout.strip().splitlines()[-1])["kernels"]["custom_calls"]
  fmha = {k: n for k, n in calls.items() if k.startswith("__cudnn$fmha")}
  assert fmha == {"__cudnn$fmhaScaleBiasSoftmax window=16": 1,
                  "__cudnn$fmhaScaleBiasSoftmaxBackward window=16": 1,
                  "__cudnn$fmhaScaleBiasSoftmax": 1, "__cudnn$fmhaScaleBiasSoftmaxBackward": 1}


def test_missing_cuda_plugin_or_cudnn_is_one_line(monkeypatch):
  """Without JAX's CUDA plugin, or when cuDNN attention cannot be traced for want of cuDNN (the
  lowering stubbed to raise what jax raises then), the check says what to install in one line."""
  from transformer_jax.training import step  # pylint: disable=g-import-not-at-top
  config = tiny("model.num_layers=1", "mesh.data=1", "model.dtype=bfloat16",
                "model.attention_impl=cudnn")
  monkeypatch.setattr(topology.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ConfigError, match=r"^JAX's CUDA plugin is not installed; GPU AOT checks "
                                        r"need it: pip install -e \.\[gpu\]"):
    aot.check(config, topology.parse_topology("h100-1"), 1)
  monkeypatch.setattr(topology, "topology_devices", lambda topo, slices: jax.devices("cpu")[:1])

  def no_cudnn(self):
    raise RuntimeError("cuDNN not found.")
  monkeypatch.setattr(step.Trainer, "lower_train_step", no_cudnn)
  with pytest.raises(ConfigError, match=r"^model.attention_impl=cudnn needs cuDNN to compile for "
                                        r"h100 \(cuDNN not found.\): pip install -e \.\[gpu\]$"):
    aot.check(config, topology.parse_topology("h100-1"), 1)


def test_collectives_are_priced_only_where_the_links_are_published():
  """v4 publishes no per-chip ICI figure: its collectives are not priced (and nothing divides by
  a zero bandwidth); v5p's are."""
  from tests.test_perf_collectives import HLO, torus  # pylint: disable=import-outside-toplevel
  compiled = types.SimpleNamespace(cost_analysis=lambda: {"flops": 1.0, "bytes accessed": 2.0},
                                   as_text=lambda: HLO)
  v4 = roofline.program_cost(compiled, torus(2, 2), hardware.CHIPS["v4"])
  assert v4["ici_s"] == v4["ici_bytes"] == v4["dcn_s"] == 0 and v4["flops"] == 1.0
  v5p = roofline.program_cost(compiled, torus(2, 2), hardware.CHIPS["v5p"])
  assert v5p["ici_bytes"] > 0 and v5p["ici_s"] == pytest.approx(
      sum(v5p[k] for k in roofline.COLLECTIVES))


@needs_libtpu
@pytest.mark.usefixtures("no_cache_writes")
def test_aot_prices_an_moe_layers_all_to_all(capsys):
  """configs/mixtral.py:tiny's one MoE layer with capacity, its 4 experts one per chip of a v5p-8
  (2x2x1): the dispatch and combine all-to-alls, forward and backward, are priced over the ICI."""
  out = aot_here(capsys, f"--config={REPO}/configs/mixtral.py:tiny",
                 "--config.model.num_layers=1", "--config.model.expert_capacity_factor=1.25",
                 "--config.mesh.expert=4", "--config.mesh.data=1", "--topology=v5p-8",
                 *SMALL_VOCAB)
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["mesh"]["expert"] == 4 and report["fits"] is True
  # Each all-to-all's operand is [4 experts, 2 rows, 40 slots, 64] (bf16 or fp32): a quarter
  # stays, a quarter goes 2 hops (mean 4/3 over the three others), over the two links spanned.
  a2a = report["communication_by_kind_s"]["all-to-all"]
  link = hardware.CHIPS["v5p"].ici_link_gbps * 1e9
  assert 4 * 4 * 2 * 40 * 64 * 2 / (2 * link) <= a2a * (1 + 1e-6)
  assert a2a <= 4 * 4 * 2 * 40 * 64 * 4 / (2 * link) * (1 + 1e-6)
  assert "all-to-all" in out.stdout.splitlines()[-2]  # the summary's `collectives:` line


@needs_libtpu
def test_a_mesh_axis_the_torus_cannot_hold_is_one_line():
  """A v5p-128 is 4x4x4: 8 chips are no product of its whole dimensions (jax.make_mesh splits no
  torus dimension), so data 8 x fsdp 8 is refused in one line, before anything compiles."""
  out = run_aot("--topology=v5p-128", "--config.mesh.data=8", "--config.mesh.fsdp=8",
                "--config.train.batch_size=64")
  assert out.returncode == 2 and not out.stdout
  assert re.fullmatch(r"error: mesh\.(data|fsdp)=8 is no product of whole torus dimensions of "
                      r"v5p:4x4x4 \(jax\.make_mesh splits none; --config\.mesh\."
                      r"allow_split_physical_axes=true splits them\)\n", out.stderr), out.stderr


@needs_libtpu
def test_split_physical_axes_makes_such_a_mesh():
  """mesh.allow_split_physical_axes: data 8 x fsdp 8 (or fsdp 8 x expert 8) on a 4x4x4 torus,
  every chip once."""
  devices = topology.topology_devices(topology.parse_topology("v5p-128"), 1)
  for sizes in ({"data": 8, "fsdp": 8}, {"fsdp": 8, "expert": 8}):
    config = tiny()
    config.mesh.update({"data": 1, "allow_split_physical_axes": True, **sizes})
    mesh = sharding.make_mesh(config, devices)
    assert dict(mesh.shape) == {a: sizes.get(a, 1) for a in sharding.MESH_AXES}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_the_loss_chunk_scan_is_priced_once_per_trip():
  """train.loss_chunk runs the output head in a scan whose body XLA's cost analysis counts once:
  with 4 chunks the estimate priced a quarter of the head (hardware FLOPs 0.42 of the model's).
  Priced per trip, the chunked step costs the unchunked one plus the head's rematerialized
  forward matmul (2 d V a token): one layer unscanned, and two scanned (priced from unrolled
  probes of 1 and 2 layers, whose 1-layer programs are the unscanned case's, compiled once)."""
  from transformer_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top
  devices, programs = jax.devices()[:1], {}

  def compile_probe(probe):  # (one compile per distinct config)
    key = probe.to_json()
    if key not in programs:
      programs[key] = Trainer(probe, sharding.make_mesh(probe, devices)).lower_train_step(
          ).compile()
    return programs[key]
  for extra in ([], ["model.scan_layers=true"]):
    costs = {}
    for chunk in (0, 64):
      cfg = config_lib.load(f"{REPO}/configs/smoke.py", [
          "model.d_model=64", "model.num_heads=2", "model.vocab_size=4096",
          f"model.num_layers={2 if extra else 1}",  # (scanned: its probes unroll 1 and 2 anyway)
          "train.batch_size=4", "data.seq_len=64", "model.dtype=float32", "mesh.data=1",
          f"train.loss_chunk={chunk}", *extra])
      costs[chunk], _ = roofline.step_cost(cfg, devices, compile_probe(cfg),
                                           hardware.CHIPS["v4"], compile_probe)
    tokens = 4 * 64
    assert costs[64]["flops"] == pytest.approx(costs[0]["flops"] + 2 * tokens * 64 * 4096,
                                                rel=0.02), extra
