"""The encoder-only (BERT) and encoder-decoder (T5, the original Transformer) families: the same
invariants as the decoder's (attention reaches exactly what it should, packed segments are
isolated, the KV cache matches the full forward, sharded equals unsharded), from one layer
library."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import config as config_lib
from transformer_jax.data import objectives
from transformer_jax.models import families
from transformer_jax.models import layers
from transformer_jax.models.encdec import EncoderDecoder
from transformer_jax.models.encoder import EncoderLM
from transformer_jax.parallel import sharding
from transformer_jax.training import step as step_lib
from tests.conftest import REPO, model_config, synthetic_batch

SMALL = dict(num_layers=2, d_model=32, num_heads=4, num_kv_heads=4, head_dim=8, d_ff=64,
             vocab_size=97, max_len=32, attention_chunks=2)
BERT = model_config(**SMALL, norm_position="post", type_vocab_size=2, embed_norm=True)
T5 = model_config(**dict(SMALL, num_decoder_layers=1), position="relative", norm="rmsnorm",
                 activation="geglu", use_bias=False, tie_embeddings=False, query_scale=1.0)
TRANSFORMER = model_config(**SMALL, position="sinusoidal", norm_position="post",
                          activation="relu", scale_embeddings=True)
ENCDEC = {"t5": T5, "transformer": TRANSFORMER}


def _ids(b, t, seed):
  return jnp.asarray(np.random.default_rng(seed).integers(3, 97, (b, t)), jnp.int32)


@functools.lru_cache(maxsize=None)
def _init(model):
  """The model's parameters (they do not depend on the inputs' shapes): one jitted
  initialisation per model config for every test (eagerly every op compiled on its own)."""
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), *families.init_inputs(model))["params"])


def _params(model):
  return jax.tree.map(lambda x: x, _init(model))  # (new dicts: tests edit theirs)


def _influence(f, x_TD):
  """|d f(x)_t / d x_s| summed over features: [T_out, T_in]."""
  return np.abs(np.asarray(jax.jit(jax.jacrev(f))(x_TD))).sum(-1)


def _with_inputs(params, table_key, x_TD):
  """Params whose embedding rows V.. are `x_TD`, so ids V + s feed exactly x_TD[s]."""
  embed = dict(params["embed"], tokens=jnp.concatenate([params["embed"]["tokens"], x_TD]))
  return dict(params, embed=embed)


def test_encoder_is_bidirectional_within_a_segment_only():
  model = EncoderLM(dataclasses.replace(BERT, vocab_size=97 + 10))
  params = _params(EncoderLM(BERT))
  params["mlm_bias"] = jnp.pad(params["mlm_bias"], (0, 10))
  seg = jnp.asarray([[1] * 4 + [2] * 6], jnp.int32)
  pos = jnp.asarray([list(range(4)) + list(range(6))], jnp.int32)
  x_TD = params["embed"]["tokens"][_ids(1, 10, 1)[0]]

  def out(x):
    logits = model.apply({"params": _with_inputs(params, "tokens", x)},
                         (97 + jnp.arange(10, dtype=jnp.int32))[None], seg, pos)
    return logits[0, :, :97].sum(-1)

  influence = _influence(out, x_TD)
  same = np.asarray(seg[0][:, None] == seg[0][None, :])
  assert influence[same].min() > 0, "a position ignores part of its own segment (both sides)"
  assert influence[~same].max() == 0, "attention leaks across packed segments"


@pytest.mark.parametrize("name", ENCDEC)
def test_encdec_decoder_is_causal_and_sees_only_its_own_segment(name):
  cfg = ENCDEC[name]
  enc, dec = _ids(1, 8, 0), _ids(1, 6, 1)
  params = _params(EncoderDecoder(cfg))
  model = EncoderDecoder(dataclasses.replace(cfg, vocab_size=97 + 8))
  if "logits" in params["embed"]:
    params["embed"]["logits"] = jnp.pad(params["embed"]["logits"], ((0, 0), (0, 8)))
  enc_seg = jnp.asarray([[1] * 5 + [2] * 3], jnp.int32)
  enc_pos = jnp.asarray([list(range(5)) + list(range(3))], jnp.int32)
  dec_seg = jnp.asarray([[1] * 4 + [2] * 2], jnp.int32)
  dec_pos = jnp.asarray([list(range(4)) + list(range(2))], jnp.int32)
  table = params["embed"]["tokens"]

  def from_decoder(x):  # decoder ids 97.. feed x
    logits = model.apply({"params": _with_inputs(params, "tokens", x)}, enc,
                         (97 + jnp.arange(6, dtype=jnp.int32))[None], enc_seg, enc_pos,
                         dec_seg, dec_pos)
    return logits[0, :, :97].sum(-1)

  def from_encoder(x):  # encoder ids 97.. feed x
    logits = model.apply({"params": _with_inputs(params, "tokens", x)},
                         (97 + jnp.arange(8, dtype=jnp.int32))[None], dec, enc_seg, enc_pos,
                         dec_seg, dec_pos)
    return logits[0, :, :97].sum(-1)

  causal = _influence(from_decoder, table[_ids(1, 8, 2)[0]])[:, :6]  # rows 6, 7 unused
  allowed = np.tril(np.ones((6, 6), bool)) & np.asarray(dec_seg[0][:, None] == dec_seg[0][None])
  assert causal[allowed].min() > 0 and causal[~allowed].max() == 0
  cross = _influence(from_encoder, table[_ids(1, 8, 3)[0]])
  allowed = np.asarray(dec_seg[0][:, None] == enc_seg[0][None])
  assert cross[allowed].min() > 0 and cross[~allowed].max() == 0


@pytest.mark.parametrize("name", ENCDEC)
def test_encdec_kv_cache_decoding_matches_the_full_forward(name):
  cfg = ENCDEC[name]
  model = EncoderDecoder(cfg)
  enc, dec = _ids(2, 9, 0), _ids(2, 7, 1)
  params = _params(model)
  full = jax.jit(model.apply)({"params": params}, enc, dec)  # (jitted: one compile each, where
  # eagerly every op compiled on its own)
  encoded = jax.jit(lambda p: model.apply({"params": p}, enc, method=model.encode))(params)
  cache = jax.jit(lambda: model.init(jax.random.key(0), enc, jnp.zeros((2, 7), jnp.int32),
                                     decode=True)["cache"])()
  step = jax.jit(lambda p, cache, tokens: model.apply(
      {"params": p, "cache": cache}, encoded, None, tokens, decode=True, mutable=["cache"],
      method=model.decode))
  out, mut = step(params, cache, dec[:, :4])
  np.testing.assert_allclose(out, full[:, :4], atol=2e-5, rtol=2e-5)
  for t in range(4, 7):
    out, mut = step(params, mut["cache"], dec[:, t:t + 1])
    np.testing.assert_allclose(out[:, 0], full[:, t], atol=2e-5, rtol=2e-5)


def test_relative_buckets():
  """Exact buckets for short distances, log-spaced and capped after; bidirectional keeps the two
  directions apart, causal maps every later key to bucket 0."""
  pos = jnp.arange(200, dtype=jnp.int32)[None]
  q = jnp.zeros((1, 1), jnp.int32) + 100
  bi = np.asarray(layers.relative_buckets(q, pos, True, 32, 128))[0, 0]
  causal = np.asarray(layers.relative_buckets(q, pos, False, 32, 128))[0, 0]
  rel = np.arange(200) - 100
  assert list(bi[100:108]) == [0, 17, 18, 19, 20, 21, 22, 23]  # keys after: 16 + distance
  assert list(bi[93:100][::-1]) == [1, 2, 3, 4, 5, 6, 7]  # keys before: distance
  assert bi.max() == 31 and bi[rel < 0].max() == 15 and causal.max() <= 31
  assert (causal[rel > 0] == 0).all() and list(causal[97:101]) == [3, 2, 1, 0]
  assert (np.diff(causal[:101][::-1]) >= 0).all()  # monotone in the distance


@pytest.mark.parametrize("family", ["bert", "t5"])  # transformer: same stack as t5
def test_sharded_train_step_equals_one_device(family):
  """configs/FAMILY.py:tiny (shrunk): one train step on a data x fsdp x tensor = 2 x 2 x 2 mesh
  gives the single-device loss and parameters."""
  overrides = ["model.d_model=32", "model.num_heads=4", "model.d_ff=64", "model.vocab_size=128",
               "model.max_len=32", "data.seq_len=32", "train.batch_size=8", "model.head_dim=8",
               "model.num_layers=1"]  # (t5: 1 encoder and 1 decoder layer)
  if family == "t5":
    overrides.append("data.target_len=16")
  config = config_lib.load(f"{REPO}/configs/{family}.py:tiny", overrides)
  results = []
  for devices, mesh in ((jax.devices()[:1], (1, 1, 1)), (jax.devices()[:8], (2, 2, 2))):
    c = config_lib.load(f"{REPO}/configs/{family}.py:tiny", overrides + [
        f"mesh.{k}={v}" for k, v in zip(("data", "fsdp", "tensor"), mesh)])
    trainer = step_lib.Trainer(c, sharding.make_mesh(c, devices))
    state = trainer.init_state(0)
    batch = trainer.put_batch(synthetic_batch(config, trainer.model))
    state, metrics = trainer.train_step(state, batch, jax.random.key(0))
    results.append((float(metrics["loss"]), jax.device_get(state.params)))
  (loss1, p1), (loss8, p8) = results
  assert np.isfinite(loss1) and loss8 == pytest.approx(loss1, rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), p8, p1)


def test_label_smoothing_mixes_in_the_uniform_distribution():
  model = EncoderLM(BERT)
  ids = _ids(2, 6, 0)
  params = _params(model)
  batch = {"inputs": ids, "segment_ids": jnp.ones_like(ids), "positions": None,
           "targets": ids, "weights": jnp.ones(ids.shape, jnp.float32)}
  batch["positions"] = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), ids.shape)
  logits = model.apply({"params": params}, ids)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, ids[..., None], -1)[..., 0]
  want = jnp.sum(0.9 * nll + 0.1 * -jnp.mean(logp, -1))
  got, weight = step_lib.loss_sums(model, params, batch, label_smoothing=0.1)
  assert float(weight) == 12 and float(got) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("chunk", [0, 5])
def test_sentence_head_adds_the_mean_pair_loss_and_reads_token_types(chunk):
  model = EncoderLM(dataclasses.replace(BERT, sentence_head=True))
  ids = _ids(2, 6, 0)
  params = _params(model)
  cls_BT = jnp.asarray([[1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]], jnp.float32)  # 3 pairs
  labels = jnp.asarray([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], jnp.int32)
  types = jnp.asarray([[0, 1, 1, 0, 0, 1], [0, 0, 1, 1, 1, 1]], jnp.int32)
  segments = jnp.asarray([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1]], jnp.int32)
  batch = {"inputs": ids, "segment_ids": segments, "targets": ids,
           "positions": jnp.asarray([[0, 1, 2, 0, 1, 2], list(range(6))], jnp.int32),
           "weights": jnp.ones(ids.shape, jnp.float32), "types": types,
           "sentence_labels": labels, "sentence_weights": cls_BT}
  mlm_only = {k: v for k, v in batch.items() if not k.startswith("sentence")}
  # (jitted: a compile per task and batch keys, where eagerly every op compiled on its own)
  x = jax.jit(lambda p: model.apply({"params": p}, ids, segments, batch["positions"], types,
                                    hidden=True))(params)
  logp = jax.nn.log_softmax(jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                             method="sentence_logits"))(params, x))
  pair_nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
  want_pairs = float(jnp.sum(pair_nll * cls_BT) / 3)
  pairs = objectives.Loss(inputs=(("types", "types_BT"),), sentence=True)  # mlm's, with pairs
  types_only = objectives.Loss(inputs=(("types", "types_BT"),))
  parts = jax.jit(lambda p, b, task: step_lib.loss_parts(model, p, b, task=task, chunk=chunk),
                  static_argnums=2)
  got, weight, sums = parts(params, batch, pairs)  # (sums: eval's)
  mlm, _, _ = parts(params, mlm_only, types_only)
  assert float(got) == pytest.approx(float(mlm) + want_pairs * float(weight), rel=1e-5)
  right = jnp.argmax(logp, -1) == labels
  assert float(sums["sentence_pairs"]) == 3
  assert float(sums["sentence_nll"]) == pytest.approx(want_pairs * 3, rel=1e-5)
  assert float(sums["sentence_correct"]) == float(jnp.sum(right * cls_BT))
  no_types, _, _ = parts(params, dict(mlm_only, types=jnp.zeros_like(types)), types_only)
  assert abs(float(no_types) - float(mlm)) > 1e-3  # The types reach the embedding.
  grads = jax.jit(jax.grad(lambda p: parts(p, batch, pairs)[0]))(params)
  assert all(float(jnp.abs(grads[k]).max()) > 0 for k in ("pooler", "sentence", "sentence_bias"))
  data = config_lib.load(f"{REPO}/configs/bert.py:tiny", ["data.sentence_pair=sop"]).data
  s = objectives.spec(data)
  assert objectives.loss(s) == pairs
  assert list(objectives.batch_spec(s, 2))[-3:] == ["types", "sentence_labels",
                                                   "sentence_weights"]


def test_evaluate_reports_sentence_pair_loss_and_accuracy():
  """Trainer.evaluate: token loss per target token over all batches, and with a sentence head
  the pair loss and accuracy over all pairs, from the same sums as training's loss."""
  config = config_lib.load(f"{REPO}/configs/bert.py:tiny", [
      "model.d_model=32", "model.num_heads=4", "model.d_ff=64", "model.vocab_size=128",
      "model.max_len=32", "data.seq_len=32", "train.batch_size=4", "model.head_dim=8",
      "model.sentence_head=true", "data.sentence_pair=sop"])
  trainer = step_lib.Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  params = trainer.init_state(0).params
  batches = []
  for seed, pairs_per_row in ((0, 1), (1, 2)):
    b = synthetic_batch(config, trainer.model, seed=seed)
    b["sentence_labels"], b["types"] = b["sentence_labels"] % 2, b["types"] % 2
    b["sentence_weights"][:] = 0
    b["sentence_weights"][:, :pairs_per_row * 16:16] = 1  # [CLS] of 1 or 2 pairs per row
    batches.append(b)
  got = trainer.evaluate(params, batches)
  # (jitted: one compile per task, where eagerly every op compiled on its own)
  loss_parts = jax.jit(lambda p, b, task: step_lib.loss_parts(trainer.model, p, b, task=task),
                       static_argnums=2)
  parts = [loss_parts(params, b, trainer.task) for b in batches]
  total = lambda key: sum(float(p[2][key]) for p in parts)
  assert total("sentence_pairs") == 4 + 8
  # eval_loss: the tokens' cross-entropy alone (it held the pair loss too)
  tokens_only = dataclasses.replace(trainer.task, sentence=False)
  plain = [loss_parts(params, b, tokens_only) for b in batches]
  assert got["eval_loss"] == pytest.approx(sum(float(p[0]) for p in plain) /
                                           sum(float(p[1]) for p in plain), rel=1e-5)
  assert sum(float(p[0]) for p in parts) > sum(float(p[0]) for p in plain) * 1.01
  assert got["eval_sentence_loss"] == pytest.approx(total("sentence_nll") / 12, rel=1e-5)
  assert got["eval_sentence_accuracy"] == pytest.approx(total("sentence_correct") / 12)
  assert 0 <= got["eval_sentence_accuracy"] <= 1
  trainer.use_microbatches(2)  # the same sums, a microbatch of the batch at a time
  assert trainer.evaluate(params, batches) == pytest.approx(got, rel=1e-5)


