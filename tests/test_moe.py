"""Mixture-of-Experts (models/moe.py): the layer against a dense reference, capacity and drops,
the router losses, expert parallelism on a mesh, and the config's guards."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.models import layers
from transformer_jax.models import moe
from transformer_jax.parallel import sharding
from tests.conftest import REPO, model_config
from tests.test_step import random_batches, run_steps


def _cfg(**kw):
  base = dict(d_model=32, d_ff=48, num_experts=4, experts_per_token=2, activation="swiglu",
              use_bias=False)
  return model_config(**{**base, **kw})


def _layer(cfg, b=3, t=10, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(b, t, cfg.d_model)), jnp.float32)
  module = moe.MoE(cfg)
  # (jitted: one compile, where eagerly every op of the initialisation compiled on its own)
  params = nn.unbox(jax.jit(module.init)(jax.random.key(seed), x)["params"])
  # Random (not zero) biases so that they are tested too.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(7), p.shape), params)
  return module, params, x


def _apply(module, **kwargs):
  """module.apply({"params": params}, x, **kwargs), jitted (one compile, not one per op)."""
  return jax.jit(lambda params, x: module.apply({"params": params}, x, **kwargs))


def _reference(cfg, params, x_BTD):
  """Every token through its top-k experts one at a time, in numpy float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x_BTD, np.float64).reshape(-1, cfg.d_model)
  logits = x @ p["router"]
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  acts = {"swiglu": lambda g, u: g / (1 + np.exp(-g)) * u,
          "gelu": lambda g, u: 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3))),
          "relu": lambda g, u: np.maximum(u, 0)}[cfg.activation]
  bias = lambda name, e: p[name + "_bias"][e] if name + "_bias" in p else 0.0
  y = np.zeros_like(x)
  for n in range(x.shape[0]):
    top = np.argsort(-probs[n], kind="stable")[:cfg.experts_per_token]
    w = probs[n, top] / (probs[n, top].sum() if cfg.router_renormalize else 1.0)
    for e, we in zip(top, w):
      up = x[n] @ p["up"][e] + bias("up", e)
      gate = x[n] @ p["gate"][e] + bias("gate", e) if "gate" in p else None
      y[n] += we * (acts(gate, up) @ p["down"][e] + bias("down", e))
  return y.reshape(x_BTD.shape)


@pytest.mark.parametrize("kw", [
    {},  # Mixtral: SwiGLU, top-2 renormalised
    {"activation": "gelu", "use_bias": True, "experts_per_token": 1, "router_renormalize": False},
    {"activation": "relu", "num_experts": 6, "experts_per_token": 3, "expert_d_ff": 24},
])
def test_dropless_equals_every_token_through_its_experts(kw):
  cfg = _cfg(**kw)
  module, params, x = _layer(cfg)
  y = _apply(module)(params, x)
  np.testing.assert_allclose(y, _reference(cfg, params, x), rtol=1e-4, atol=1e-5)


def test_dropless_gradients_equal_the_reference_formulation():
  """Gradients (params and input) of the sorted ragged_dot path == of a dense one-hot mixture
  (every expert on every token, weighted by the gates: zero for the unchosen)."""
  cfg = _cfg(use_bias=True)
  module, params, x = _layer(cfg)
  r = jax.random.normal(jax.random.key(3), x.shape)

  def dense(params, x):
    logits = jnp.einsum("btd,de->bte", x, params["router"])
    weights, experts, _ = moe.route(cfg, logits)
    gates = jnp.sum(jax.nn.one_hot(experts, cfg.num_experts) * weights[..., None], axis=2)
    bias = lambda name: params[name + "_bias"][None, None]
    g = jnp.einsum("btd,edf->btef", x, params["gate"]) + bias("gate")
    u = jnp.einsum("btd,edf->btef", x, params["up"]) + bias("up")
    out = jnp.einsum("btef,efd->bted", jax.nn.silu(g) * u, params["down"]) + bias("down")
    return jnp.einsum("bte,bted->btd", gates, out)

  loss = lambda f: lambda p, x: jnp.sum(f(p, x) * r)
  grad = lambda f: jax.jit(jax.grad(loss(f), argnums=(0, 1)))  # (one compile, not one per op)
  got = grad(lambda p, x: module.apply({"params": p}, x))(params, x)
  want = grad(dense)(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(got[0]["router"]).sum()) > 0  # the gates' gradient reaches the router


