"""Model invariants: causality, packing isolation, per-segment positions, KV cache, jit, remat."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.models.decoder import DecoderLM
from tests.conftest import assert_kv_cache_matches, model_config

VARIANTS = {
    "gpt2": model_config(num_layers=2, d_model=32, num_heads=4, num_kv_heads=4, head_dim=8,
                        d_ff=64, vocab_size=97, max_len=32),
    "llama_gqa": model_config(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                             d_ff=64, vocab_size=97, max_len=32, position="rotary",
                             norm="rmsnorm", activation="swiglu", use_bias=False,
                             tie_embeddings=False),
    "post_sinusoidal_relu": model_config(num_layers=2, d_model=32, num_heads=2, num_kv_heads=2,
                                        head_dim=16, d_ff=64, vocab_size=97, max_len=32,
                                        position="sinusoidal", norm_position="post",
                                        activation="relu"),
    "mixtral_moe": model_config(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                               d_ff=48, vocab_size=97, max_len=32, position="rotary",
                               norm="rmsnorm", activation="swiglu", use_bias=False,
                               num_experts=4, experts_per_token=2),
}


def _init(cfg, t=12):
  model = DecoderLM(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, t), jnp.int32))["params"])
  return model, params


def _tokens(b, t, seed=1, vocab=97):
  return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, (b, t)), jnp.int32)


@pytest.mark.parametrize("name", VARIANTS)
def test_causal_by_gradient(name):
  """d logits_t / d input_s == 0 for every s > t, and != 0 for s <= t."""
  cfg = VARIANTS[name]
  _, params = _init(cfg)
  tokens = _tokens(1, 12)  # divisible by attention_chunks=4: the blocked causal path is tested
  table = params["embed"]["tokens"]
  v, t_len = table.shape[0], tokens.shape[1]
  model = DecoderLM(dataclasses.replace(cfg, vocab_size=v + t_len))
  if "logits" in params["embed"]:  # untied output: pad the extra vocabulary columns
    params["embed"]["logits"] = jnp.pad(params["embed"]["logits"], ((0, 0), (0, t_len)))

  def logits_from_inputs(inputs_TD):
    # Row V + s of an extended table is the input at position s, so d/d inputs_TD[s] is the
    # gradient with respect to exactly that position's input embedding.
    p = dict(params, embed=dict(params["embed"], tokens=jnp.concatenate([table, inputs_TD])))
    ids = (v + jnp.arange(t_len, dtype=jnp.int32))[None]
    return model.apply({"params": p}, ids)[0, :, :v].sum(-1)

  # [T_out, T_in, D], one gradient per output (lax.map, not jacrev's vmap: ragged_dot, which
  # the MoE layer uses, has no batching rule for the cotangent's axis)
  inputs_TD = table[tokens[0]]
  jac = jax.lax.map(lambda i: jax.grad(lambda x: logits_from_inputs(x)[i])(inputs_TD),
                    jnp.arange(t_len))
  influence = np.abs(np.asarray(jac)).sum(-1)
  for t in range(t_len):
    assert influence[t, t + 1:].max(initial=0.0) == 0.0, f"position {t} sees the future"
    assert influence[t, : t + 1].min() > 0.0, f"position {t} ignores its past"


@pytest.mark.parametrize("name", VARIANTS)
def test_packing_isolation_and_positions_restart(name):
  """A document packed after another gives the same logits as that document alone at the start
  of a row (positions restart, attention is block-diagonal); changing the first document leaves
  the second's logits unchanged."""
  model, params = _init(VARIANTS[name])
  doc_a, doc_b = _tokens(1, 5, seed=2), _tokens(1, 7, seed=3)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(7))], jnp.int32)
  out = model.apply({"params": params}, packed, seg, pos)
  alone = model.apply({"params": params}, doc_b)
  np.testing.assert_allclose(out[0, 5:], alone[0], atol=2e-5, rtol=2e-5)
  other_a = _tokens(1, 5, seed=4)
  out2 = model.apply({"params": params}, jnp.concatenate([other_a, doc_b], axis=1), seg, pos)
  np.testing.assert_allclose(out2[0, 5:], out[0, 5:], atol=2e-5, rtol=2e-5)
  assert not np.allclose(out2[0, :5], out[0, :5])