def test_jit_equals_no_jit():
  """T5's relative-position bias and cross-attention, eagerly and jitted (the decoder-only and
  encoder stacks share the layers of tests/test_model.py's gpt2 case)."""
  model = EncoderDecoder(dataclasses.replace(T5, num_layers=1))  # (a layer each: eager is slow)
  inputs = (_ids(2, 8, 0), _ids(2, 5, 1))
  params = _params(model)

  def loss(p):
    return jnp.mean(jax.nn.logsumexp(model.apply({"params": p}, *inputs), -1))

  eager, jitted = jax.value_and_grad(loss)(params), jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(eager[0], jitted[0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), eager[1],
               jitted[1])


def test_seq2seq_greedy_generation_matches_full_forward_argmax():
  """From the start token, or a forced decoder prefix (prefilled in one call)."""
  from transformer_jax.inference import sampling  # pylint: disable=g-import-not-at-top
  model = EncoderDecoder(T5)
  source = _ids(2, 7, 0)
  params = _params(model)
  # the full forward passes over decoder rows padded to 9 tokens: one compile (the decoder is
  # causal: the zeros after a row change nothing before them)
  apply = jax.jit(lambda dec: model.apply({"params": params}, source, dec))
  forward = lambda dec: apply(jnp.pad(dec, ((0, 0), (0, 9 - dec.shape[1]))))
  for forced in ([], [7, 9, 11]):
    got = sampling.generate(model, params, np.asarray(source).tolist(), 5, temperature=0.0,
                            start_id=2, decoder_ids=[[2] + forced] * 2 if forced else None)
    dec = jnp.asarray([[2] + forced] * 2, jnp.int32)
    for _ in range(5):  # greedy by hand: the whole decoder input each time, no cache
      nxt = jnp.argmax(forward(dec)[:, dec.shape[1] - 1], -1).astype(jnp.int32)
      dec = jnp.concatenate([dec, nxt[:, None]], axis=1)
    assert got == np.asarray(dec[:, 1 + len(forced):]).tolist(), forced