def test_ample_capacity_equals_dropless():
  cfg = _cfg()
  module, params, x = _layer(cfg)
  roomy = moe.MoE(dataclasses.replace(cfg, expert_capacity_factor=cfg.num_experts / 2))
  assert moe.capacity(roomy.cfg, x.shape[1]) == x.shape[1]
  y, sown = _apply(roomy, mutable=["moe"])(params, x)
  np.testing.assert_allclose(y, _apply(module)(params, x), rtol=1e-5, atol=1e-6)
  assert float(sown["moe"]["dropped"][0]) == 0.0


@pytest.mark.parametrize("padded", [False, True])
def test_slots_fill_in_position_then_choice_order(padded):
  """... over the real tokens: padding anywhere in a row takes no slot."""
  rng = np.random.default_rng(0)
  e, k, t, cap = 5, 2, 13, 3
  experts = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
                      for _ in range(2)])
  real = rng.random((2, t)) < 0.6 if padded else np.ones((2, t), bool)
  got = np.asarray(moe.slots(jnp.asarray(experts, jnp.int32), e, cap,
                             jnp.asarray(real) if padded else None))
  for b in range(2):
    fill = [0] * e
    for i in range(t):
      for choice in range(k):
        x = experts[b, i, choice]
        if not real[b, i]:
          assert got[b, i, choice] == cap
          continue
        assert got[b, i, choice] == (fill[x] if fill[x] < cap else cap)
        fill[x] += 1


@pytest.mark.parametrize("family, capacity", [("decoder", 0.0), ("encoder", 8.0),
                                              ("encdec", 0.0)])
