"""The train step: accumulation == big batch, sharded == unsharded, schedules, decay mask."""

import functools
import platform
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.models import families
from transformer_jax.parallel import sharding
from transformer_jax.perf import compiler
from transformer_jax.perf import hardware
from transformer_jax.perf import hlo
from transformer_jax.training import optimizer
from transformer_jax.training.step import Trainer
from tests.conftest import REPO


def tiny_config(*overrides):
  """configs/gpt2.py:tiny with one layer and a vocabulary of 512 (what these checks hold for
  does not depend on the depth or the vocabulary; a second unrolled layer doubled each compile,
  and 8192 logits a token tripled a step of 8 devices), then `overrides`."""
  return config_lib.load(f"{REPO}/configs/gpt2.py:tiny", ["model.num_layers=1",
                                                          "model.vocab_size=512", *overrides])


def random_batches(config, n, seed=0):
  rng = np.random.default_rng(seed)
  b, t, v = config.train.batch_size, config.data.seq_len, config.model.vocab_size
  out = []
  for _ in range(n):
    x = rng.integers(0, v, (b, t + 1)).astype(np.int32)
    # Two packed segments per row and some padding, like the real pipeline's rows.
    seg = np.where(np.arange(t) < t // 2, 1, 2)[None].repeat(b, 0).astype(np.int32)
    seg[:, -5:] = 0
    pos = np.where(seg == 1, np.arange(t), np.arange(t) - t // 2).astype(np.int32)
    pos[seg == 0] = 0
    w = ((seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)).astype(np.float32)
    out.append({"inputs": x[:, :-1], "targets": x[:, 1:], "segment_ids": seg, "positions": pos,
                "weights": np.concatenate([w, np.zeros((b, 1), np.float32)], axis=1)})
  return out


def run_steps(config, devices, batches):
  trainer = Trainer(config, sharding.make_mesh(config, devices))
  state = trainer.init_state(config.seed)
  losses = []
  for b in batches:
    state, m = trainer.train_step(state, trainer.put_batch(b), jax.random.key(0))
    losses.append(float(m["loss"]))
  return losses, jax.device_get(state.params)


def test_accumulation_equals_big_batch():
  batches = random_batches(tiny_config(), 2)
  big_losses, big = run_steps(tiny_config(), jax.devices()[:1], batches)
  acc_losses, acc = run_steps(tiny_config("train.microbatches=4"), jax.devices()[:1], batches)
  np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)  # fp32 summation order only
  for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(big)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_a_sentence_pair_head_accumulates_to_the_big_batch():
  """BERT with SOP over microbatches of very different masked-token counts: the pair loss is
  the mean over all the step's pairs, as with one batch (each microbatch's own mean, weighted by
  its tokens, gave its pairs 4/68 of the weight instead of 1/2)."""
  from transformer_jax.data import objectives  # pylint: disable=g-import-not-at-top

  def cfg(*more):
    return config_lib.load(f"{REPO}/configs/bert.py:tiny", [
        "model.d_model=32", "model.num_heads=4", "model.d_ff=64", "model.vocab_size=128",
        "model.head_dim=8", "model.max_len=32", "data.seq_len=32", "train.batch_size=4",
        "model.num_layers=1", "model.sentence_head=true", "data.sentence_pair=sop",
        "optimizer.warmup_steps=0", *more])
  trainer = Trainer(cfg(), sharding.make_mesh(cfg(), jax.devices()[:1]))
  batch = objectives.synthetic_batch(trainer.objective, 4, 128, seed=0)
  batch["weights"][:] = 0
  batch["weights"][[0, 2], :2] = 1  # microbatch 0 (rows 0, 2): 4 targets; microbatch 1: 64
  batch["weights"][[1, 3], :] = 1
  batch["sentence_weights"][:] = 0
  batch["sentence_weights"][:, 0] = 1
  batch["sentence_labels"][:] = np.array([[0], [1], [0], [1]])
  figures = []
  for c in (cfg(), cfg("train.microbatches=2")):
    t = Trainer(c, sharding.make_mesh(c, jax.devices()[:1]))
    _, m = t.train_step(t.init_state(0), t.put_batch(batch), jax.random.key(0))
    figures.append((float(m["loss"]), float(m["grad_norm"]), float(m["cross_entropy"])))
  np.testing.assert_allclose(figures[1], figures[0], rtol=1e-5)
  # beside the loss (with the pair loss) the tokens' plain cross-entropy: eval_loss's figure
  eval_loss = t.evaluate(t.init_state(0).params, [batch])["eval_loss"]
  assert figures[0][2] == pytest.approx(eval_loss, rel=1e-5) and figures[0][2] < figures[0][0]


def test_bf16_parameters_accumulate_their_gradients_in_fp32():
  """With model.param_dtype=bfloat16 the microbatches' gradients are summed in fp32 (bf16 sums
  lost precision with every microbatch) and the update gets the parameters' dtype back."""
  config = tiny_config("model.param_dtype=bfloat16", "train.microbatches=2")
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  state = trainer.init_state(0)
  batch = trainer.put_batch(random_batches(config, 1)[0])
  accumulate = trainer._accumulate  # pylint: disable=protected-access
  _, _, grads, _ = jax.eval_shape(accumulate, state.params, batch, jax.random.key(0), state.step,
                                  None)
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  new, metrics = trainer.train_step(state, batch, jax.random.key(0))
  assert jax.tree.map(lambda a: a.dtype, new) == jax.tree.map(lambda a: a.dtype, state)
  assert np.isfinite(float(metrics["loss"]))


@functools.lru_cache(maxsize=1)
def _single_device_reference():
  """test_sharded_equals_single_device's reference: its 3 steps on one device, run once."""
  return run_steps(tiny_config(), jax.devices()[:1], random_batches(tiny_config(), 3))


@pytest.mark.parametrize("mesh", [(8, 1, 1, 1), (1, 8, 1, 1), (2, 1, 4, 1), (1, 2, 2, 2),
                                  (2, 2, 1, 2, 2), (2, 1, 2, 2, 2)])
def test_sharded_equals_single_device(mesh):
  """The same 3 steps on 1 device and on 8 simulated devices (data, fsdp, sequence: ring
  attention, tensor; then microbatches, which each data shard accumulates on its own):
  losses within 1e-5 relative, and the parameters they reach."""
  if jax.device_count() < 8:
    pytest.fail("needs 8 simulated CPU devices (tests/conftest.py sets XLA_FLAGS)")
  batches = random_batches(tiny_config(), 3)
  ref, ref_params = _single_device_reference()
  d, f, s, t, m = (*mesh, 1)[:5]
  got, params = run_steps(tiny_config(f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.sequence={s}",
                                      f"mesh.tensor={t}", f"train.microbatches={m}"),
                          jax.devices()[:8], batches)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  assert len(set(ref)) == len(ref)  # the steps really changed the parameters


@pytest.mark.parametrize("kv_heads, mesh", [(1, (4, 2)), (2, (2, 4))])
def test_fewer_key_value_heads_than_mesh_tensor_are_kept_whole_not_refused(kv_heads, mesh):
  """MQA, or GQA under a wider mesh.tensor (Llama-70B's 8 KV heads on tensor 16): the key and
  value projections stay whole on every device (their dimension used to be refused as not
  divisible), the query heads are split; the steps equal one device's."""
  overrides = [f"model.num_kv_heads={kv_heads}"]
  batches = random_batches(tiny_config(*overrides), 3)
  ref, ref_params = run_steps(tiny_config(*overrides), jax.devices()[:1], batches)
  sharded = tiny_config(*overrides, f"mesh.data={mesh[0]}", f"mesh.tensor={mesh[1]}")
  trainer = Trainer(sharded, sharding.make_mesh(sharded, jax.devices()[:8]))
  attention = trainer.state_shardings.params["layer_0"]["attention"]
  assert "tensor" not in str(attention["key"].spec) + str(attention["value"].spec)
  assert "tensor" in str(attention["query"].spec)
  got, params = run_steps(sharded, jax.devices()[:8], batches)
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_a_vocabulary_mesh_tensor_does_not_divide_gets_the_padding_that_fixes_it():
  odd = tiny_config("model.vocab_size=8191", "mesh.data=4", "mesh.tensor=2")
  with pytest.raises(ConfigError, match=r"embed/tokens dim 8191 is not divisible by mesh axes "
                                        r"tensor .*, or pad model.vocab_size to 8192 with "
                                        r"model.output_vocab=8191"):
    Trainer(odd, sharding.make_mesh(odd, jax.devices()[:8]))
  padded = tiny_config("model.vocab_size=8192", "model.output_vocab=8191", "mesh.data=4",
                       "mesh.tensor=2")
  Trainer(padded, sharding.make_mesh(padded, jax.devices()[:8]))


def _loop_all_reduces(trainer) -> int:
  """All-reduces inside the compiled train step's while loops (the microbatch scan's body)."""
  comps, _ = hlo.computations(trainer.lower_train_step().compile().as_text())
  ops = [i for lines in comps.values() for i in map(hlo.instruction, lines) if i]
  bodies = {b for i in ops if i.op == "while" for b in re.findall(r"body=%?([\w.\-]+)", i.args)}
  return sum(1 for name in bodies for i in map(hlo.instruction, comps[name])
             if i and i.op.startswith("all-reduce"))


def test_data_shards_all_reduce_the_gradients_once_per_step_not_per_microbatch():
  """With gradient accumulation each data shard sums its own microbatches' gradients and the
  sum is all-reduced once (for a multi-slice mesh that is the DCN's traffic), where XLA would
  all-reduce every microbatch's. An MoE model (its balance losses are batch statistics) and a
  sentence head (its loss a mean per microbatch) keep the global form; an MLM encoder does not."""
  config = tiny_config("mesh.data=8", "train.microbatches=4", "train.batch_size=32")
  mesh = sharding.make_mesh(config, jax.devices()[:8])
  trainer = Trainer(config, mesh)
  assert trainer._defer_data_reduce  # pylint: disable=protected-access
  assert _loop_all_reduces(trainer) == 0
  trainer = Trainer(config, mesh)
  trainer._defer_data_reduce = False  # pylint: disable=protected-access
  assert _loop_all_reduces(trainer) == 1  # the gradients', every trip
  for spec, extra in (("mixtral.py:tiny", []),
                      ("bert.py:tiny", ["model.sentence_head=True", "data.sentence_pair=nsp"])):
    other = config_lib.load(f"{REPO}/configs/{spec}", ["mesh.data=8", "train.microbatches=2",
                                                       "train.batch_size=16"] + extra)
    other_trainer = Trainer(other, sharding.make_mesh(other, jax.devices()[:8]))
    assert not other_trainer._defer_data_reduce, spec  # pylint: disable=protected-access
  mlm = config_lib.load(f"{REPO}/configs/bert.py:tiny", ["mesh.data=8", "train.microbatches=2",
                                                         "train.batch_size=16"])
  mlm_trainer = Trainer(mlm, sharding.make_mesh(mlm, jax.devices()[:8]))
  assert mlm_trainer._defer_data_reduce  # pylint: disable=protected-access


def test_each_data_shards_accumulation_equals_the_global_one_on_a_scanned_stack():
  """A scanned Llama stack (its gradients summed over the shards layer by layer) with FSDP:
  the per-shard accumulation's step equals the global one's."""
  config = config_lib.load(f"{REPO}/configs/llama.py:tiny", [
      "model.scan_layers=True", "model.remat=full", "mesh.data=4", "mesh.fsdp=2",
      "train.microbatches=2", "train.batch_size=16"])
  batch = random_batches(config, 1)[0]
  out = []
  for defer in (True, False):
    trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:8]))
    assert trainer._defer_data_reduce  # pylint: disable=protected-access
    trainer._defer_data_reduce = defer  # pylint: disable=protected-access
    state, m = trainer.train_step(trainer.init_state(0), trainer.put_batch(batch),
                                  jax.random.key(0))
    out.append((float(m["loss"]), float(m["grad_norm"]), jax.device_get(state.params)))
  (loss, norm, params), (ref_loss, ref_norm, ref_params) = out
  assert loss == pytest.approx(ref_loss, rel=1e-6) and norm == pytest.approx(ref_norm, rel=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_params_are_sharded_on_the_mesh():
  config = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:8]))
  up = trainer.state_shardings.params["layer_0"]["mlp"]["up"]
  assert up.spec == jax.sharding.PartitionSpec(("fsdp", "sequence"), "tensor")
  assert trainer.batch_sharding.spec[0] == ("data", "fsdp", "expert")


