"""Corners that were implemented but never asserted: dropout, global-norm clipping, top-k and
top-p filtering, label smoothing at known logits; generation's left-padded batches."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.inference import sampling
from transformer_jax.parallel import sharding
from transformer_jax.training import optimizer
from transformer_jax.training.step import Trainer, loss_parts, token_loss
from tests.conftest import REPO, TINY_MODEL
from tests.test_step import random_batches


def test_dropout_trains_noisy_per_step_and_is_off_in_eval_and_sampling():
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", ["model.dropout_rate=0.3"])
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  state = trainer.init_state(0)
  batch = trainer.put_batch(random_batches(config, 1)[0])
  loss = lambda s, rng: float(trainer.train_step(s, batch, rng)[1]["loss"])
  # train_step donates the state: every call gets a fresh copy.
  fresh = lambda: jax.tree.map(jnp.copy, state)
  a, b, c = loss(fresh(), jax.random.key(1)), loss(fresh(), jax.random.key(1)), loss(
      fresh(), jax.random.key(2))
  assert a == b and a != c  # deterministic per seed; another seed, another mask
  later = fresh().replace(step=jnp.asarray(5, jnp.int32))
  assert loss(later, jax.random.key(1)) != a  # the mask changes with the step
  # Evaluation and sampling run deterministic: the same as the dropout-free model.
  plain = trainer.model.clone(cfg=dataclasses.replace(trainer.model.cfg, dropout_rate=0.0))
  host = jax.device_get(batch)
  ev = [float(loss_parts(m, state.params, host, task=trainer.task)[0])
        for m in (trainer.model, plain)]
  assert ev[0] == ev[1]
  assert float(loss_parts(trainer.model, state.params, host, task=trainer.task,
                          dropout_rng=jax.random.key(0))[0]) != ev[0]
  prompt = [[5, 6, 7]]
  outs = [sampling.generate(m, state.params, prompt, 4, temperature=0.0)
          for m in (trainer.model, plain)]
  np.testing.assert_array_equal(outs[0], outs[1])


def test_global_norm_clipping_scales_the_gradient_before_adamw():
  opt = config_lib.load(f"{REPO}/configs/gpt2.py:tiny").optimizer
  opt.unlock()
  opt.update(grad_clip=0.5, weight_decay=0.0)
  tx, lr = optimizer.make(opt, 100)
  params = {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,))}
  grads = {"w": jnp.full((3, 4), 2.0), "b": jnp.arange(4.0)}
  norm = float(optax.tree.norm(grads))
  assert norm > 0.5
  got, _ = tx.update(grads, tx.init(params), params)
  clipped = jax.tree.map(lambda g: g * 0.5 / norm, grads)
  ref = optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=0.0)
  want, _ = ref.update(clipped, ref.init(params), params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  small = jax.tree.map(lambda g: g * 0.1 / norm, grads)  # under the threshold: untouched
  got, _ = tx.update(small, tx.init(params), params)
  want, _ = ref.update(small, ref.init(params), params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_top_k_and_top_p_keep_exactly_their_tokens():
  probs = np.array([[0.05, 0.5, 0.15, 0.3]])
  logits = jnp.log(jnp.asarray(probs))
  kept = lambda **kw: np.isfinite(np.asarray(sampling.filter_logits(logits, 1.0, **kw)))[0]
  assert kept(top_k=2, top_p=1.0).tolist() == [False, True, False, True]
  assert kept(top_k=3, top_p=1.0).tolist() == [False, True, True, True]
  # Nucleus: the fewest most likely tokens whose mass reaches p.
  assert kept(top_k=0, top_p=0.5).tolist() == [False, True, False, False]
  assert kept(top_k=0, top_p=0.8).tolist() == [False, True, False, True]
  assert kept(top_k=0, top_p=0.81).tolist() == [False, True, True, True]
  assert kept(top_k=0, top_p=0.01).tolist() == [False, True, False, False]  # always one
  out = jax.nn.softmax(sampling.filter_logits(logits, 1.0, top_k=0, top_p=0.8))
  np.testing.assert_allclose(out[0], [0, 0.5 / 0.8, 0, 0.3 / 0.8], rtol=1e-6)
  both = kept(top_k=1, top_p=0.9)  # top-k first, then the nucleus of what is left
  assert both.tolist() == [False, True, False, False]
  assert kept(top_k=9, top_p=1.0).all()  # k past the vocabulary: all (it was a traceback)


def test_sampling_filters_keep_what_transformers_keeps_with_ties():
  """Temperature, top-k then top-p as transformers' warpers, on logits with many ties: the same
  tokens kept with the same values (a tie at the nucleus' edge was kept whole, then its lower
  ids where transformers keeps the higher)."""
  torch = pytest.importorskip("torch")
  warpers = pytest.importorskip("transformers.generation.logits_process")
  rng = np.random.default_rng(0)
  for case in range(60):
    logits = rng.integers(-3, 3, (4, 12)).astype(np.float32) * (0.5 + case % 3)
    t, k, p = [1.0, 0.7, 2.0][case % 3], [0, 3, 20][case // 3 % 3], [0.3, 0.6, 0.9][case % 4 % 3]
    scores = torch.tensor(logits) / t
    if k:
      scores = warpers.TopKLogitsWarper(k)(None, scores)
    want = warpers.TopPLogitsWarper(p)(None, scores).numpy()
    got = np.asarray(sampling.filter_logits(jnp.asarray(logits), t, top_k=k, top_p=p))
    for g, w in zip(got, want):  # (the same tokens: of a tie at the edge, the higher ids)
      assert (np.isfinite(g) == np.isfinite(w)).all(), (case, g, w)
      np.testing.assert_allclose(g[np.isfinite(g)], w[np.isfinite(w)], rtol=1e-6)


@pytest.mark.parametrize("e, z", [(0.1, 1e-2), (0.3, 0.1), (0.0, 1e-2)])
def test_z_loss_keeps_its_weight_under_label_smoothing(e, z):
  """optax's smoothed cross-entropy + z logZ^2, loss and gradient (the z-term was mixed in before
  the smoothing and so weighted 1 - e)."""
  import optax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 11)) * 4)
  targets = jnp.asarray(rng.integers(0, 11, (2, 5)))
  ours = lambda lg: jnp.sum(token_loss(lg, targets, z, e)[0])
  def ref(lg):
    labels = optax.smooth_labels(jax.nn.one_hot(targets, 11), e)
    return jnp.sum(optax.softmax_cross_entropy(lg, labels)
                   + z * jnp.square(jax.nn.logsumexp(lg, axis=-1)))
  assert float(ours(logits)) == pytest.approx(float(ref(logits)), rel=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(ref)(logits), atol=1e-6)


@pytest.mark.parametrize("e", [0.0, 0.1, 0.3])
def test_label_smoothing_at_known_logits(e):
  """Logits (0, log 3) over V = 2 with target 1: p = (1/4, 3/4); the loss is
  (1 - e) (-log 3/4) + e * mean(-log p)."""
  logits = jnp.asarray([[[0.0, np.log(3.0)]]])
  got, plain = token_loss(logits, jnp.asarray([[1]]), 0.0, e)
  want = (1 - e) * -np.log(0.75) + e * 0.5 * (-np.log(0.25) - np.log(0.75))
  assert float(got[0, 0]) == pytest.approx(want, rel=1e-6)
  assert float(plain[0, 0]) == pytest.approx(-np.log(0.75), rel=1e-6)  # the cross-entropy


@pytest.mark.parametrize("extra", [
    {"position": "learned"},
    {"position": "relative", "attention_window": 3},
    {"position": "rotary", "num_kv_heads": 2, "window_pattern": "LG", "attention_window": 3,
     "scan_layers": True, "rope_scaling": "dynamic", "rope_factor": 2.0},
    {"family": "encdec", "position": "relative"},  # (its sources right-padded)
])
def test_prompts_of_several_lengths_left_padded_in_one_batch_generate_what_each_would_alone(
    extra):
  """Evaluation batches a bucket's prompts (one program per bucket, not one per prompt length):
  each row is left-padded, its padding a segment of its own that no token reads, its positions
  from 0 after it (in the cache too: windows, relative biases, dynamic RoPE's document length);
  an encoder-decoder's sources are right-padded, as scoring pads them."""
  from transformer_jax.models import families  # pylint: disable=g-import-not-at-top
  config = config_lib.base.get_config()
  config.model.update({"num_layers": 2, "d_model": 64, "num_heads": 4, "num_kv_heads": 4,
                       "head_dim": 16, "d_ff": 128, "vocab_size": 64, "max_len": 64, **extra})
  model = families.build_model(config)
  params = jax.jit(model.init)(jax.random.key(1), *families.init_inputs(model))["params"]
  # (peaked logits, no near ties; a relative bias that decides)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x * (300 if "relative" in jax.tree_util.keystr(p) else 3), params)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 64, n).tolist() for n in (5, 19, 1)]
  seq2seq = {"start_id": 0} if "family" in extra else {}
  alone = [sampling.generate(model, params, [p], 6, temperature=0.0, **seq2seq)[0]
           for p in prompts]
  assert sampling.generate(model, params, prompts, 6, temperature=0.0, pad_to=32,
                           **seq2seq) == alone
  assert len({tuple(a) for a in alone}) == 3  # (three answers, not one)
  if not seq2seq:
    with pytest.raises(ValueError, match="must be of one length"):  # (its prefix: both ways)
      sampling.generate(model, params, prompts, 2, temperature=0.0, prefix=True)


def _tiny_lm_eval_model():
  """lm-eval's model over a 1-layer decoder (vocab 64) with a character tokenizer."""
  pytest.importorskip("lm_eval")
  from transformer_jax.evaluation import lm_eval_adapter  # pylint: disable=g-import-not-at-top
  from transformer_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  from transformer_jax.models import families  # pylint: disable=g-import-not-at-top
  config = config_lib.base.get_config()
  config.model.update(num_layers=1, d_model=32, num_heads=2, num_kv_heads=2, head_dim=16,
                      d_ff=64, vocab_size=64, max_len=64)
  model = families.build_model(config)
  params = jax.jit(model.init)(jax.random.key(2), *families.init_inputs(model))["params"]
  params = jax.tree.map(lambda x: 3 * x, params)
  tok = types.SimpleNamespace(bos_id=1, eos_id=-1, pad_id=0,
                              encode=lambda t: [3 + ord(c) % 60 for c in t],
                              decode=lambda ids: "".join(chr(97 + i % 26) for i in ids))
  return lm_eval_adapter.TransformerJaxLM(text_model=scoring.TextModel(config, params, tok,
                                                                       batch_size=4))


def test_lm_eval_generation_requests_are_batched_by_their_gen_kwargs_and_length_buckets():
  """generate_until ran one request at a time, compiling once per prompt length (24 s for six
  prompts on a tiny model): the requests sharing gen_kwargs go together, a bucket's prompts in
  one program, each answer the one it gets alone, in the requests' order."""
  lm = _tiny_lm_eval_model()
  texts = ["".join(chr(97 + (3 * i + j) % 26) for i in range(n)) for j, n in
           enumerate((3, 11, 6, 14, 9, 2, 13))]
  kwargs = [{"until": ["q"], "max_gen_toks": 5}, {"until": "zz", "max_gen_toks": 7}]
  requests = [types.SimpleNamespace(args=(t, kwargs[j % 2])) for j, t in enumerate(texts)]
  before = sampling._generate._cache_size()  # pylint: disable=protected-access
  got = lm.generate_until(requests)
  # (two gen_kwargs, one bucket: 4 and 3 rows, the 3 filled to 4)
  assert sampling._generate._cache_size() - before <= 2  # pylint: disable=protected-access
  assert got == [lm.generate_until([r])[0] for r in requests]
  assert len(set(got)) > 3 and {len(g) for g in got[1::2]} == {7}  # ("zz" never written)


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_a_decoders_generation_longer_than_the_model_keeps_half_the_model_for_its_prompt(
    capsys, position):
  """lm-eval asks 256 new tokens by default: on a model of max_len 32 the prompt was cut to its
  last token (32 - 31), whatever it said. It keeps up to half the model (16 tokens here), the
  answer the rest, with a note (once); each prompt's own room: a long prompt in the call cut
  every other answer to its room. (Rotary positions: the rows of a bucket generated together,
  each cut to its room; learned ones cannot read past max_len: a program each room.)"""
  from transformer_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  from transformer_jax.models import families  # pylint: disable=g-import-not-at-top
  config = config_lib.base.get_config()
  config.model.update({**TINY_MODEL, "max_len": 32, "num_layers": 1, "position": position})
  config.data.update(add_bos=False)
  model = families.build_model(config)
  params = jax.jit(model.init)(jax.random.key(0), *families.init_inputs(model))["params"]
  tok = types.SimpleNamespace(bos_id=1, eos_id=-1, pad_id=0,
                              encode=lambda t: [3 + ord(c) % 200 for c in t],
                              decode=lambda ids: "".join(chr(97 + i % 26) for i in ids))
  lm = scoring.TextModel(config, params, tok, batch_size=1)
  text = "".join(chr(97 + i * 7 % 26) for i in range(40))
  assert lm.generate([text], max_new_tokens=256) == lm.generate([text[-16:]], max_new_tokens=16)
  assert len(lm.generate([text[:5]], max_new_tokens=256)[0]) == 32 - 5  # (a short prompt: more)
  # a long prompt in the same call cut every answer to its own room (16, not 27 and 22)
  prompts = [text[:5], text, text[3:13]]
  together = lm.generate(prompts, max_new_tokens=24)
  assert together == [lm.generate([p], max_new_tokens=24)[0] for p in prompts]
  assert [len(t) for t in together] == [24, 16, 22]
  assert capsys.readouterr().err.count(
      "note: generating at most 16 tokens, not 256: model.max_len=32 holds the prompt too") == 1


def test_lm_eval_sampling_requests_are_drawn_and_each_repeat_is_its_own_draw():
  """generate_until read only `until` and `max_gen_toks`: `do_sample` and `temperature` were
  dropped, so a task's `repeats` (pass@k, self-consistency) got one greedy answer k times. They
  are drawn now: 6 copies in two batches, 6 answers; the same seed, the same answers; top_k=1,
  temperature 0 or do_sample=False greedy, a temperature alone drawn (as lm-eval's hf model
  reads them); keys that would be ignored, num_beams > 1 and bad values refused in one line."""
  from transformer_jax.evaluation import lm_eval_adapter  # pylint: disable=g-import-not-at-top
  lm = _tiny_lm_eval_model()
  ask = lambda prompt, **kw: types.SimpleNamespace(  # pylint: disable=unnecessary-lambda-assignment
      args=(prompt, {"until": ["q"], "max_gen_toks": 6, **kw}))
  greedy = lm.generate_until([ask("abcdefg")])[0]
  drawn = {"do_sample": True, "temperature": 2.0}
  got = lm.generate_until([ask("abcdefg", **drawn)] * 6 + [ask("xyz", **drawn)])
  assert len(set(got[:6])) == 6 and greedy not in got[:6]
  again = lm_eval_adapter.TransformerJaxLM(text_model=lm.text_model)
  assert again.generate_until([ask("abcdefg", **drawn)] * 6 + [ask("xyz", **drawn)]) == got
  seeded = lm_eval_adapter.TransformerJaxLM(text_model=lm.text_model, seed="7")
  assert seeded.generate_until([ask("abcdefg", **drawn)] * 6) != got[:6]
  assert lm.generate_until([ask("abcdefg", **drawn, top_k=1), ask("abcdefg", temperature=0),
                            ask("abcdefg", do_sample=False, temperature=2.0),
                            ask("abcdefg", do_sample=True, temperature=0)]) == [greedy] * 4
  assert len(set(lm.generate_until([ask("abcdefg", temperature=2.0)] * 4))) == 4
  # (transformers' generate draws from the top 50 unless told: no top_k drew from all)
  read = lambda **kw: lm_eval_adapter._generation(  # pylint: disable=protected-access
      dict(drawn, max_gen_toks=3, **kw))[2]["top_k"]
  assert read() == 50 and read(top_k=0) == 0
  for kw, match in (({"num_beams": 4}, "num_beams: beam search is not offered"),
                    ({"repetition_penalty": 1.3}, "repetition_penalty: not read here"),
                    ({"do_sample": True, "temperature": -1}, "temperature=-1, top_k=None"),
                    ({"max_gen_toks": "many"}, "max_gen_toks='many' must be a whole number"),
                    ({"do_sample": True, "top_k": 2.5}, "do_sample=True, temperature=None, "
                                                        "top_k=2.5")):
    with pytest.raises(ConfigError, match=f"^generation_kwargs {match}"):
      lm.generate_until([ask("abcdefg", **kw)])
