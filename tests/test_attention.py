"""Attention implementations (models/attention.py) against the reference attention.reference: values and
gradients on CPU (splash as a Pallas kernel in interpret mode), the dispatch and its one-line
errors, a model-level loss, and (with libtpu) splash lowered for a TPU topology."""

import importlib.util
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import REPO
from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.data import objectives
from transformer_jax.models import attention
from transformer_jax.parallel import sharding
from transformer_jax.models import families
from transformer_jax.training import step as step_lib


def _inputs(b, t, n, g, k, seed=0):
  """q, k, v, a bias and packed segment ids (unequal segments, padding id 0 at the end)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  ends = sorted(rng.choice(np.arange(1, t), 3, replace=False))
  row = np.searchsorted(ends, np.arange(t), side="right") + 1
  row[ends[-1]:] = 0
  seg = np.stack([row] + [np.roll(row, i + 5) for i in range(b - 1)])
  return (normal(b, t, n, g, k), normal(b, t, n, k), normal(b, t, n, k),
          normal(b, n, g, t, t), jnp.asarray(seg, jnp.int32))


def _check(fn, ref, args, tol=1e-5):
  """fn(*args) == ref(*args), and their gradients (of a random projection) wrt every arg."""
  w = jnp.asarray(np.random.default_rng(9).normal(size=args[0].shape), jnp.float32)

  @jax.jit
  def out_and_grads(*a):
    return [(out, vjp(w)) for out, vjp in [jax.vjp(fn, *a), jax.vjp(ref, *a)]]

  (out, grads), (want, want_grads) = out_and_grads(*args)
  for got, expected in zip([out, *grads], [want, *want_grads]):
    np.testing.assert_allclose(got, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("causal, bias", [(True, True), (False, False)])
def test_dot_product_matches_reference(causal, bias):
  """GQA (2 kv heads x 2), packed segments, causal (the reference skipping key blocks) or not,
  with and without a bias: values and gradients, fp32."""
  q, k, v, b, seg = _inputs(2, 16, 2, 2, 8)
  mask = attention.mask(seg, seg, causal)
  args = (q, k, v, b) if bias else (q, k, v)
  chunks = 4 if causal else 1
  _check(lambda *a: attention.dot_product(*a[:3], mask, *a[3:]),
         lambda *a: attention.reference(*a[:3], mask, chunks, *a[3:]), args)


def test_segment_ids_from_mask():
  seg = jnp.asarray([[1, 1, 2, 2, 2, 0, 0], [3, 3, 3, 3, 1, 1, 1]], jnp.int32)
  for causal in (True, False):
    ids = attention.segment_ids(attention.mask(seg, seg, causal))
    np.testing.assert_array_equal(ids, [[0, 0, 2, 2, 2, 5, 5], [0, 0, 0, 0, 4, 4, 4]])


@pytest.mark.parametrize("causal", [True, False])
def test_splash_interpret_matches_reference(causal):
  """Splash (Pallas interpret mode on CPU; multi-head kernel with 2 kv heads x 2) within packed
  segments, its ids derived from the mask: values and gradients."""
  q, k, v, _, seg = _inputs(2, 128, 2, 2, 8)
  mask = attention.mask(seg, seg, causal)
  ids = attention.segment_ids(mask)
  _check(lambda *a: attention.splash(*a, ids, causal=causal, interpret=True),
         lambda *a: attention.reference(*a, mask), (q, k, v))


@pytest.mark.parametrize("n, g", [(2, 2), (1, 4)])
def test_splash_sharded_under_mesh(n, g):
  """Under a data 2 x fsdp 2 x tensor 2 mesh with the base rules, splash runs per shard in
  shard_map (batch over data*fsdp; heads over tensor, or whole when tensor does not divide the
  key/value heads) and equals the unsharded reference."""
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny",
                           ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
  mesh = sharding.make_mesh(config)
  q, k, v, _, seg = _inputs(4, 128, n, g, 8)
  mask = attention.mask(seg, seg, True)
  ref = attention.reference(q, k, v, mask)
  fn = jax.jit(lambda q, k, v, m: attention.splash(q, k, v, attention.segment_ids(m),
                                                  causal=True, interpret=True))
  with sharding.context(mesh, sharding.rules(config)):
    text = fn.lower(q, k, v, mask).as_text()
    out = fn(q, k, v, mask)
  assert "shard_map" in text or "sdy.manual_computation" in text
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


def _choose(impl, where, *, t=128, dtype=jnp.bfloat16, bias=False, causal=True, decode=False,
            self_attention=True, head_dim=64):
  q = jax.ShapeDtypeStruct((2, t, 2, 2, head_dim), dtype)
  k = jax.ShapeDtypeStruct((2, t, 2, head_dim), dtype)
  b = jax.ShapeDtypeStruct((2, 2, 2, t, t), jnp.float32) if bias else None
  return attention.choose(impl, q, k, b, causal=causal, self_attention=self_attention,
                          decode=decode, where=where)


def test_auto_picks_the_platform_kernel_where_it_serves_the_layer():
  assert _choose("auto", "tpu") == "splash"
  assert _choose("auto", "gpu") == "cudnn"
  assert _choose("auto", "cpu") == "xla"
  for kwargs in ({"bias": True}, {"t": 96}, {"decode": True}, {"causal": False},
                 {"self_attention": False}):
    assert _choose("auto", "tpu", **kwargs) == "xla", kwargs
  assert _choose("auto", "gpu", dtype=jnp.float32) == "xla"
  assert _choose("auto", "gpu", t=29, self_attention=False) == "xla"  # e.g. T5's targets
  assert _choose("auto", "gpu", causal=False, bias=True) == "cudnn"
  assert _choose("splash", "tpu", decode=True) == _choose("cudnn", "gpu", decode=True) == "xla"
  assert _choose("dot_product", "cpu", decode=True, bias=True) == "dot_product"


@pytest.mark.parametrize("capability, limit", [(None, 128), ("8.0", 128), ("9.0", 256),
                                               ("10.0", 256)])
def test_cudnn_head_dim_limit_follows_the_local_gpu(monkeypatch, capability, limit):
  """jax's cuDNN attention takes head dims up to 256 on Hopper and later, 128 before; with no GPU
  in the process (an AOT compile), 128, as jax's own check decides."""
  def local_devices(backend=None):
    if capability is None:
      raise RuntimeError("Unknown backend gpu")
    return [types.SimpleNamespace(compute_capability=capability)]
  monkeypatch.setattr(jax, "local_devices", local_devices)
  assert attention.cudnn_head_dim_limit() == limit
  assert _choose("auto", "gpu", head_dim=limit) == "cudnn"
  assert _choose("auto", "gpu", head_dim=limit + 8) == "xla"
  with pytest.raises(ConfigError, match=f"needs a head dim <= {limit} divisible by 8, got 264"):
    _choose("cudnn", "gpu", head_dim=264)