def test_padding_never_reaches_the_loss():
  config = tiny_config()
  batch = random_batches(config, 1)[0]
  other = {k: v.copy() for k, v in batch.items()}
  pad = batch["segment_ids"] == 0
  other["inputs"][pad] = 7
  other["targets"][batch["weights"] == 0] = 3
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  state = trainer.init_state(0)
  s1 = trainer._eval(state.params, trainer.put_batch(batch))  # pylint: disable=protected-access
  s2 = trainer._eval(state.params, trainer.put_batch(other))  # pylint: disable=protected-access
  assert float(s1["weight"]) == float(s2["weight"]) == float(batch["weights"].sum())
  np.testing.assert_allclose(float(s1["loss"]), float(s2["loss"]), rtol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "linear", "rsqrt", "wsd", "constant"])
def test_schedules_warm_up_then_decay(kind):
  config = tiny_config(f"optimizer.schedule={kind}", "optimizer.warmup_steps=10",
                       "optimizer.learning_rate=1.0", "train.steps=100")
  lr = optimizer.schedule(config.optimizer, config.train.steps)
  values = np.array([float(lr(s)) for s in range(101)])
  assert values[0] == 0.0 and abs(values[10] - 1.0) < 1e-6
  assert np.all(np.diff(values[:11]) > 0)
  assert np.all(np.diff(values[10:]) <= 1e-7)
  if kind in ("cosine", "linear", "wsd"):
    assert abs(values[100] - 0.1) < 1e-3  # min_lr_ratio
  if kind == "wsd":  # 18 steps of cool-down, the last trained one (99) at the final lr
    assert values[81] == 1.0 and values[82] < 1.0 and abs(values[99] - 0.1) < 1e-6
    short = tiny_config("optimizer.schedule=wsd", "optimizer.warmup_steps=10",
                        "optimizer.wsd_decay_fraction=0.1", "train.steps=20")
    lr = optimizer.schedule(short.optimizer, 20)  # a cool-down of one step: step 19, at 0.1x
    assert float(lr(18)) == pytest.approx(short.optimizer.learning_rate)
    assert float(lr(19)) == pytest.approx(0.1 * short.optimizer.learning_rate)