@pytest.mark.parametrize("scan", [False, True])
def test_beam_search(scan):
  """Beam 1 is greedy (eos is never the top token here: HF's scorer would finish it and go on);
  a wider beam never finds a worse penalised score than greedy, and the
  log-probability it reports is the model's own for that hypothesis."""
  from transformer_jax.inference import beam  # pylint: disable=g-import-not-at-top
  from transformer_jax.inference import sampling  # pylint: disable=g-import-not-at-top
  model = EncoderDecoder(dataclasses.replace(T5, scan_layers=scan))
  source = _ids(2, 7, 0)
  params = _params(model)
  src = np.asarray(source).tolist()
  greedy = sampling.generate(model, params, src, 6, temperature=0.0, start_id=2)
  if not scan:  # (scanned: the beam's own checks below; each decode compiles slowly)
    one, _, _ = beam.beam_search(model, params, src, beam_size=1, max_len=6, start_id=2,
                                 eos_id=96)
    assert one == greedy
  best, logp, score = beam.beam_search(model, params, src, beam_size=4, max_len=6, start_id=2,
                                       eos_id=96)

  apply = jax.jit(model.apply)  # (one compile for both uses: the same shapes)

  def model_logp(hyp):
    dec = jnp.asarray([[2] + h[:-1] for h in hyp], jnp.int32)
    lp = jax.nn.log_softmax(apply({"params": params}, source, dec))
    return np.asarray(jnp.take_along_axis(lp, jnp.asarray(hyp)[..., None], -1)[..., 0].sum(-1))

  np.testing.assert_allclose(model_logp(best), logp, rtol=1e-4, atol=1e-4)
  greedy_score = model_logp(greedy) / beam.length_penalty(6, 0.6)
  assert all(s >= g - 1e-4 for s, g in zip(score, greedy_score))