def test_router_statistics_leave_the_padding_out(family, capacity):
  """Packed rows whose tails are padding (segment id 0) give the router losses and statistics of
  the same rows without their padding, whatever the padding holds (the padding used to count: a
  load-balancing loss that trained the router on pad tokens)."""
  from transformer_jax.models import families  # pylint: disable=g-import-not-at-top
  # (one MoE layer a stack: a second's statistics would differ only if the real tokens' outputs
  # depended on the padding, which test_capacity_never_lets_the_future_in checks)
  cfg = _cfg(num_layers=1, moe_every=1, vocab_size=64, max_len=16, num_heads=4,
             num_kv_heads=4, head_dim=8, position="rotary", family=family,
             expert_capacity_factor=capacity)
  model = families.FAMILIES[family](cfg)
  params = nn.unbox(model.init(jax.random.key(3), *families.init_inputs(model, 16))["params"])
  rng = np.random.default_rng(5)
  apply = jax.jit(lambda p, *args: model.apply({"params": p}, *args, mutable=["moe"]))

  def row(t, real, fill):
    tokens = np.where(np.arange(t) < real, rng.integers(1, 64, t), fill)[None]
    seg = np.where(np.arange(t) < real, 1 + (np.arange(t) >= real // 2), 0)[None]
    pos = np.where(seg[0] == 2, np.arange(t) - real // 2, np.arange(t))[None] * (seg > 0)
    return [jnp.asarray(a, jnp.int32) for a in (tokens, seg, pos)]

  def stats(*sides):  # one (tokens, segment ids, positions) per side
    if family == "encdec":
      (et, es, ep), (dt, ds, dp) = sides
      args = (et, dt, es, ep, ds, dp)
    else:
      args = sides[0]
    _, sown = apply(params, *args)
    return {n: float(v) for n, v in
            moe_sums_of(jax.tree_util.tree_leaves_with_path(sown["moe"])).items()}

  sides = [(16, 11), (12, 7)][:2 if family == "encdec" else 1]
  padded = [row(t, real, 0) for t, real in sides]
  other = [[a.at[0, real:].set(37) if i == 0 else a for i, a in enumerate(r)]
           for r, (_, real) in zip(padded, sides)]
  short = [[a[:, :real] for a in r] for r, (_, real) in zip(padded, sides)]
  want = stats(*short)
  for got in (stats(*padded), stats(*other)):
    for name in moe.STATS:
      assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), (name, got, want)


def moe_sums_of(leaves) -> dict:
  """Each statistic summed over the MoE layers (both stacks of an encoder-decoder)."""
  out = {}
  for path, leaf in leaves:
    name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    out[name] = out.get(name, 0.0) + jnp.sum(leaf)
  return out


def test_capacity_never_lets_the_future_in():
  """A decoder with drops (capacity factor 1, top-2 of 4): changing token s, or the padding
  that ends a packed row, changes no logit before s (GShard's order let a later token's first
  choice take an earlier token's second-choice slot: 7e-3 of change)."""
  from transformer_jax.models.decoder import DecoderLM  # pylint: disable=g-import-not-at-top
  cfg = _cfg(expert_capacity_factor=1.0, num_layers=1, vocab_size=64, max_len=16,
             num_heads=4, num_kv_heads=4, head_dim=8, position="rotary")
  model, t = DecoderLM(cfg), 16
  params = nn.unbox(model.init(jax.random.key(1), jnp.zeros((1, t), jnp.int32))["params"])
  apply = jax.jit(lambda tokens, seg, pos: model.apply(
      {"params": params}, tokens, seg, pos, mutable=["moe"]))
  edits = np.eye(t, dtype=np.int32) * 13  # row s changes token s only
  seg = np.ones((t, t), np.int32)
  seg[:, 10:] = 0  # rows whose last 6 tokens are padding ...
  pos = np.where(seg > 0, np.arange(t), 0)
  worst, dropped = 0.0, 0.0
  for seed in range(12):
    tokens = np.random.default_rng(seed).integers(0, 64, (1, t))
    base, sown = apply(jnp.asarray(tokens), jnp.ones((1, t), jnp.int32), jnp.arange(t)[None])
    dropped = max(dropped, float(sown["moe"]["layer_0"]["mlp"]["dropped"][0]))
    out, _ = apply(jnp.asarray((tokens + edits) % 64), jnp.ones((t, t), jnp.int32),
                   jnp.broadcast_to(jnp.arange(t), (t, t)))
    out, base = np.asarray(out), np.asarray(base)  # (in numpy: no op compiled per slice)
    for s in range(1, t):
      worst = max(worst, float(np.abs(out[s, :s] - base[0, :s]).max()))
    padded = [np.asarray(apply(jnp.asarray(x), jnp.asarray(seg[:1]), jnp.asarray(pos[:1]))[0])
              for x in (tokens, (tokens + 29 * (seg[:1] == 0)) % 64)]  # ... whatever they hold
    worst = max(worst, float(np.abs(padded[0][0, :10] - padded[1][0, :10]).max()))
  assert dropped > 0.1 and worst < 1e-6, (dropped, worst)


@pytest.mark.parametrize("factor, t", [(1.0, 16), (0.5, 12), (1.25, 9)])
def test_capacity_drops_what_the_formula_says(factor, t):
  """Every token routed to experts 0 then 1: each takes C = ceil(t k factor / E) tokens of a row,
  the first C, and the output of the dropped rest is zero (the residual carries them)."""
  cfg = _cfg(expert_capacity_factor=factor)
  module, params, x = _layer(cfg, t=t)
  params["router"] = jnp.zeros_like(params["router"]).at[:, 0].set(5.0).at[:, 1].set(4.0)
  x = jnp.abs(x) + 1.0  # positive inputs: every token prefers expert 0, then 1
  cap = -(-t * 2 * factor // 4)
  assert moe.capacity(cfg, t) == cap
  y, sown = _apply(module, mutable=["moe"])(params, x)
  assert float(sown["moe"]["dropped"][0]) == pytest.approx(1 - 2 * cap / (2 * t))
  dense = moe.MoE(dataclasses.replace(cfg, expert_capacity_factor=0.0))
  ref = _apply(dense)(params, x)
  np.testing.assert_allclose(y[:, :int(cap)], ref[:, :int(cap)], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(y[:, int(cap):]).max()) == 0.0


def test_capacity_is_exact_and_padding_alone_drops_nothing():
  """ceil(100 x 1 x 1.1 / 2) is 55 slots (floats said 110.00000000000001 / 2: 56); a capacity
  layer that sees only padding reports 0 dropped, as the dropless one does (it said 100 %)."""
  assert moe.capacity(_cfg(num_experts=2, experts_per_token=1, expert_capacity_factor=1.1),
                      100) == 55
  assert moe.capacity(_cfg(num_experts=8, experts_per_token=2, expert_capacity_factor=2.2),
                      100) == 55
  for factor in (1.0, 0.0):
    module, params, x = _layer(_cfg(expert_capacity_factor=factor))
    _, sown = _apply(module, mutable=["moe"],
                     segment_ids_BT=jnp.zeros(x.shape[:2], jnp.int32))(params, x)
    assert float(sown["moe"]["dropped"][0]) == 0.0, factor


def test_router_losses_equal_their_formulas_and_reach_the_router():
  cfg = _cfg(num_experts=6, experts_per_token=2)
  module, params, x = _layer(cfg, b=2, t=16)
  # Uniform routing (a zero router): Switch's loss is exactly 1 whatever the top-k picks.
  zero = dict(params, router=jnp.zeros_like(params["router"]))
  apply = _apply(module, mutable=["moe"])
  _, sown = apply(zero, x)
  assert float(sown["moe"]["aux_loss"][0]) == pytest.approx(1.0, abs=1e-6)
  assert float(sown["moe"]["z_loss"][0]) == pytest.approx(np.log(6) ** 2, rel=1e-6)
  # Any routing: E * sum_e f_e P_e and mean(logsumexp^2), recomputed here.
  logits = np.asarray(x, np.float64).reshape(-1, 32) @ np.asarray(params["router"], np.float64)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  top = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
  share = np.bincount(top.ravel(), minlength=6) / top.size
  _, sown = apply(params, x)
  assert float(sown["moe"]["aux_loss"][0]) == pytest.approx(
      6 * np.sum(share * probs.mean(0)), rel=1e-5)
  lse = np.log(np.exp(logits).sum(-1))
  assert float(sown["moe"]["z_loss"][0]) == pytest.approx(np.mean(lse ** 2), rel=1e-5)
  assert float(sown["moe"]["load"][0]) == pytest.approx(
      np.bincount(top.ravel(), minlength=6).max() / (top.size / 6), rel=1e-6)
  for name in ("aux_loss", "z_loss"):
    g = jax.jit(jax.grad(lambda p, name=name: apply(p, x)[1]["moe"][name][0]))(params)
    assert float(jnp.abs(g["router"]).sum()) > 0, name


def test_shared_experts_add_a_dense_ffn():
  cfg = _cfg(num_shared_experts=2, shared_expert_gate=True)
  module, params, x = _layer(cfg)
  routed = moe.MoE(dataclasses.replace(cfg, num_shared_experts=0))
  y_routed = _apply(routed)({k: v for k, v in params.items()
                             if k not in ("shared", "shared_gate")}, x)
  shared = _apply(layers.MLP(cfg, d_ff=2 * cfg.d_ff))(params["shared"], x)
  gate = jax.nn.sigmoid(x @ params["shared_gate"])
  np.testing.assert_allclose(_apply(module)(params, x), y_routed + shared * gate,
                             rtol=1e-5, atol=1e-6)
  assert params["shared"]["up"].shape == (32, 96)


# ------------------------------------------------------------------------- training on a mesh
def _tiny(*overrides):
  """configs/gpt2.py:tiny with one (MoE) layer: a second alike doubled each compile."""
  return config_lib.load(f"{REPO}/configs/gpt2.py:tiny", [
      "model.num_layers=1", "model.num_experts=4", "model.experts_per_token=2",
      "model.router_aux_loss=0.01", "model.router_z_loss=0.001", *overrides])


@functools.lru_cache(maxsize=2)
def _one_device_reference(capacity):
  """test_expert_parallel_training_equals_one_device's reference (and, at capacity 0,
  test_logged_loss_is_the_tokens_and_the_router_losses_train's): 3 steps on one device, run
  once per capacity factor."""
  config = _tiny(f"model.expert_capacity_factor={capacity}")
  return run_steps(config, jax.devices()[:1], random_batches(config, 3))


@pytest.mark.parametrize("mesh, capacity", [
    ({"expert": 4}, 0.0), ({"expert": 2, "fsdp": 2, "tensor": 2}, 0.0),
    ({"expert": 4, "data": 2}, 1.0),
    ({"expert": 2, "sequence": 2, "tensor": 2}, 1.0)])
def test_expert_parallel_training_equals_one_device(mesh, capacity):
  """The same 3 steps on 1 device and on a mesh with an expert axis: losses within 1e-5."""
  extra = [f"model.expert_capacity_factor={capacity}"]
  batches = random_batches(_tiny(*extra), 3)
  ref, ref_params = _one_device_reference(capacity)
  sizes = {"data": 1, **mesh}
  n = int(np.prod(list(sizes.values())))
  got, params = run_steps(_tiny(*extra, *[f"mesh.{k}={v}" for k, v in sizes.items()]),
                          jax.devices()[:n], batches)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  assert len(set(ref)) == len(ref)


def test_experts_are_sharded_over_the_expert_axis():
  from transformer_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top
  config = _tiny("mesh.expert=4", "mesh.data=2")
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:8]))
  spec = trainer.state_shardings.params["layer_0"]["mlp"]["up"].spec
  assert spec[0] == "expert"
  assert trainer.batch_sharding.spec[0] == ("data", "fsdp", "expert")
  text = trainer.lower_train_step().compile().as_text()
  assert "all-gather" in text and "reduce-scatter" in text