def test_decay_mask_skips_biases_norms_and_embeddings():
  config = tiny_config()
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  params = trainer.init_state(0).params
  mask = optimizer.decay_mask(params, decay_embeddings=False)
  assert mask["layer_0"]["mlp"]["up"] and mask["layer_0"]["attention"]["query"]
  assert not mask["layer_0"]["mlp"]["up_bias"] and not mask["layer_0"]["attention_norm"]["scale"]
  assert not mask["embed"]["tokens"] and not mask["embed"]["positions"]
  assert optimizer.decay_mask(params, decay_embeddings=True)["embed"]["tokens"]
  # Every family, scanned or not: biases of any shape, norm scales and tables by their names.
  for recipe, extra in (("gpt2", []), ("bert", []), ("t5", ["model.scan_layers=true"]),
                        ("mixtral", []), ("switch", ["model.scan_layers=true"])):
    c = config_lib.load(f"{REPO}/configs/{recipe}.py:tiny", extra)
    shapes = families.abstract_params(families.build_model(c))
    for path, decayed in jax.tree_util.tree_leaves_with_path(optimizer.decay_mask(shapes, False)):
      names = [k.key for k in path]
      table = names[0] == "embed" and names[-1] in ("tokens", "positions", "types")
      assert decayed != (names[-1] == "scale" or names[-1].endswith("bias") or table), names
  key_bias = trainer.abstract_state.params["layer_0"]["attention"]["key_bias"]
  assert key_bias.ndim == 2 and not mask["layer_0"]["attention"]["key_bias"]  # [H, K]
  # Decoupled decay really is applied to masked-in leaves only.
  tx, _ = optimizer.make(config.optimizer, 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(zeros, params)  # (one compile)
  assert float(jnp.abs(upd["embed"]["tokens"]).max()) == 0.0


def test_train_cpu_onednn_runs_a_cpu_steps_dots_as_onednn_matmuls(monkeypatch):
  """perf/compiler.py's options reach the compiled train step (on an x86-64 host) and the
  benchmark's peak, whose source says so; by default XLA keeps its own dots."""
  def trainer(*overrides):
    config = tiny_config(*overrides)
    return Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  on = trainer("train.cpu_onednn=true")
  x86 = platform.machine().lower() in compiler.X86
  assert ("__onednn_fusion" in on.lower_train_step().compile().as_text()) == x86
  assert (on.compiler_options == compiler.ONEDNN) == x86
  assert "__onednn_fusion" not in trainer().lower_train_step().compile().as_text()
  monkeypatch.setattr(hardware, "measure_cpu_peak", lambda dtype, options=None: 1e11)
  sources = [hardware.peak_flops_per_device("float32", o)[1] for o in (compiler.ONEDNN, None)]
  assert sources == ["measured:cpu_matmul:onednn", "measured:cpu_matmul"]


def test_the_compiler_options_are_for_x86_cpus_and_yield_to_xla_flags(monkeypatch):
  on = tiny_config("train.cpu_onednn=true")
  monkeypatch.setattr(compiler.host, "machine", lambda: "x86_64")
  assert compiler.options(on, "cpu", environ={}) == compiler.ONEDNN
  assert compiler.options(on, "cpu", environ={"XLA_FLAGS": "--xla_cpu_use_onednn=false"}) is None
  assert compiler.options(on, "cpu", environ={"XLA_FLAGS": "--xla_force_host_platform_device_"
                                              "count=8"}) == compiler.ONEDNN
  assert compiler.options(on, "gpu", environ={}) is None
  assert compiler.options(on, "tpu", environ={}) is None
  assert compiler.options(tiny_config(), "cpu", environ={}) is None  # off by default
  monkeypatch.setattr(compiler.host, "machine", lambda: "aarch64")
  assert compiler.options(on, "cpu", environ={}) is None
