"""Chunked cross-entropy (train.loss_chunk): the head applied to a few tokens at a time gives the
same loss sums and gradients as the full [B, T, V] logits, for every family's head (tied GPT-2,
untied Llama, BERT's MLM transform + bias, the encoder-decoder's decoder), with z_loss and label
smoothing on (and the plain cross-entropy beside them) and a token count that is not a multiple
of the chunk."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from transformer_jax import config as config_lib
from transformer_jax.models import families
from transformer_jax.training import step as step_lib
from tests.conftest import REPO, synthetic_batch

FAST = {"xla_backend_optimization_level": 0}
SHRINK = ["model.num_layers=1", "model.num_decoder_layers=1", "model.d_model=32",
          "model.num_heads=4", "model.head_dim=8", "model.d_ff=64", "model.vocab_size=101",
          "model.max_len=32", "model.attention_chunks=1", "data.seq_len=12",
          "data.target_len=10", "train.batch_size=3"]


def _init_params(model, batch, key):
  return nn.unbox(model.init(key, *[batch[k] for k in type(model).INPUTS])["params"])


def _loss_and_grads(model, batch, params, chunk):
  def f(p):  # (the loss, (its weight, the plain cross-entropy sum))
    loss, weight, aux = step_lib.loss_parts(model, p, batch, z_loss=1e-2, label_smoothing=0.1,
                                            chunk=chunk)
    return loss, (weight, aux["cross_entropy"])
  return jax.value_and_grad(f, has_aux=True)(params)


def _shapes(jaxpr):
  """Every value's shape in a jaxpr, nested jaxprs (scan, remat, custom_vjp, pjit) included."""
  for eqn in jaxpr.eqns:
    yield from (tuple(v.aval.shape) for v in eqn.outvars)
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from _shapes(sub)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5"])
def test_chunked_loss_and_grads_equal_the_full_logits(family):
  config = config_lib.load(f"{REPO}/configs/{family}.py:tiny", SHRINK)
  model = families.build_model(config)
  batch = synthetic_batch(config, model)
  targets_key, weights_key = type(model).TARGETS
  rng = np.random.default_rng(1)
  batch[weights_key] = (rng.random(batch[weights_key].shape) < 0.7).astype(np.float32)
  tokens = batch[targets_key].size
  assert tokens % 7, "the chunk must not divide the token count (padding is under test)"
  def run(key):  # one compilation: init, then both losses and their gradients
    params = _init_params(model, batch, key)
    return _loss_and_grads(model, batch, params, 0), _loss_and_grads(model, batch, params, 7)
  ((loss, (weight, ce)), grads), ((loss_c, (weight_c, ce_c)), grads_c) = jax.jit(
      run, compiler_options=FAST)(jax.random.key(0))
  assert float(weight_c) == float(weight) == batch[weights_key].sum()
  np.testing.assert_allclose(float(loss_c), float(loss), rtol=1e-5)
  np.testing.assert_allclose(float(ce_c), float(ce), rtol=1e-5)
  assert float(ce) < float(loss)  # smoothing and z-loss on top of the cross-entropy
  # (the gradients' own scale: a key bias's is 0 in exact arithmetic, rounding's ~1e-12 here)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
  for (path, g), g_c in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_c)):
    np.testing.assert_allclose(g_c, g, rtol=1e-5, atol=1e-6 * scale, err_msg=str(path))


def test_loss_chunk_is_validated():
  with pytest.raises(config_lib.ConfigError, match="train.loss_chunk"):
    config_lib.validate(config_lib.load(f"{REPO}/configs/gpt2.py:tiny", ["train.loss_chunk=-1"]))


def test_full_logits_never_exist_when_chunked():
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", SHRINK)
  model = families.build_model(config)
  batch = synthetic_batch(config, model)
  params = jax.eval_shape(lambda: _init_params(model, batch, jax.random.key(0)))
  full_BTV = batch["targets"].shape + (config.model.vocab_size,)
  for chunk, present in ((0, True), (7, False)):
    traced = jax.make_jaxpr(lambda p, c=chunk: _loss_and_grads(model, batch, p, c))(params)
    assert (full_BTV in set(_shapes(traced.jaxpr))) == present, (chunk, full_BTV)