def _reference_beam(next_logp, k, max_len, eos, alpha):
  """HF's BeamSearchScorer by hand: the 2K best continuations by log p; those ending in eos
  among the first K are finished (kept apart), the first K others go on; at the end the best of
  the finished and the beams still going, by penalised score. (score, log p, tokens)."""
  from transformer_jax.inference import beam  # pylint: disable=g-import-not-at-top
  alive, done = [([], 0.0)] + [([], -1e9)] * (k - 1), []
  for t in range(max_len):
    lp = next_logp([p for p, _ in alive])
    cands = sorted(((s + lp[i, v], p + [v]) for i, (p, s) in enumerate(alive)
                    for v in range(lp.shape[1])), key=lambda x: -x[0])[:2 * k]
    alive = [(p, s) for s, p in cands if p[-1] != eos][:k]
    done += [(s / beam.length_penalty(t + 1, alpha), s, p)
             for s, p in cands[:k] if p[-1] == eos and s > -1e8]
  done += [(s / beam.length_penalty(max_len, alpha), s, p) for p, s in alive]
  return max(done, key=lambda x: x[0])


def test_beam_search_equals_hf_beam_scorer():
  """Against _reference_beam on T5 tiny over 6 tokens. Seed 29's beams outrank the finished
  [eos] early and fall below it later: the old search, which let them push it out of its K
  slots, returned log p -7.3 where -1.8 had been found."""
  from transformer_jax.inference import beam  # pylint: disable=g-import-not-at-top
  model = families.build_model(config_lib.load(f"{REPO}/configs/t5.py:tiny", [
      "model.init_std=0.15", "model.dtype=float32", "model.vocab_size=6"]))
  start, eos, k, max_len = 2, 3, 2, 8
  apply, init = jax.jit(model.apply), jax.jit(model.init)  # (eagerly every op compiled alone)
  for seed in (29, 0):
    source = np.random.default_rng(seed).integers(3, 6, (1, 5))
    params = init(jax.random.key(seed), *families.init_inputs(model))["params"]

    def next_logp(prefixes):  # (prefixes of one length, padded to max_len: one compile; the
      # decoder is causal)
      t = len(prefixes[0])
      dec = jnp.asarray([[start] + p + [0] * (max_len - t) for p in prefixes], jnp.int32)
      logits = apply({"params": params}, jnp.asarray(np.repeat(source, len(prefixes), 0),
                                                     jnp.int32), dec)
      return np.asarray(jax.nn.log_softmax(logits[:, t].astype(jnp.float32)))

    for alpha in (0.0, 0.6):
      score, logp, hyp = _reference_beam(next_logp, k, max_len, eos, alpha)
      rows, logps, scores = beam.beam_search(model, params, source.tolist(), beam_size=k,
                                             max_len=max_len, start_id=start, eos_id=eos,
                                             alpha=alpha)
      assert rows[0] == hyp, (seed, alpha, rows[0], hyp)
      np.testing.assert_allclose([logps[0], scores[0]], [logp, score], rtol=1e-4, atol=1e-4)


