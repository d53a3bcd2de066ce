"""Scan over layers and remat policies: the same function as the plain unrolled model.

Scanned parameters are the unrolled ones through stack_layers, so every comparison below is of the
same weights: losses, gradients, KV-cache decoding, the sharded train step, parameter counts.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.models import stack
from transformer_jax.models.decoder import DecoderLM
from transformer_jax.parallel import sharding
from transformer_jax.sweep import plan
from transformer_jax.perf import hardware
from transformer_jax.training import optimizer
from transformer_jax.training.step import Trainer, TrainState, loss_sums
from tests.conftest import REPO, model_config

L, B, T = 2, 2, 16
# attention_chunks=1: less to compile (the blocked causal path is tested in test_model.py).
CFG = model_config(num_layers=L, d_model=32, num_heads=4, num_kv_heads=4, head_dim=8, d_ff=64,
                  vocab_size=97, max_len=32, attention_chunks=1)
TOKENS = jnp.asarray(np.random.default_rng(1).integers(3, 97, (B, T)), jnp.int32)
SEG = jnp.asarray([[1] * 6 + [2] * 10, [1] * 16], jnp.int32)  # packed rows: segments restart
POS = jnp.asarray([list(range(6)) + list(range(10)), list(range(16))], jnp.int32)
# Half the compile time of XLA:CPU's default, same semantics: these tests compare functions traced
# by JAX (remat and scan are applied before XLA), not XLA's code generation.
FAST = {"xla_backend_optimization_level": 0}


def _model(**kw):
  return DecoderLM(dataclasses.replace(CFG, **kw))


def random_params(model, seed=0, std=0.1):
  """Random numpy values of the model's parameter shapes (nothing to compile)."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), TOKENS[:1, :8])["params"])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0.0, std, s.shape).astype(s.dtype),
                      nn.unbox(abstract))


@pytest.fixture(scope="module")
def plain():
  """Unrolled params, and the plain model's loss and gradients on them."""
  params = random_params(_model())
  return params, _loss_and_grad(_model(), params)


def _loss_and_grad(model, params):
  def loss(p):
    logits = model.apply({"params": p}, TOKENS, SEG, POS)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 5])
  return jax.jit(jax.value_and_grad(loss), compiler_options=FAST)(params)


def test_stack_unstack_round_trip(plain):
  params, _ = plain
  stacked = stack.stack_layers(params, L)
  assert "layer_0" not in stacked and stacked["layers"]["mlp"]["up"].shape == (L, 32, 64)
  abstract = jax.eval_shape(lambda: _model(scan_layers=True).init(jax.random.key(0), TOKENS[:1]))
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), stacked) ==
          jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(abstract["params"])))
  back = stack.unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), back, params)
  restacked = stack.stack_layers(back, L)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), restacked, stacked)
  on_device = stack.stack_layers(jax.device_put(params), L)  # jax arrays: stacked on device
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), on_device, stacked)


@pytest.mark.parametrize("remat,scan", [(r, s) for s in (False, True)
                                         for r in ("none", "full", "dots", "outputs")
                                         if r != "none" or s])  # (none, False) is the reference
def test_loss_and_grads_equal_plain(plain, remat, scan):
  params, (ref_loss, ref_grads) = plain
  p = stack.stack_layers(params, L) if scan else params
  loss, grads = _loss_and_grad(_model(remat=remat, scan_layers=scan), p)
  if scan:
    grads = stack.unstack_layers(jax.device_get(grads))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
               grads, ref_grads)


def test_remat_policies_save_what_they_say(plain, capsys):
  """Per-layer residuals kept for the backward pass of the scanned stack: q/k/v projections
  [L, B, T, H, K], the MLP hidden [L, B, T, F], and block-width activations [L, B, T, D]; the
  matmuls' own outputs (ops.dense: rows flattened) are [L, B*T, H*K] and [L, B*T, F]."""
  p = stack.stack_layers(plain[0], L)
  shapes = {"qkv": f"f32[{L},{B},{T},4,8]", "hidden": f"f32[{L},{B},{T},64]",
            "width": f"f32[{L},{B},{T},32]", "dot_proj": f"f32[{L},{B * T},32]",
            "dot_hidden": f"f32[{L},{B * T},64]"}
  saved = {}
  for remat in ("full", "dots", "outputs"):
    model = _model(remat=remat, scan_layers=True)
    jax.ad_checkpoint.print_saved_residuals(
        lambda q, m=model: jnp.mean(m.apply({"params": q}, TOKENS)), p)
    lines = [x for x in capsys.readouterr().out.splitlines() if "from the argument" not in x]
    saved[remat] = {k: sum(x.startswith(s + " ") for x in lines) for k, s in shapes.items()}
  nothing = {"dot_proj": 0, "dot_hidden": 0}
  assert saved["full"] == {"qkv": 0, "hidden": 0, "width": 1, **nothing}  # the block's input
  # q, k, v and the attention output projection, the MLP's up projection (its down projection's
  # output is not needed by a pre-norm backward pass)
  assert saved["dots"]["dot_proj"] == 4 and saved["dots"]["dot_hidden"] == 1
  # input + attention_out (mlp_out is not needed either); hidden recomputed
  assert saved["outputs"] == {"qkv": 3, "hidden": 0, "width": 2, **nothing}


