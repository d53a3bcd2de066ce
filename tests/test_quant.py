"""Quantization: post-training int8/int4 (quant/ptq.py, a quantized workdir that sample reads)
and quantized training (model.quantization=int8, quant/qt.py through qwix)."""

import contextlib
import glob
import io
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint
import pytest

from transformer_jax import config as config_lib
from transformer_jax import quantize
from transformer_jax.config import ConfigError
from transformer_jax.models import families
from transformer_jax.models import ops
from transformer_jax.parallel import sharding
from transformer_jax.quant import ptq
from transformer_jax.quant import store
from transformer_jax.training import checkpoint
from transformer_jax.training import loop
from transformer_jax.training.step import Trainer
from tests.conftest import REPO, tiny_overrides
from tests.test_step import random_batches, tiny_config

# Stated tolerances, with the values measured (gpt2.py:tiny, random weights: the worst case for
# int4, whose 16 levels a trained model's eval loss hardly notices, benchmarks/RESULTS.md).
LOGITS_TOL = {"int8": 0.03, "int4": 0.3}  # rms |logits - fp32 logits| / std(fp32): 0.011, 0.17
TRAIN_LOSS_TOL = 1e-3  # |int8-trained - fp32-trained loss|, 3 steps from one init: 6e-5


@pytest.fixture(scope="module")
def tiny():
  """gpt2.py:tiny (vocabulary 512) at its init, plus noise: scales differ by row and leaf."""
  model = families.build_model(tiny_config("model.vocab_size=512"))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), *families.init_inputs(model))["params"])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.01 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  return model, jax.device_get(params), ptq.axis_names(model)


def _steps(stored, params, names, path=""):
  """Each weight's elementwise quantization step (its scale; 0 where kept in float): what
  qvalue = 1 dequantizes to."""
  if isinstance(params, dict):
    return {k: _steps(stored[k], v, names, f"{path}/{k}" if path else k)
            for k, v in params.items()}
  lay = ptq.layout(path, ptq._lookup(names, path))  # pylint: disable=protected-access
  if lay is None:
    return np.zeros(params.shape, np.float32)
  ones = {"qvalue": np.ones(ptq.canonical_shape(params.shape, lay), np.int8),
          "scale": stored["scale"]}
  return np.asarray(ptq.dequantize_leaf(ones, lay, params.shape, jnp.float32))


@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 16)])
def test_dequantized_weights_within_half_a_step(tiny, mode, group):
  _, params, names = tiny
  stored = ptq.quantize_tree(params, names, mode, ptq.check(mode, group))
  abstract = jax.eval_shape(lambda: params)
  restored = ptq.dequantize_tree(stored, abstract, names)
  steps = _steps(stored, params, names)
  qmax = 127 if mode == "int8" else 7
  for w, r, s in zip(jax.tree.leaves(params), jax.tree.leaves(restored), jax.tree.leaves(steps)):
    assert r.shape == w.shape and r.dtype == w.dtype
    if not s.any():  # kept in float: exact
      np.testing.assert_array_equal(r, w)
      continue
    assert np.all(np.abs(np.asarray(r) - w) <= 0.5 * s * (1 + 1e-4))  # fp32 rounding of x / scale
    assert np.abs(np.asarray(r) / s).max() <= qmax + 1 + 1e-3  # the codes fit the type
  emb = stored["embed"]["tokens"]
  v, d = params["embed"]["tokens"].shape
  expect_scale = (1, v) if mode == "int8" else (d // group, v)  # rows are the table's channels
  assert emb["scale"].shape == expect_scale
  assert emb["qvalue"].dtype == (np.int8 if mode == "int8" else np.uint8)


def test_logits_close_and_bytes_shrink_by_the_expected_factor(tiny):
  model, params, names = tiny
  tokens = jax.random.randint(jax.random.key(2), (2, 32), 0, 512)
  apply = jax.jit(lambda p: model.apply({"params": p}, tokens))
  ref = apply(params)
  for mode, group in (("int8", 0), ("int4", 32)):
    stored = ptq.quantize_tree(params, names, mode, group)
    got = apply(ptq.dequantize_tree(stored, jax.eval_shape(lambda: params), names))
    err = float(jnp.sqrt(jnp.mean(jnp.square(got - ref))) / jnp.std(ref))
    assert err < LOGITS_TOL[mode], (mode, err)
    # bytes: bits/8 per quantized weight + 4 per fp32 scale + the float leaves as they were
    n_quant = sum(int(np.prod(w.shape)) for w in _quantized(params, names))
    n_kept = ptq.nbytes(params) - 4 * n_quant
    n_scale = sum(int(np.prod(node["scale"].shape)) for node in _stored_nodes(stored))
    bits = 8 if mode == "int8" else 4
    assert ptq.nbytes(stored) == n_quant * bits // 8 + 4 * n_scale + n_kept
    factor = ptq.nbytes(params) / ptq.nbytes(stored)
    assert factor > (3.5 if mode == "int8" else 5.5), (mode, factor)


def _quantized(params, names, path=""):
  for k, v in params.items():
    p = f"{path}/{k}" if path else k
    if isinstance(v, dict):
      yield from _quantized(v, names, p)
    elif ptq.layout(p, ptq._lookup(names, p)) is not None:  # pylint: disable=protected-access
      yield v


def _stored_nodes(stored):
  for v in stored.values():
    if isinstance(v, dict):
      yield from ([v] if "qvalue" in v else _stored_nodes(v))


def test_one_line_errors(tiny):
  _, params, names = tiny
  for call in (lambda: ptq.check("int3", 0), lambda: ptq.check("int4", -1),
               lambda: ptq.quantize_tree(params, names, "int4", 48)):
    with pytest.raises(ConfigError) as e:
      call()
    assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="does not divide the input dimension 64"):
    ptq.quantize_tree(params, names, "int4", 48)
  with pytest.raises(ConfigError, match="model.quantization='int2' is not one of"):
    config_lib.validate(tiny_config("model.quantization=int2"), 1)