@pytest.mark.parametrize("name", VARIANTS)
def test_blocked_causal_attention_is_exact(name):
  """Query blocks that skip the (masked) keys after them give the full attention's logits and
  gradients, on packed rows."""
  cfg = VARIANTS[name]
  _, params = _init(cfg)
  tokens = _tokens(2, 16)
  seg = jnp.asarray([[1] * 6 + [2] * 10, [1] * 16], jnp.int32)
  pos = jnp.asarray([list(range(6)) + list(range(10)), list(range(16))], jnp.int32)

  def loss(p, chunks):
    model = DecoderLM(dataclasses.replace(cfg, attention_chunks=chunks))
    logits = model.apply({"params": p}, tokens, seg, pos)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 5]), logits

  grad = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, logits1), g1 = grad(params, 1)
  (_, logits4), g4 = grad(params, 4)
  np.testing.assert_allclose(logits4, logits1, atol=2e-5, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-4), g4, g1)


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_matches_full_forward(name):
  model, params = _init(VARIANTS[name])
  assert_kv_cache_matches(model, params, _tokens(2, 9), prefill=6)


def test_jit_equals_no_jit_and_remat_equals_plain():
  cfg = VARIANTS["gpt2"]
  model, params = _init(cfg)
  tokens = _tokens(2, 12)

  def loss(p, m):
    return jnp.mean(jax.nn.logsumexp(m.apply({"params": p}, tokens), -1))

  g_eager = jax.grad(loss)(params, model)
  g_jit = jax.jit(jax.grad(loss), static_argnums=1)(params, model)
  remat_model = DecoderLM(dataclasses.replace(cfg, remat="full"))
  g_remat = jax.jit(jax.grad(loss), static_argnums=1)(params, remat_model)
  for a, b, c in zip(jax.tree.leaves(g_eager), jax.tree.leaves(g_jit), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)  # fp32 reassociation only
    np.testing.assert_allclose(a, c, atol=1e-6, rtol=1e-5)


def test_logical_axis_names_on_every_param():
  model = DecoderLM(VARIANTS["llama_gqa"])
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  specs = nn.get_partition_spec(boxed["params"])
  for path, spec in jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
    assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) > 0, path
    assert not {"data", "fsdp", "tensor"} & set(a for a in spec if a), "mesh axis in model code"


def test_gpt2_init_scales_residual_projections():
  cfg = dataclasses.replace(VARIANTS["gpt2"], num_layers=8, d_model=64, d_ff=256)
  _, params = _init(cfg)
  std_in = float(np.std(params["layer_0"]["mlp"]["up"]))
  std_out = float(np.std(params["layer_0"]["mlp"]["down"]))
  assert abs(std_in - 0.02) < 0.003
  assert abs(std_out - 0.02 / np.sqrt(16)) < 0.001


@pytest.mark.parametrize("dim", [8, 64, 10, 33])
def test_sinusoidal_positions_follow_their_formulas(dim):
  """paper: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d));
  t2t: sin(pos * exp(-ln(10^4) i / (d/2 - 1))) for i < d/2, then the cosines, then a zero
  channel for an odd d (tensor2tensor's padding; it was d - 1 wide, and the model's first
  forward pass a traceback). Loops over the formulas, not the vectorised code."""
  from transformer_jax.models import layers  # pylint: disable=g-import-not-at-top
  positions = np.array([[0, 1, 2, 7, 100, 2047]])
  paper = np.zeros((6, dim))
  t2t = np.zeros((6, dim))
  for p_i, pos in enumerate(positions[0]):
    for j in range(dim):
      i = j // 2
      angle = pos / 10000 ** (2 * i / dim)
      paper[p_i, j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
      k = j % (dim // 2)
      angle = pos * np.exp(-np.log(1e4) * k / (dim // 2 - 1))
      t2t[p_i, j] = (np.sin(angle) if j < dim // 2 else np.cos(angle)) * (j < dim - dim % 2)
  for variant, want in (("paper", paper), ("t2t", t2t)):
    got = layers.sinusoidal(jnp.asarray(positions), dim, variant=variant)[0]
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
  assert not np.allclose(paper, t2t, atol=1e-2)