def test_prefix_lm_attends_to_the_whole_prefix_and_causally_after_it():
  from transformer_jax.models.decoder import DecoderLM  # pylint: disable=g-import-not-at-top
  cfg = model_config(**SMALL)
  params = _params(DecoderLM(cfg))
  model = DecoderLM(dataclasses.replace(cfg, vocab_size=97 + 8))
  seg = jnp.asarray([[1] * 5 + [2] * 3], jnp.int32)
  pos = jnp.asarray([list(range(5)) + list(range(3))], jnp.int32)
  prefix = jnp.asarray([[1, 1, 1, 0, 0, 1, 0, 0]], jnp.int32)  # segment 1: 3, segment 2: 1

  def out(x):
    logits = model.apply({"params": _with_inputs(params, "tokens", x)},
                         (97 + jnp.arange(8, dtype=jnp.int32))[None], seg, pos,
                         prefix_BT=prefix)
    return logits[0, :, :97].sum(-1)

  influence = _influence(out, params["embed"]["tokens"][_ids(1, 8, 1)[0]])
  same = np.asarray(seg[0][:, None] == seg[0][None, :])
  allowed = same & (np.tril(np.ones((8, 8), bool)) | (np.asarray(prefix[0]) > 0)[None, :])
  assert influence[allowed].min() > 0 and influence[~allowed].max() == 0


def test_prefix_lm_batches_and_one_step(tiny_data):
  from transformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from tests.conftest import tiny_overrides  # pylint: disable=g-import-not-at-top
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny",
                           tiny_overrides(tiny_data, **{"data.objective": "prefix_lm"}))
  batch = next(pipeline.make_train_iterator(config))
  assert set(batch) == {"inputs", "targets", "weights", "segment_ids", "positions", "prefix"}
  for k in range(batch["inputs"].shape[0]):
    for s in set(batch["segment_ids"][k][batch["segment_ids"][k] > 0].tolist()):
      idx = np.flatnonzero(batch["segment_ids"][k] == s)
      pre, w = batch["prefix"][k][idx], batch["weights"][k][idx]
      u = int(pre.sum())
      assert (pre[:u] == 1).all() and (pre[u:] == 0).all() and u >= 1  # a prefix, then not
      assert not w[:max(u - 1, 0)].any()  # prefix tokens are never predicted
      np.testing.assert_array_equal(batch["targets"][k][idx][:-1], batch["inputs"][k][idx][1:])
  trainer = step_lib.Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  state, metrics = trainer.train_step(trainer.init_state(0), trainer.put_batch(batch),
                                      jax.random.key(0))
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