@pytest.mark.parametrize("mode,tol", [("int8", 0.02), ("fp8", 0.1)])
def test_quantized_dense_forward_and_backward_close_to_fp32(mode, tol):
  """Relative errors of a [B, T, D] x [D, H, K] projection and of its gradients (measured: int8
  0.009 and 0.009; fp8, e4m3 forward and e5m2 gradients, 0.036 and 0.066)."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 64))
  w = jax.random.normal(jax.random.key(1), (64, 4, 16)) * 0.1
  y_ref, y = ops.dense(x, w), ops.dense(x, w, quant=mode)
  assert float(jnp.linalg.norm(y - y_ref) / jnp.linalg.norm(y_ref)) < tol / 2
  f = lambda quant: lambda x, w: jnp.sum(jnp.sin(ops.dense(x, w, quant=quant)))
  for g_ref, g in zip(jax.grad(f("none"), (0, 1))(x, w), jax.grad(f(mode), (0, 1))(x, w)):
    assert float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref)) < tol


def test_int8_training_tracks_fp32_and_resumes_with_quantization_off(tmp_path):
  small = ("model.vocab_size=512", "checkpoint.async_save=False")
  batches = random_batches(tiny_config(*small), 3)
  runs = {}
  for mode in ("none", "int8"):
    config = tiny_config(f"model.quantization={mode}", *small)
    trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
    state, losses = trainer.init_state(config.seed), []
    for b in batches:
      state, m = trainer.train_step(state, trainer.put_batch(b), jax.random.key(0))
      losses.append(float(m["loss"]))
    runs[mode] = (config, trainer, state, losses)
  ref, got = runs["none"][3], runs["int8"][3]
  assert np.all(np.isfinite(got))
  assert np.max(np.abs(np.subtract(got, ref))) < TRAIN_LOSS_TOL, (ref, got)
  # An int8-trained checkpoint restores exactly into the unquantized model's train state.
  config, _, state, _ = runs["int8"]
  ckpts = checkpoint.Checkpoints(str(tmp_path), config.checkpoint)
  ckpts.save(3, state, force=True)
  ckpts.close()
  plain = runs["none"][1]
  step, restored = checkpoint.Checkpoints(str(tmp_path), config.checkpoint).restore(
      plain.abstract_state)
  assert step == 3
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_quantize_command_writes_a_workdir_that_sample_reads(tiny_data, tmp_path):
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(
      tiny_data, **{"train.steps": 2, "eval.every_steps": 2, "checkpoint.every_steps": 2}))
  workdir, out = str(tmp_path / "w"), str(tmp_path / "w8")
  loop.train(config, workdir, quiet=True, devices=jax.devices()[:1])
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    quantize.main([f"--workdir={workdir}", f"--out={out}", "--mode=int8"])
  figures = json.loads(printed.getvalue().strip().splitlines()[-1])
  assert {"param_bytes", "quantized_param_bytes", "eval_loss", "quantized_eval_loss"} <= set(
      figures)
  assert figures["param_bytes"] / figures["quantized_param_bytes"] > 3
  assert figures["quantized_disk_bytes"] < figures["param_bytes"] / 2
  assert abs(figures["quantized_eval_loss"] - figures["eval_loss"]) < 0.02
  assert os.path.isfile(os.path.join(out, "config.json")) and store.is_quantized(out)
  copy = tmp_path / "w8_changed"  # its arrays changed on disk (a bad copy): never read as its own
  shutil.copytree(out, copy)
  manifest, stored = store.load(str(copy))
  stored["embed"]["tokens"]["scale"] = stored["embed"]["tokens"]["scale"] * 1.5
  shutil.rmtree(copy / store.ARRAYS)
  orbax.checkpoint.PyTreeCheckpointer().save(str(copy / store.ARRAYS), stored)
  with pytest.raises(ConfigError, match=r"^the quantized weights in .* are unreadable \(ValueError:"
                     r" its array embed/tokens/scale is not the one saved: its checksum differs\)"):
    store.load(str(copy))
  with pytest.raises(ConfigError, match="already holds"):
    quantize.main([f"--workdir={workdir}", f"--out={out}", "--mode=int4"])
  other = tmp_path / "other_run"  # another run's workdir is never taken over
  other.mkdir()
  (other / "config.json").write_text("{}")
  with pytest.raises(ConfigError, match="already holds config.json"):
    quantize.main([f"--workdir={workdir}", f"--out={other}", "--mode=int8"])
  assert (other / "config.json").read_text() == "{}" and not store.is_quantized(str(other))
  with pytest.raises(ConfigError, match="^--out=.* cannot be made a folder: .* is a file"):
    quantize.main([f"--workdir={workdir}", f"--out={other / 'config.json'}", "--mode=int8"])
  for key in ("model.num_layers=1", "model.activation=relu", "data.tokenizer=x.model"):
    with pytest.raises(ConfigError, match=f"--config.{key.split('=')[0]}: quantize keeps"):
      quantize.main([f"--workdir={workdir}", f"--out={tmp_path / 'changed'}", "--mode=int8",
                     f"--config.{key}"])  # (it dropped layer 1, or measured another model)
  from transformer_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  deeper = config_lib.from_json_file(os.path.join(workdir, "config.json"))
  deeper.model.num_layers = 3
  with pytest.raises(ConfigError, match=r"has no parameter \['layer_2'\]"):  # (abstract leaves)
    checkpoint.Checkpoints(workdir, config.checkpoint, read_only=True).restore_params(
        families.abstract_params(families.build_model(deeper)))
  from transformer_jax.training import lock  # pylint: disable=g-import-not-at-top
  (tmp_path / "busy").mkdir()
  with lock.hold(str(tmp_path / "busy")):  # another quantize writing there (a traceback)
    with pytest.raises(ConfigError, match=r"busy is in use by .*use another --workdir"):
      quantize.main([f"--workdir={workdir}", f"--out={tmp_path / 'busy'}", "--mode=int8"])
  from transformer_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match="holds step 2 quantized, not step 999"):
    harness.load_workdir(out, 999, devices=jax.devices()[:1])  # it evaluated step 2
  from transformer_jax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match="holds step 2 quantized, not step 1$"):  # not step 2's
    convert_cli.main(["export", f"--workdir={out}", f"--hf_dir={tmp_path / 'hf'}", "--step=1"])
  from transformer_jax import train as train_cli  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=r"is a quantized workdir"):  # it trained from scratch
    train_cli.main([f"--workdir={out}", "--config.train.steps=3"])
  from transformer_jax.quant import run as quant_run  # pylint: disable=g-import-not-at-top
  assert [quant_run._figure(e) for e in (  # pylint: disable=protected-access
      {}, {"eval_loss": 1.25}, {"eval_loss": float("nan")})] == [None, 1.25, "nan"]
  model = families.build_model(config)
  abstract = families.abstract_params(model)
  step, params = store.restore_params(workdir, config.checkpoint, model, abstract)
  q_step, q_params = store.restore_params(out, config.checkpoint, model, abstract)
  assert q_step == step == 2
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(q_params)):
    assert a.shape == b.shape and float(jnp.max(jnp.abs(a - b))) < 0.05
  from transformer_jax import sample  # pylint: disable=g-import-not-at-top
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    sample.main([f"--workdir={out}", "--prompt=def", "--max_new_tokens=3"])
  assert printed.getvalue().startswith("[step 2] def")
  # a host too small for it is no damage: raised as it is (not "quantize again")
  with pytest.MonkeyPatch.context() as patch:
    def too_big(*args, **kwargs):
      raise MemoryError("Unable to allocate 14.2 GiB for an array")
    patch.setattr(store.ocp.PyTreeCheckpointer, "restore", too_big)
    with pytest.raises(MemoryError):
      store.restore_params(out, config.checkpoint, model, abstract)
  # a damaged one is one line (it was orbax's traceback and ~100 closed-loop reports)
  victim = max(glob.glob(f"{out}/quantized/**/*", recursive=True),
               key=lambda p: os.path.getsize(p) if os.path.isfile(p) else -1)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 3)
  with pytest.raises(ConfigError, match=r"^the quantized weights in .*w8/quantized are unread"):
    store.restore_params(out, config.checkpoint, model, abstract)
  manifest = os.path.join(out, store.MANIFEST)  # and a manifest cut short (a JSONDecodeError)
  with open(manifest, "r+b") as f:
    f.truncate(os.path.getsize(manifest) // 2)
  with pytest.raises(ConfigError, match=r"quantization.json is unreadable \(JSONDecodeError"):
    store.restore_params(out, config.checkpoint, model, abstract)