@pytest.mark.parametrize("override, message", [
    ("model.experts_per_token=5", "model.experts_per_token=5 exceeds model.num_experts=4"),
    ("model.shared_expert_gate=True", "model.shared_expert_gate gates the shared experts"),
    ("model.expert_capacity_factor=-1.0", "model.expert_capacity_factor must be >= 0"),
    ("mesh.expert=3", "model.num_experts=4 is not divisible by mesh.expert=3"),
    ("model.scan_layers=True", "model.scan_layers needs every layer alike"),
])
def test_bad_moe_configs_fail_in_one_line(override, message):
  extra = ["model.moe_every=2", "model.num_layers=2"] if "scan" in override else []
  config = _tiny(override, *extra, "mesh.data=1")
  with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as e:
    config_lib.validate(config, num_devices=3 if "expert=3" in override else 1)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("recipe, extra", [
    ("configs/bert.py:tiny", ["model.num_experts=4", "model.experts_per_token=1",
                              "model.expert_capacity_factor=1.25", "model.num_layers=1"]),
    ("configs/switch.py:tiny", ["model.num_layers=2", "model.num_decoder_layers=2"]),
    ("configs/mixtral.py:tiny", ["model.scan_layers=True", "train.microbatches=2",
                                 "model.num_shared_experts=1", "model.router_jitter=0.1"]),
])
def test_an_moe_model_of_every_family_trains(recipe, extra):
  """A few steps on one batch bring the loss down; the router metrics are logged per step."""
  from transformer_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top
  from tests.conftest import synthetic_batch  # pylint: disable=g-import-not-at-top
  config = config_lib.load(f"{REPO}/{recipe}", extra + ["data.seq_len=32", "model.max_len=32",
                                                        "train.batch_size=4",
                                                        "optimizer.warmup_steps=0",
                                                        "optimizer.learning_rate=3e-3"])
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  state = trainer.init_state(0)
  batch = trainer.put_batch(synthetic_batch(config))
  losses = []
  for _ in range(6):
    state, m = trainer.train_step(state, batch, jax.random.key(1))
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 0.1, losses
  assert 0.9 < float(m["moe_aux_loss"]) < float(config.model.num_experts)
  assert 1.0 <= float(m["moe_expert_load"]) <= config.model.num_experts
  assert 0.0 <= float(m["moe_dropped_fraction"]) < 1.0


