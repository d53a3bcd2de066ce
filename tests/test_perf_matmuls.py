"""The benchmark's matmul floor (transformer_jax/perf/matmuls.py) and mesh.cpu_devices."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.parallel import distributed
from transformer_jax.parallel import sharding
from transformer_jax.perf import counting
from transformer_jax.perf import matmuls
from transformer_jax.training.step import Trainer


def _hlo(f, *shapes):
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
  return jax.jit(f).lower(*args).compile().as_text()


def test_dots_of_a_compiled_program_with_their_flops():
  def f(x, w, q, k):
    h = jnp.tanh(x @ w)  # [64, 48] @ [48, 32]
    h = jnp.tanh(h @ w.T[:, :32].T)  # a second, different dot: [64, 32] @ [32, 32]
    s = jnp.einsum("bqd,bkd->bqk", q, k)  # batched: [4, 16, 8] x [4, 24, 8]
    return h.sum() + s.sum()
  found = matmuls.dots(_hlo(jax.grad(f, argnums=(0, 1)), (64, 48), (48, 32), (4, 16, 8),
                            (4, 24, 8)))
  # forward 2 dots; backward 2 more per dot (the batched one feeds nothing differentiated)
  assert sum(found.values()) == 6
  expected = 3 * (2 * 64 * 48 * 32) + 3 * (2 * 64 * 32 * 32)
  assert sum(n * d.flops for d, n in found.items()) == expected
  for d in found:
    assert d.dtype == "f32" and len(d.lhs_contract) == len(d.rhs_contract) == 1
  plain = matmuls.dots(_hlo(f, (64, 48), (48, 32), (4, 16, 8), (4, 24, 8)))
  batched = [d for d in plain if d.lhs_batch]
  assert len(batched) == 1 and batched[0].flops == 2 * 4 * 16 * 24 * 8


def test_dots_read_physical_layouts_and_group_repeats():
  """An operand stored column-major ({0,1}) is timed as its row-major transpose, with the
  contracting dims moved along; identical dots are counted, not listed twice."""
  text = """
  %p0 = f32[32,64]{0,1} parameter(0)
  %p1 = f32[32,16]{1,0} parameter(1)
  %dot.1 = f32[64,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  %dot.2 = f32[64,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  """
  (dot, count), = matmuls.dots(text).items()
  assert count == 2
  assert dot.lhs == (64, 32) and dot.lhs_contract == (1,)  # physically [64, 32], contract 1
  assert dot.rhs == (32, 16) and dot.rhs_contract == (0,)
  assert dot.flops == 2 * 64 * 32 * 16
  (timed_dot, timed_count, seconds), = matmuls.time_dots({dot: count}, reps=2)
  assert timed_dot == dot and timed_count == 2 and seconds > 0


def test_programs_with_loops_are_refused():
  def f(x, w):
    return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ w), x)
  with pytest.raises(ValueError, match="while loop"):
    matmuls.dots(_hlo(f, (8, 8), (8, 8)))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_cpu_devices_must_be_a_non_negative_int(bad):
  with pytest.raises(ConfigError, match="mesh.cpu_devices"):
    distributed.use_cpu_devices(bad)


def test_a_config_cannot_split_the_host_otherwise_than_local_sh_did():
  """launch/local.sh --devices-per-process 2 set the job's count: a config file's (or a flag's)
  mesh.cpu_devices=4 would have won unsaid (each process with 4 devices)."""
  launched = {"TJAX_CPU_DEVICES_PER_PROCESS": "2"}
  with pytest.raises(ConfigError, match=r"^mesh.cpu_devices=4 and launch/local.sh's "
                                        r"--devices-per-process 2 disagree"):
    distributed.use_cpu_devices(4, environ=launched)
  distributed.use_cpu_devices(0, environ=launched)  # (0: the launcher's count stands)


def test_cpu_devices_split_the_host():
  code = ("from transformer_jax.parallel import distributed; import jax; "
          "distributed.use_cpu_devices(3); print(jax.device_count(), jax.default_backend())")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert out.stdout.split() == ["3", "cpu"], out.stderr[-2000:]


def test_benchmark_matmul_floor_counts_the_steps_matmuls():
  """The floor's FLOPs lie between the parameter matmuls' 6N per token and the model's FLOPs
  per token (attention's blocks skip masked key blocks, so fewer). Compiled with XLA's default
  fusion code generator, as users run it (the suite's older one writes some fusions as while
  loops); LLVM at TEST_XLA_FLAGS' opt level 0 (the same optimized HLO, so the same dots: its
  compile takes 5 s less CPU)."""
  cmd = [sys.executable, "-m", "transformer_jax.benchmark", "--config=configs/gpt2.py:tiny",
         "--steps=1", "--rounds=1", "--matmul_floor"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"})
  assert out.returncode == 0, out.stderr[-3000:]
  r = json.loads(out.stdout.strip().splitlines()[-1])
  tokens = 8 * 64  # configs/gpt2.py:tiny
  n = 2 * (4 * 64 * 64 + 2 * 64 * 256) + 64 * 8192  # 2 layers: q, k, v, o, MLP; the tied table
  assert 6 * n * tokens <= r["matmul_gflops"] * 1e9 <= r["flops_per_token"] * tokens
  assert 0 < r["matmul_floor_s"] and r["other_s"] == pytest.approx(
      r["step_time_s"] - r["matmul_floor_s"], abs=1e-3)
  bad = subprocess.run(cmd + ["--config.mesh.cpu_devices=2"], capture_output=True, text=True,
                       timeout=120)
  assert bad.returncode == 2 and "--matmul_floor" in bad.stderr


def test_the_matmul_floor_is_refused_off_cpu(monkeypatch):
  """On a GPU XLA writes most GEMMs as cuBLAS custom-calls, which the floor (dot instructions)
  does not read: its matmul_floor_s would leave them out. Refused, before any compile."""
  from transformer_jax import benchmark  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ConfigError, match=r"^--matmul_floor reads XLA:CPU's dot instructions, not "
                     r"a gpu's matmul kernels: use --profile there$"):
    benchmark.main(["--config=configs/gpt2.py:tiny", "--matmul_floor"])


@pytest.mark.parametrize("recipe, extra", [
    ("t5", []), ("t5", ["model.vocab_size=256"]), ("transformer", []), ("gpt2", []),
    ("gpt2", ["model.position=rotary", "model.attention_window=16", "data.seq_len=512",
              "model.d_model=64", "model.num_heads=1"]),
])
def test_model_flops_are_the_compiled_steps_matmuls(recipe, extra):
  """MFU's model FLOPs per token against the dots the compiled train step runs: within a few
  percent for a decoder and for encoder-decoders whose decoder is shorter (T5: 29 target tokens
  for 128 inputs) or as long, and for sliding-window layers (their band's keys). Counting the
  decoder at the encoder's length and leaving out its attention overstated T5's 2.4 times; a
  window's layers were counted at every key; the cross-attention's key and value projections
  were counted at the T decoder tokens, not the S encoder outputs they read (5 % low with a
  small vocabulary)."""
  c = config_lib.load(f"configs/{recipe}.py:tiny", ["mesh.data=1", "train.batch_size=2",
                                                     *extra])
  trainer = Trainer(c, sharding.make_mesh(c, jax.devices()[:1]))
  # (XLA:CPU's default code generator, as users run: the suite's older one makes while loops)
  compiled = trainer.lower_train_step().compile({"xla_cpu_use_fusion_emitters": True})
  dots = matmuls.dots(compiled.as_text())
  per_token = sum(n * d.flops for d, n in dots.items()) / (2 * c.data.seq_len)
  counted = counting.for_config(c, trainer.model.cfg, trainer.abstract_state.params)
  assert 0.97 < per_token / counted < 1.03, (per_token, counted)


@pytest.mark.parametrize("recipe, lookups", [
    ("bert", (("embed", "types"), ("embed", "positions"))), ("t5", (("relative_bias",),))])
def test_n_leaves_out_the_lookup_tables(recipe, lookups):
  """N counts matmul parameters: BERT's token-type table and T5's relative-position bias
  table are read by lookup (they were counted, as the position table is not)."""
  from transformer_jax.models import families  # pylint: disable=g-import-not-at-top
  c = config_lib.load(f"configs/{recipe}.py:tiny")
  model = families.build_model(c)
  params = families.abstract_params(model)
  sizes = {tuple(k.key for k in path): math.prod(leaf.shape)
           for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  looked_up = sum(n for path, n in sizes.items()
                  if any(path[-len(names):] == names for names in lookups))
  untied = 0 if model.cfg.tie_embeddings else sizes[("embed", "tokens")]
  assert looked_up > 0
  assert counting.matmul_params(params, model.cfg) == sum(sizes.values()) - looked_up - untied