def test_kv_cache_decoding_with_scan(plain):
  """Prefill 6 tokens, then 3 one-token steps, through the scanned stack's (stacked) KV cache:
  the plain model's full-forward logits (test_model.py ties those to unrolled decoding)."""
  params, _ = plain
  model = _model(scan_layers=True)

  @functools.partial(jax.jit, compiler_options=FAST)
  def decode(p):
    cache = model.init(jax.random.key(0), jnp.zeros((B, 9), jnp.int32), decode=True)["cache"]
    out, mut = model.apply({"params": p, "cache": cache}, TOKENS[:, :6], decode=True,
                           mutable=["cache"])
    steps = [out]
    for t in range(6, 9):
      out, mut = model.apply({"params": p, "cache": mut["cache"]}, TOKENS[:, t:t + 1],
                             decode=True, mutable=["cache"])
      steps.append(out)
    return jnp.concatenate(steps, axis=1), mut["cache"]

  logits, cache = decode(stack.stack_layers(params, L))
  assert cache["layers"]["attention"]["key"].shape == (L, B, 9, 4, 8)
  np.testing.assert_array_equal(cache["layers"]["attention"]["index"], [9] * L)
  full = jax.jit(_model().apply, compiler_options=FAST)({"params": params}, TOKENS[:, :9])
  np.testing.assert_allclose(logits, full, atol=2e-5, rtol=2e-5)


def _tiny(*overrides):
  return config_lib.load(f"{REPO}/configs/gpt2.py:tiny",
                         ["model.num_layers=3", "data.seq_len=16", "train.batch_size=8",
                          "model.scan_layers=True", "model.attention_chunks=1", *overrides])


def test_train_step_with_scan_on_a_mesh():
  """Stacked params shard as (layers: replicated, then their own rules); the first step's loss is
  the plain model's on the same weights, and the step updates them. (Trainer's own jitted step,
  compiled with FAST.)"""
  config = _tiny("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.remat=dots")
  config_lib.validate(config, 8)
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:8]))
  spec = trainer.state_shardings.params["layers"]["mlp"]["up"].spec
  assert spec == jax.sharding.PartitionSpec(None, ("fsdp", "sequence"), "tensor")
  params0 = random_params(trainer.model, std=0.02)
  state = jax.jit(lambda p: TrainState.create(p, trainer.tx.init(p)), compiler_options=FAST,
                  out_shardings=trainer.state_shardings)(params0)
  rng = np.random.default_rng(0)
  x = rng.integers(0, config.model.vocab_size, (8, 17)).astype(np.int32)
  batch = {"inputs": x[:, :-1], "targets": x[:, 1:], "weights": np.ones((8, 16), np.float32),
           "segment_ids": np.ones((8, 16), np.int32),
           "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}
  plain_model = DecoderLM(dataclasses.replace(trainer.model.cfg, scan_layers=False, remat="none"))
  loss, weight = jax.jit(lambda p: loss_sums(plain_model, p, batch), compiler_options=FAST)(
      stack.unstack_layers(params0))
  step = trainer.lower_train_step().compile(compiler_options=FAST)
  with sharding.context(trainer.mesh, trainer.rules):
    for _ in range(2):  # warmup: the first step's learning rate is 0
      state, m = step(state, trainer.put_batch(batch), jax.random.key(0), None)  # no teacher
      if int(state.step) == 1:
        np.testing.assert_allclose(float(m["loss"]), float(loss / weight), rtol=1e-5)
  assert not bool(m["nonfinite"]) and int(state.skipped) == 0
  assert not np.allclose(jax.device_get(state.params)["layers"]["mlp"]["up"],
                         params0["layers"]["mlp"]["up"])


def test_sharding_check_sees_the_layers_axis():
  config = _tiny("mesh.data=2", "mesh.fsdp=4")
  config.sharding_rules = tuple(("layers", "data") if name == "layers" else (name, axes)
                                for name, axes in config.sharding_rules)
  with pytest.raises(ConfigError, match=r"layers/.* dim 3 is not divisible by mesh axes data"):
    Trainer(config, sharding.make_mesh(config, jax.devices()[:8]))


def test_decay_mask_ignores_the_layers_axis(plain):
  params, _ = plain
  want = stack.stack_layers(optimizer.decay_mask(params, False), L)
  want["layers"] = jax.tree.map(lambda x: bool(x[0]), want["layers"])
  assert optimizer.decay_mask(stack.stack_layers(params, L), False) == want


def test_parameter_counts_do_not_depend_on_the_layout():
  counts = {}
  for scan in ("False", "True"):
    config = _tiny(f"model.scan_layers={scan}")
    counts[scan] = plan.count_params(config)
  assert counts["True"] == counts["False"]


def test_config_values():
  for remat in ("none", "full", "dots", "outputs"):
    config_lib.validate(_tiny(f"model.remat={remat}"))
  with pytest.raises(ConfigError, match="model.remat='some' is not one of"):
    config_lib.validate(_tiny("model.remat=some"))
  with pytest.raises(ConfigError, match="expects a bool"):
    _tiny("model.scan_layers=yes please")


@pytest.mark.parametrize("kind, tflops", [("NVIDIA H100 80GB HBM3", 989.0),
                                          ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
                                          ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
                                          ("TPU v5", 459.0),
                                          ("TPU v5 lite", 197.0)])
def test_peak_flops_table_picks_the_part(monkeypatch, kind, tflops):
  """MFU's denominator comes from the device kind; the H100's PCIe and NVL parts and the H200
  NVL are slower than the SXM ones (a stand-in device with that kind, since none is here)."""
  device = type("Device", (), {"device_kind": kind, "platform": "gpu"})()
  monkeypatch.setattr(jax, "devices", lambda: [device])
  assert hardware.peak_flops_per_device(jnp.bfloat16) == (tflops * 1e12, f"table:{kind}")