@pytest.mark.parametrize("impl, where, kwargs, message", [
    ("splash", "tpu", {"bias": True}, "takes no attention bias (model.position=relative)"),
    ("splash", "tpu", {"t": 96}, "needs a sequence length divisible by 128, got 96"),
    ("splash", "cpu", {}, "needs a TPU (compiling for cpu)"),
    ("cudnn", "cpu", {}, "needs a CUDA GPU (compiling for cpu)"),
    ("cudnn", "gpu", {"dtype": jnp.float32}, "needs model.dtype=bfloat16, got float32"),
    ("cudnn", "gpu", {"t": 29}, "needs even query and key lengths, got 29 and 29"),
])
def test_explicit_kernel_that_cannot_serve_is_one_config_error(impl, where, kwargs, message):
  with pytest.raises(ConfigError) as e:
    _choose(impl, where, **kwargs)
  assert str(e.value) == f"model.attention_impl={impl} {message}; use auto, xla or dot_product"


@pytest.mark.parametrize("spec, overrides, message", [
    ("t5.py:tiny", ["model.attention_impl=splash"], "splash cannot serve model.position=relative"),
    ("transformer.py:tiny", ["model.attention_impl=splash"],
     "splash cannot serve model.family=encdec"),
    ("gpt2.py:tiny", ["model.attention_impl=splash", "data.objective=prefix_lm"],
     "splash cannot serve data.objective=prefix_lm"),
    ("gpt2.py:tiny", ["model.attention_impl=cudnn"], "cudnn needs model.dtype=bfloat16"),
    ("gpt2.py:tiny", ["model.attention_impl=flash"], "model.attention_impl='flash' is not one of"),
])
def test_config_validation(spec, overrides, message):
  """What a config alone shows (its values; its objective against its model: objectives.check)."""
  config = config_lib.load(f"{REPO}/configs/{spec}", overrides)
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.validate(config)
    objectives.check(config)