def test_logged_loss_is_the_tokens_and_the_router_losses_train():
  """The logged loss (and eval_loss) leave the router losses out; their weights change the
  update: _tiny's (0.01 and 0.001; _one_device_reference's run, shared with
  test_expert_parallel_training_equals_one_device) against 1.0 each, over the same 3 batches."""
  config = _tiny("model.expert_capacity_factor=0.0", "model.router_aux_loss=1.0",
                 "model.router_z_loss=1.0")
  runs = [_one_device_reference(0.0),
          run_steps(config, jax.devices()[:1], random_batches(config, 3))]
  assert runs[0][0][0] == pytest.approx(runs[1][0][0], rel=1e-6)  # step 1: same parameters
  router = [r[1]["layer_0"]["mlp"]["router"] for r in runs]
  assert float(np.abs(router[0] - router[1]).max()) > 1e-5


def test_resume_equals_uninterrupted_and_restores_onto_another_expert_size(tiny_data, tmp_path):
  """6 steps on one device vs 3 with mesh.expert=4 (x data 2), resumed for 3 more with
  mesh.expert=2: every logged loss within 1e-5, the checkpoint restoring across sizes."""
  import json  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_overrides  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import loop  # pylint: disable=g-import-not-at-top

  def run(workdir, devices, stop_after=None, **mesh):
    extra = {"train.steps": 6, "train.log_every": 1, "checkpoint.every_steps": 3,
             "eval.every_steps": 0, "model.num_experts": 4, "model.experts_per_token": 2,
             "train.batch_size": 8, "model.num_layers": 1,
             **{f"mesh.{k}": v for k, v in mesh.items()}}
    config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data, **extra))
    loop.train(config, str(workdir), quiet=True, devices=jax.devices()[:devices],
               stop_after=stop_after)
    with open(workdir / "metrics.jsonl") as f:
      return {r["step"]: r for r in map(json.loads, f) if "loss" in r}

  want = run(tmp_path / "one", 1)
  got = run(tmp_path / "ep", 8, stop_after=3, data=2, expert=4)
  assert sorted(got) == [1, 2, 3]
  got = run(tmp_path / "ep", 4, data=2, expert=2)
  assert sorted(got) == sorted(want) == list(range(1, 7))
  for step, row in want.items():
    for key in ("loss", "moe_aux_loss", "moe_expert_load"):
      assert got[step][key] == pytest.approx(row[key], rel=1e-5), (step, key)


def test_mixtral_8x7b_has_the_published_parameter_counts():
  """46.7B parameters and 12.9B active per token (Jiang et al. 2024); the FLOPs count the
  active ones: matmul_params leaves out the untied token table (a lookup), 32000 x 4096."""
  from transformer_jax.models import families  # pylint: disable=g-import-not-at-top
  from transformer_jax.perf import counting  # pylint: disable=g-import-not-at-top
  config = config_lib.load(f"{REPO}/configs/mixtral.py:8x7b")
  params = families.abstract_params(families.build_model(config))
  total, _, active = counting.param_counts(params, config.model)
  assert total == 46_702_792_704  # MixtralForCausalLM's num_parameters()
  assert round((active + 32000 * 4096) / 1e9, 1) == 12.9
  experts = sum(int(np.prod(params["layers"]["mlp"][n].shape)) for n in ("gate", "up", "down"))
  assert total - active - 32000 * 4096 == experts * 6 // 8