def _tiny_gpt2(impl, *overrides):
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny",
                           [f"model.attention_impl={impl}", "model.vocab_size=512",
                            "model.num_layers=1", *overrides])
  model = families.build_model(config)
  b, t = 2, config.data.seq_len
  rng = np.random.default_rng(0)
  seg = np.repeat([[1] * 20 + [2] * 30 + [0] * (t - 50)], b, axis=0)
  batch = {"inputs": rng.integers(3, 300, (b, t)), "targets": rng.integers(3, 300, (b, t)),
           "segment_ids": seg, "positions": np.arange(t)[None].repeat(b, 0),
           "weights": (seg > 0).astype(np.float32)}
  return model, {k: jnp.asarray(v) for k, v in batch.items()}


def test_model_loss_dot_product_equals_xla():
  """gpt2.py:tiny's (one layer) loss over a packed batch: dot_product == xla (gradients: the
  function-level tests above)."""
  model, batch = _tiny_gpt2("xla")
  dot_model, _ = _tiny_gpt2("dot_product")

  @jax.jit
  def losses(rng):
    params = model.init(rng, batch["inputs"][:, :8])["params"]
    return [step_lib.loss_sums(m, params, batch)[0] for m in (model, dot_model)]

  want, got = losses(jax.random.key(0))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cudnn_on_cpu_is_a_config_error_before_compiling():
  model, batch = _tiny_gpt2("cudnn", "model.dtype=bfloat16")
  params = jax.eval_shape(model.init, jax.random.key(0), batch["inputs"][:, :8])["params"]
  with pytest.raises(ConfigError, match="cudnn needs a CUDA GPU"):
    jax.eval_shape(lambda p: step_lib.loss_sums(model, p, batch), params)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -e .[tpu])")
def test_splash_lowers_for_a_tpu_topology():
  """gpt2.py:tiny's train step lowered for v5e-8: auto and splash put a Pallas kernel
  (tpu_custom_call) in shard_map, xla none. Lowering only (a few seconds), no compile."""
  from transformer_jax.perf import topology  # pylint: disable=g-import-not-at-top
  devices = topology.topology_devices(topology.parse_topology("v5e-8"), 1)
  texts = {}
  for impl, extra in (("xla", []), ("splash", []), ("auto", []),
                      ("window", ["model.attention_window=32"]),
                      ("sparse", ["model.attention_window=32", "model.global_tokens=2"])):
    config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny",
                             [f"model.attention_impl={'auto' if extra else impl}",
                              "data.seq_len=128", "model.max_len=128",
                              "model.dtype=bfloat16"] + extra)
    texts[impl] = step_lib.Trainer(config, sharding.make_mesh(config, devices)
                                   ).lower_train_step().as_text()
  assert "tpu_custom_call" not in texts["xla"]
  for impl in ("splash", "auto", "window"):  # a sliding window: splash's local mask
    assert texts[impl].count("tpu_custom_call") >= 3, impl  # forward, dq and dkv kernels
  assert "tpu_custom_call" not in texts["sparse"]  # global tokens: auto falls back to xla
