"""Interpretability (`inspect`): attention maps are the reference kernel's probabilities (rows sum
to 1, zero above the diagonal and across packed segments, equal to an independent numpy
computation), the logit lens's last layer is the model's logits, a linear probe finds a planted
feature and not shuffled labels, train.log_activations' metrics equal an independent computation,
and bad inputs are one-line errors."""

import collections
import json
import os
import re
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import REPO, model_config, synthetic_batch, tiny_overrides
from transformer_jax import cli
from transformer_jax import config as config_lib
from transformer_jax import inspect as inspect_cli
from transformer_jax import sample
from transformer_jax.config import ConfigError
from transformer_jax.data import tokenization
from transformer_jax.evaluation import harness
from transformer_jax.evaluation import interpret
from transformer_jax.evaluation import probe
from transformer_jax.models import families
from transformer_jax.models import layers
from transformer_jax.models import stack
from transformer_jax.parallel import sharding
from transformer_jax.training import checkpoint
from transformer_jax.training import throughput
from transformer_jax.training.step import Trainer

WORDS_A = ("def", "return", "self", "value", "import", "class")
WORDS_B = ("print", "name", "for", "data", "else", "the")
# A packed row: segment 1 (7 tokens), segment 2 (5 tokens), 4 padding tokens.
SEGMENTS = [1] * 7 + [2] * 5 + [0] * 4


def _overrides(tiny_data, **extra):
  # A large init: peaked attention, so a wrong probability would show.
  return tiny_overrides(tiny_data, **{"model.init_std": 0.3, "mesh.data": 1, **extra})


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
  """A tiny GPT-2 workdir (config.json and a checkpoint at step 3 of its initial parameters)
  and what harness.load_workdir gives for it."""
  workdir = str(tmp_path_factory.mktemp("inspect_run"))
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", _overrides(tiny_data))
  config_lib.write_json(config, os.path.join(workdir, "config.json"))
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  ckpts = checkpoint.Checkpoints(workdir, config.checkpoint)
  ckpts.save(3, trainer.init_state(config.seed), force=True)
  ckpts.close()
  trainer, step, params = harness.load_workdir(workdir, devices=jax.devices()[:1])
  assert step == 3
  return workdir, trainer, params


@pytest.fixture(scope="module")
def packed(run):
  """forward() on a packed row: (inputs, output logits, embedded, sown collections)."""
  _, trainer, params = run
  segments = np.asarray([SEGMENTS], np.int32)
  positions = np.asarray([list(range(7)) + list(range(5)) + list(range(4))], np.int32)
  tokens = np.asarray([np.arange(16) * 7 % 300 + 3], np.int32)
  inputs = tuple(map(jnp.asarray, (tokens, segments, positions)))
  out, embedded, sown = interpret.forward(trainer.model, params, inputs)
  return inputs, out, embedded, sown


def _layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _numpy_probs(block, x_TD, segments_T, cfg):
  """One GPT-2 block's attention probabilities [H, T, T] in numpy from its parameters and its
  input: LayerNorm, biased q/k projections, scaled scores, causal + same-segment softmax."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), block)
  h = _layer_norm(np.asarray(x_TD, np.float64), p["attention_norm"], cfg.norm_eps)
  q = np.einsum("TD,DHK->HTK", h, p["attention"]["query"]) + p["attention"]["query_bias"][:, None]
  k = np.einsum("TD,DHK->HTK", h, p["attention"]["key"]) + p["attention"]["key_bias"][:, None]
  scores = np.einsum("HTK,HSK->HTS", q, k) / np.sqrt(cfg.head_dim)
  t = len(segments_T)
  allowed = (segments_T[:, None] == segments_T[None, :]) & np.tri(t, dtype=bool)
  scores = np.where(allowed[None], scores, -np.inf)
  e = np.exp(scores - scores.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True), allowed


def test_attention_maps_are_the_reference_kernels_probabilities(run, packed):
  _, trainer, params = run
  (_, segments, _), _, embedded, sown = packed
  cfg = trainer.model.cfg
  maps = interpret.attention_maps(sown)["attention"]
  stream = interpret.residual_stream(embedded, sown)
  assert len(maps) == cfg.num_layers and maps[0].shape == (1, cfg.num_heads, 16, 16)
  seg = np.asarray(segments[0])
  for i, probs in enumerate(maps):
    p = np.asarray(probs[0], np.float64)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)  # over the allowed keys
    want, allowed = _numpy_probs(params[f"layer_{i}"], stream[i][0], seg, cfg)
    assert np.all(p[:, ~allowed] == 0.0)  # exactly: above the diagonal and across segments
    assert np.all(p[:, np.triu_indices(16, 1)[0], np.triu_indices(16, 1)[1]] == 0.0)
    np.testing.assert_allclose(p, want, atol=2e-5)
    assert p.max() > 0.5  # peaked, not uniform: a head-order or scaling slip would show


def test_scanned_stack_sows_the_same_maps_and_activations(run, packed):
  """The layer scan (models/stack.py) sows per layer what the unrolled stack does."""
  _, trainer, params = run
  inputs, _, embedded, sown = packed
  config = config_lib.from_json_file(os.path.join(run[0], "config.json"))
  config.model.scan_layers = True
  model = families.build_model(config)
  scanned = stack.stack_layers(params, config.model.num_layers)
  got = model.apply({"params": scanned}, *inputs, mutable=[
      layers.INTERMEDIATES, layers.ATTENTION_PROBS, layers.ACTIVATIONS])[1]
  want = trainer.model.apply({"params": params}, *inputs, mutable=[layers.ACTIVATIONS])[1]
  for a, b in zip(interpret.attention_maps(got)["attention"],
                  interpret.attention_maps(sown)["attention"]):
    np.testing.assert_allclose(a, b, atol=1e-6)
  for a, b in zip(interpret.residual_stream(embedded, got),
                  interpret.residual_stream(embedded, sown)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  got_m = stack.activation_metrics(got[layers.ACTIVATIONS])
  want_m = stack.activation_metrics(want[layers.ACTIVATIONS])
  assert set(got_m) == set(want_m) == {f"act_{k}/layer_{i}" for k in ("rms", "max")
                                       for i in range(config.model.num_layers)}
  for k, v in want_m.items():
    np.testing.assert_allclose(got_m[k], v, rtol=1e-5)


def test_a_sequence_sharded_workdir_is_inspected_scored_and_probed_as_one_device(tiny_data):
  """mesh.sequence=3 (ring attention: a batch's length a multiple of 6): inspect's one text (of
  no multiple of 6 tokens), scoring's power-of-two buckets and probe's features failed to shard
  (or to zigzag); they are padded to the multiple and give one device's figures."""
  from transformer_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", _overrides(tiny_data, **{
      "model.d_model": 48, "model.num_heads": 4, "model.max_len": 48, "data.seq_len": 48}))
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  params = _random_params(trainer.model, jnp.zeros((1, 8), jnp.int32))
  config.mesh.update(sequence=3)
  ring = Trainer(config, sharding.make_mesh(config, jax.devices()[:3]))
  assert sharding.length_multiple(ring.mesh, ring.rules) == 6
  placed = jax.device_put(params, ring.state_shardings.params)
  tok = tokenization.load(tiny_data["tokenizer"])
  text = "def f(x): return x + 1"
  want, got = (interpret.run(tr, p, tok, text) for tr, p in ((trainer, params), (ring, placed)))
  assert len(got["tokens"]) % 6 and got["tokens"] == want["tokens"]
  for a, b in zip(got["attention"]["attention"], want["attention"]["attention"]):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert [r["top"] for r in got["logit_lens"]["layers"]] == [
      r["top"] for r in want["logit_lens"]["layers"]]
  pairs = [([5, 6, 7], [8, 9]), (list(range(3, 20)), [21])]
  np.testing.assert_allclose(
      [s for s, _ in harness.text_model(ring, placed, batch_size=3).ids_loglikelihood(pairs)],
      [s for s, _ in harness.text_model(trainer, params).ids_loglikelihood(pairs)], atol=1e-4)
  texts = ["def f(x):", "import os", "x = 1"]
  np.testing.assert_allclose(probe.features(ring, placed, tok, texts, batch_size=3),
                             probe.features(trainer, params, tok, texts), atol=1e-4)


def _random_params(model, *inputs, std=0.3):
  """Random parameters of `model`'s shapes (no initializer run, nothing compiled)."""
  shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs)["params"]))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype), shapes)


def test_encoder_and_encoder_decoder_maps():
  """An encoder attends both ways within a segment, never across; an encoder-decoder sows its
  encoder's, decoder's and cross-attention's maps, and its decoder's lens is its logits."""
  enc = families.EncoderLM(model_config(num_layers=1))
  segments = jnp.asarray([SEGMENTS[:12]], jnp.int32)
  positions = jnp.asarray([list(range(7)) + list(range(5))], jnp.int32)
  tokens = jnp.arange(3, 15, dtype=jnp.int32)[None]
  params = _random_params(enc, tokens)
  _, _, sown = interpret.forward(enc, params, (tokens, segments, positions))
  p = np.asarray(interpret.attention_maps(sown)["attention"][0][0])
  seg = np.asarray(segments[0])
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
  assert np.all(p[:, seg[:, None] != seg[None, :]] == 0) and p[:, 0, 6].min() > 0
  model = families.EncoderDecoder(model_config(num_layers=1, num_decoder_layers=1))
  params = _random_params(model, tokens, tokens[:, :5])
  ids = interpret.Inputs([1, 9, 8, 7], source_ids=list(range(3, 15)))
  inputs = tuple(map(jnp.asarray, interpret.model_inputs(model, ids)))
  logits, embedded, sown = interpret.forward(model, params, inputs)
  maps = interpret.attention_maps(sown)
  assert {k: (len(v), v[0].shape[-2:]) for k, v in maps.items()} == {
      "encoder/attention": (1, (12, 12)), "decoder/attention": (1, (4, 4)),
      "decoder/cross_attention": (1, (4, 12))}
  stream = interpret.residual_stream(embedded, sown, "decoder")
  norm = interpret.final_norm_params(params, "decoder")
  np.testing.assert_allclose(interpret.lens_logits(model, params, norm, stream[-1]), logits,
                             atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("recipe", ["transformer", "t5", "t5_ul2"])
def test_a_seq2seq_source_is_framed_as_training_scoring_and_sampling_frame_it(recipe):
  """inspect and probe read an encoder-decoder's source as training did: bos/eos around a
  (source, target) pair objective's source (they read it bare), a span objective's with the bos
  of a document's start (data.add_bos: the pipeline put one there; they left it out) and the
  eos that ends every training input (T5's), UL2's after the mode token of its prefix-LM
  denoiser ([S]; training put one before every source) and with that bos and eos."""
  from transformer_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  ul2 = recipe.endswith("_ul2")
  config = config_lib.load(f"{REPO}/configs/{recipe.removesuffix('_ul2')}.py:tiny",
                           ["data.objective=ul2"] * ul2)
  tok = types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, mode_ids=[60, 61, 62],
                              encode=lambda s: [ord(c) % 50 + 3 for c in s])
  text = "def f(x):"
  want = [61] * ul2 + [1] + tok.encode(text) + [2]
  lm = scoring.TextModel.__new__(scoring.TextModel)
  lm.config, lm.tokenizer, lm.max_len = config, tok, config.model.max_len
  assert lm.source_ids(text) == want
  assert interpret.text_inputs(config, tok, text).source_ids == want
  assert interpret.encode(config, tok, text) == want  # probe's features
  assert sample.source(config, tok, text) == want[ul2:]  # A UL2 prompt names its own mode.
  if ul2:  # and keeps it first, before the bos (it went after a bos training never put there)
    tok.piece_id = lambda p: {"[R]": 60, "[S]": 61, "[X]": 62}.get(p, -1)
    assert sample.source(config, tok, "[S]" + text) == want
  long = interpret.encode(config, tok, text * 100)  # its end cut, not the framing (the eos)
  assert len(long) == config.model.max_len and long[-1] == 2
  assert long[:len(want) - 1] == want[:-1]


def test_a_prefix_lm_reads_the_text_as_its_prefix_and_the_target_after_it(tiny_data):
  """Attention maps: the text's tokens see each other both ways, the target's causally; the
  lens scores the next token only where a position cannot see it; probe features read each
  text as a prefix (not causally)."""
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", _overrides(
      tiny_data, **{"data.objective": "prefix_lm", "model.num_layers": 1}))
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  model = trainer.model
  params = _random_params(model, jnp.zeros((1, 8), jnp.int32))
  tok = tokenization.load(tiny_data["tokenizer"])
  result = interpret.run(trainer, params, tok, "def f(x):", target=" return x")
  n = len(interpret.encode(config, tok, "def f(x):"))
  p = result["attention"]["attention"][0]  # [H, T, S]
  t = p.shape[-1]
  allowed = np.tril(np.ones((t, t), bool))
  allowed[:n, :n] = True
  assert t > n > 1 and np.all(p[:, ~allowed] == 0) and p[:, 0, n - 1].min() > 0
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
  for row in result["logit_lens"]["layers"]:
    assert row["rank"][:n - 1] == [0] * (n - 1) and min(row["rank"][n - 1:-1]) > 0
  markdown = interpret.lens_markdown(result["logit_lens"])  # (means over the scored ones)
  assert "| 0 | " in markdown and "inf" not in markdown and "nan" not in markdown
  causal = Trainer(config_lib.load(f"{REPO}/configs/gpt2.py:tiny", _overrides(
      tiny_data, **{"model.num_layers": 1})), trainer.mesh)
  texts = ["def f(x):", "import os"]
  got, read_causally = (probe.features(tr, params, tok, texts) for tr in (trainer, causal))
  np.testing.assert_allclose(got[0], read_causally[0], atol=1e-6)  # the embedding alike
  assert np.abs(got[-1] - read_causally[-1]).max() > 1e-3  # block 0 read the texts both ways


def test_control_pieces_written_in_the_text_are_read_as_sample_reads_them():
  """[MASK] or <extra_id_0> in an inspected text is that piece's id (it was read as brackets
  and letters), in a decoder's or encoder's text and in an encoder-decoder's target."""
  tok = types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, mask_id=90,
                              encode=lambda s: [3] * len(s),
                              piece_id=lambda p: {"[MASK]": 90, "<extra_id_0>": 91}.get(p, -1))
  bert = config_lib.load(f"{REPO}/configs/bert.py:tiny")
  assert interpret.encode(bert, tok, "a [MASK]") == [1, 3, 3, 90]
  t5 = config_lib.load(f"{REPO}/configs/t5.py:tiny")
  assert interpret.text_inputs(t5, tok, "a", target="<extra_id_0> b").ids[1:] == [91, 3, 3]


def test_logit_lens_last_layer_is_the_models_logits(run, packed):
  _, trainer, params = run
  inputs, logits, embedded, sown = packed
  stream = interpret.residual_stream(embedded, sown)
  assert len(stream) == trainer.model.cfg.num_layers + 1
  norm = interpret.final_norm_params(params)
  last = interpret.lens_logits(trainer.model, params, norm, stream[-1])
  np.testing.assert_allclose(last, logits, atol=1e-4, rtol=1e-5)
  ids = [int(i) for i in np.asarray(inputs[0][0])]
  lens = interpret.logit_lens(trainer.model, params, stream, ids, causal=True)
  assert [r["layer"] for r in lens["layers"]] == ["embed", "0", "1"]
  row = np.asarray(logits[0])
  for t in (0, 5):  # the rank of the next token, and the top tokens, from the logits themselves
    assert lens["layers"][-1]["rank"][t] == 1 + np.sum(row[t] > row[t, ids[t + 1]])
    assert lens["layers"][-1]["top"][t][0] == str(int(np.argmax(row[t])))
  assert lens["layers"][-1]["rank"][-1] == 0  # the last position has no next token


def test_cli_writes_maps_lens_and_stats(run, tmp_path, capsys):
  out = str(tmp_path / "out")
  inspect_cli.main([f"--workdir={run[0]}", "--step=3", "--text=def value(self):", f"--out={out}"])
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert last["step"] == 3 and last["family"] == "decoder" and last["tokens"] > 3
  files = last["files"]
  assert [os.path.basename(p) for p in files["attention"]] == [
      "attention_layer_0.png", "attention_layer_1.png"]
  assert all(os.path.getsize(p) > 200 for kind in files.values() for p in kind)
  with open(os.path.join(out, "logit_lens.json")) as f:
    lens = json.load(f)
  assert len(lens["layers"]) == 3 and len(lens["layers"][0]["top"][0]) == 5
  assert lens["tokens"][0] == "<s>" or lens["tokens"][0].startswith("<")  # bos, as training
  with open(os.path.join(out, "stats.json")) as f:
    stats = json.load(f)
  assert [r["layer"] for r in stats["layers"]] == ["embed", "0", "1"]
  entropy = np.asarray(stats["attention_entropy"]["attention"])
  assert entropy.shape == (2, 4) and np.all(entropy >= 0)
  with open(os.path.join(out, "logit_lens.md")) as f:
    assert f.read().startswith("# Logit lens (target: the next token)")
  inspect_cli.main([f"--workdir={run[0]}", "--step=3", f"--out={out}",  # said when it is cut
                    "--text=" + "def value(self): return self.x\n" * 40])
  assert re.search(r"^note: the text is \d+ tokens long; model.max_len=32 cuts its end \(the "
                   r"model reads 32 of them\)$", capsys.readouterr().out, re.M)


def _labelled(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def test_probe_finds_a_planted_feature_and_not_shuffled_labels(run, tmp_path, capsys):
  rng = np.random.default_rng(0)
  rows = [{"text": " ".join(rng.choice(WORDS_B if i % 2 else WORDS_A, rng.integers(3, 9))),
           "label": ["a", "b"][i % 2]} for i in range(96)]
  data = _labelled(tmp_path / "planted.jsonl", rows)
  inspect_cli.main(["probe", f"--workdir={run[0]}", f"--data={data}", f"--out={tmp_path}",
                    "--batch_size=32"])
  last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert list(last["heldout_accuracy"]) == ["embed", "0", "1"]
  assert max(last["heldout_accuracy"].values()) >= 0.95
  assert os.path.getsize(tmp_path / "probe.png") > 1000
  _, trainer, params = run
  x = probe.features(trainer, params, tokenization.load(trainer.config.data.tokenizer),
                     [r["text"] for r in rows], batch_size=32)
  assert x.shape == (3, 96, trainer.model.cfg.d_model)
  labels = [r["label"] for r in rows]
  shuffled = probe.fit(x, list(rng.permutation(labels)))
  accuracy = [r["heldout_accuracy"] for r in shuffled["layers"]]
  assert np.mean(accuracy) < 0.7, accuracy  # chance is 0.5
  assert max(r["train_accuracy"] for r in shuffled["layers"]) > 0.8  # it can still fit train


def test_probe_fit_on_synthetic_features():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 3, 300)
  x = rng.normal(size=(2, 300, 16))
  x[1, :, 0] += 10.0 * y  # layer 1 holds the label along one direction; layer 0 does not
  result = probe.fit(x, y.tolist(), seed=2)
  acc = [r["heldout_accuracy"] for r in result["layers"]]
  assert acc[1] >= 0.97 and acc[0] < 0.55 and result["classes"] == 3
  counts = np.bincount(y)
  assert result["heldout_examples"] == sum(round(0.25 * c) for c in counts)
  assert 0.3 < result["chance"] < 0.5


def test_probe_split_is_stratified():
  """Each label keeps its share in the held-out split (a rare one as well); a label seen once
  stays in training; the splits cover every example once; another seed draws others."""
  labels = ["a"] * 90 + [{"b": 1}] * 10 + ["c"]
  train, test = probe.split(labels, 0.2, seed=0)
  held = collections.Counter(json.dumps(labels[i]) for i in test)
  assert held == {'"a"': 18, '{"b": 1}': 2}
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
  other = probe.split(labels, 0.2, seed=1)[1]
  assert len(other) == len(test) and set(other) != set(test)
  train, test = probe.split(["x", "x", "y"], 0.5, seed=0)  # too rare: one of the commonest
  assert test.tolist() in ([0], [1]) and 2 in train
  with pytest.raises(ConfigError, match=r"every label has one distinct text \(2 texts\)"):
    probe.split(["x", "y"], 0.5, seed=0)  # (y held out, never trained on: chance 1.0)
  # A text's copies stay on one side (random labels, every line twice, scored 1.0 held out)
  texts = [f"text {i % 20}" for i in range(40)]
  labels = [int(v) for v in np.random.default_rng(0).integers(0, 2, 20)] * 2
  train, test = probe.split(labels, 0.25, seed=0, texts=texts)
  assert not {texts[i] for i in train} & {texts[i] for i in test}
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(40)) and len(test) >= 2


def test_text_files_and_tokens_are_read_whole(tmp_path, monkeypatch):
  """Invalid UTF-8 in --file or --data, and a lone surrogate escape in --data or --text, are
  U+FFFD (tracebacks); a newline token is escaped in logit_lens.md's table (it split a row)."""
  read = inspect_cli._text  # pylint: disable=protected-access
  (tmp_path / "t.txt").write_bytes(b"def f(x):\xff return x")
  assert read({"text": "", "file": str(tmp_path / "t.txt")}) == "def f(x):\ufffd return x"
  assert read({"text": "a \udcff b", "file": ""}) == "a \ufffd b"
  (tmp_path / "d.jsonl").write_bytes(b'{"text": "a \\ud800 b", "label": 0}\n'
                                     b'{"text": "c \xff", "label": 1}\n' * 2)
  texts, _ = probe.read_labelled(str(tmp_path / "d.jsonl"))
  assert texts == ["a \ufffd b", "c \ufffd"] * 2
  cell = interpret._cell  # pylint: disable=protected-access
  assert cell("\n") == "`\\n`" and cell("a|b") == "`a\\|b`"


def test_log_activations_metrics_equal_an_independent_computation(run, tiny_data):
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", _overrides(
      tiny_data, **{"train.log_activations": True}))
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  state = trainer.init_state(0)
  batch = synthetic_batch(config)
  inputs = [jnp.asarray(batch[k]) for k in type(trainer.model).INPUTS]
  _, captured = trainer.model.apply({"params": state.params}, *inputs,
                                    capture_intermediates=True)  # flax's own, every module
  x = np.asarray(captured["intermediates"]["layer_1"]["__call__"][0], np.float64)
  _, m = trainer.train_step(state, trainer.put_batch(batch), jax.random.key(0))
  m = jax.device_get(m)
  assert {f"act_{k}/layer_{i}" for k in ("rms", "max") for i in range(2)} <= set(m)
  np.testing.assert_allclose(m["act_rms/layer_1"], np.sqrt(np.mean(x ** 2)), rtol=1e-5)
  np.testing.assert_allclose(m["act_max/layer_1"], np.max(np.abs(x)), rtol=1e-6)
  # A log line covers its window: the largest act_max and the mean act_rms of its steps.
  meter = throughput.Meter(trainer, state.params)
  base = {"loss": jnp.float32(1.0), "nonfinite": jnp.bool_(False), "spike": jnp.bool_(False)}
  steps = [{**base, "act_rms/layer_0": jnp.float32(r), "act_max/layer_0": jnp.float32(x),
            "cross_entropy": jnp.float32(r + 1)} for r, x in ((1.0, 5.0), (3.0, 2.0))]
  for step_metrics in steps:
    meter.step(step_metrics)
  out = meter.read(steps[-1], 0)
  assert (out["act_rms/layer_0"], out["act_max/layer_0"]) == (2.0, 5.0)
  assert out["cross_entropy"] == 3.0  # (the window's mean too, as the loss)


def test_bad_inputs_are_one_line_errors(run, tmp_path):
  workdir = run[0]
  no_label = _labelled(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b", "label": 1}])
  good = _labelled(tmp_path / "good.jsonl",
                   [{"text": f"ab {i}", "label": i % 2} for i in range(8)])
  cases = {
      "must be a training workdir": [f"--workdir={tmp_path / 'none'}", "--text=x", "--out=o"],
      r"no checkpoint for step 99 .*steps: 3\)": [f"--workdir={workdir}", "--step=99",
                                                   "--text=x", f"--out={tmp_path}"],
      "the text is empty": [f"--workdir={workdir}", "--text=  ", f"--out={tmp_path}"],
      "--out=DIR is required": [f"--workdir={workdir}", "--text=x"],
      "line 1 lacks field.s. label": ["probe", f"--workdir={workdir}", f"--data={no_label}"],
      "does not exist": ["probe", f"--workdir={workdir}", f"--data={tmp_path / 'no.jsonl'}"],
      "unknown subcommand": ["probes", f"--workdir={workdir}"],
      "--target is for encoder-decoder": [f"--workdir={workdir}", "--text=x", "--target=y",
                                          f"--out={tmp_path}"],  # (a decoder: it was ignored)
      "--batch_size >= 0": ["probe", f"--workdir={workdir}", f"--data={good}",
                            "--batch_size=-3"],
      "--limit=-1 must be >= 0": ["probe", f"--workdir={workdir}", f"--data={good}",
                                  "--limit=-1"],
      "is a training workdir \\(it holds config.json\\); give a folder of its own": [
          f"--workdir={workdir}", "--text=x", f"--out={workdir}"],  # (7 files went into it)
      "is a folder, not a file": ["probe", f"--workdir={workdir}", f"--data={tmp_path}"],
      "--out=.* is a training workdir \\(it holds config.json\\)": [
          "probe", f"--workdir={workdir}", f"--data={good}", f"--out={workdir}"],  # (as above)
  }
  for message, argv in cases.items():
    with pytest.raises(ConfigError, match=message) as e:
      inspect_cli.main(argv)
    assert "\n" not in str(e.value), message


def test_probe_help_and_a_one_line_error_from_the_command_line():
  """(`inspect --help`: tests/test_install.py's ENTRY_POINTS.)"""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "transformer_jax.inspect", "probe", "--help"],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode == 0 and "--label_field='label'" in out.stdout, out.stderr
  out = subprocess.run([sys.executable, "-m", "transformer_jax.inspect", "--workdir=/nonexistent",
                        "--text=x", "--out=/tmp/x"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=env)
  assert out.returncode == 2 and re.fullmatch(r"error: [^\n]*\n", out.stderr), out.stderr


def test_a_capacity_moe_probe_feature_does_not_depend_on_batch_mates():
  """Features come from the model as scoring runs it (experts drop nothing): with a capacity,
  a text's pooled stream would change with the padded length its batch mates set."""
  c = cli.load_config(f"{REPO}/configs/switch.py:tiny", [
      "model.vocab_size=256", "model.max_len=64", "model.init_std=0.5", "model.dtype=float32",
      "train.batch_size=2", "mesh.data=1"], None)
  assert c.model.expert_capacity_factor > 0
  trainer = Trainer(c, sharding.make_mesh(c, jax.devices()[:1]))
  params = trainer.init_state(0).params
  tok = types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0,
                              encode=lambda s: [3 + ord(ch) % 250 for ch in s])
  alone = probe.features(trainer, params, tok, ["ab" * 14], batch_size=2)
  with_mate = probe.features(trainer, params, tok, ["ab" * 14, "z" * 60], batch_size=2)
  np.testing.assert_allclose(alone[:, 0], with_mate[:, 0], atol=1e-4)


def test_probe_keeps_texts_alike_up_to_max_len_on_one_side(run, tmp_path, capsys, monkeypatch):
  """Texts that differ only past model.max_len are the same ids to the model: split kept them
  apart by their raw text (random labels scored 0.7-0.9 held out); the cut ones are counted."""
  _, trainer, _ = run
  tok = tokenization.load(trainer.config.data.tokenizer)
  rng = np.random.default_rng(3)
  heads = [" ".join(rng.choice(WORDS_A + WORDS_B, 40)) for _ in range(20)]
  rows = [{"text": f"{head} {tail}", "label": int(label)}
          for head, label in zip(heads, rng.integers(0, 2, 20)) for tail in ("x = 1", "y = 2")]
  data = _labelled(tmp_path / "pairs.jsonl", rows)
  splits = []
  real = probe.split
  def spy(*args):
    splits.append(real(*args))
    return splits[-1]
  monkeypatch.setattr(probe, "split", spy)
  inspect_cli.main(["probe", f"--workdir={run[0]}", f"--data={data}", f"--out={tmp_path}",
                    "--steps=20"])
  train, test = splits[-1]  # fit's
  ids = [tuple(interpret.encode(trainer.config, tok, r["text"])) for r in rows]
  assert len(set(ids)) == 20 and not {ids[i] for i in train} & {ids[i] for i in test}
  assert "note: 40 of 40 texts are longer than model.max_len=32 tokens" in capsys.readouterr().out
  with open(tmp_path / "probe.json") as f:
    assert json.load(f)["cut_texts"] == 40


def test_a_note_names_each_input_side_that_max_len_cuts():
  """The note counts the framed ids each side reads (an encoder-decoder's source with its bos
  and eos: 31 text tokens, 33 framed, cut without a note; --target after the start token, cut
  without a note), not the text's bare tokens (a decoder without a bos, exactly max_len: noted
  though nothing was cut)."""
  tok = types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, encode=lambda s: [3] * len(s))
  notes = inspect_cli.cut_notes
  t5 = config_lib.load(f"{REPO}/configs/t5.py:tiny", ["model.max_len=32"])
  assert notes(t5, tok, "a" * 30) == []
  assert notes(t5, tok, "a" * 31) == ["note: the source (the text, framed) is 33 tokens long; "
                                      "model.max_len=32 cuts its end (the model reads 32 of "
                                      "them)"]
  assert len(interpret.encode(t5, tok, "a" * 31)) == 32
  assert notes(t5, tok, "a", target="b" * 31) == []
  assert [n.split(" is ")[0] for n in notes(t5, tok, "a" * 40, target="b" * 32)] == [
      "note: the source (the text, framed)", "note: the decoder's input (its start token and "
      "--target)"]
  for add_bos, want in ((False, 0), (True, 1)):
    gpt2 = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", [
        "model.max_len=32", f"data.add_bos={add_bos}"])
    assert len(notes(gpt2, tok, "a" * 32)) == want
  plm = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", [
      "model.max_len=32", "data.objective=prefix_lm", "data.add_bos=True"])
  assert notes(plm, tok, "a" * 20, target="b" * 11) == []
  assert notes(plm, tok, "a" * 20, target="b" * 12)[0].startswith(
      "note: the text and --target is 33 tokens long")


def test_an_encoder_decoder_cli_run_counts_and_notes_both_sides(tiny_data, tmp_path, capsys):
  """--init on a T5 workdir (config.json alone): the last line counts the source's tokens too
  ("tokens" is the decoder's side), and a source of max_len - 1 text tokens (its bos and eos
  over max_len) and a long --target are each noted as cut."""
  config = config_lib.load(f"{REPO}/configs/t5.py:tiny", _overrides(tiny_data, **{
      "model.num_layers": 1, "model.num_decoder_layers": 1}))
  workdir = str(tmp_path / "t5")
  os.makedirs(workdir)
  config_lib.write_json(config, os.path.join(workdir, "config.json"))
  tok = tokenization.load(tiny_data["tokenizer"])
  text = ""
  while len(tokenization.with_control_pieces(tok, text)) < 31:  # (max_len 32)
    text += "x"
  assert len(tokenization.with_control_pieces(tok, text)) == 31
  inspect_cli.main([f"--workdir={workdir}", "--init", f"--text={text}", "--target=" +
                    "return value " * 20, f"--out={tmp_path / 'out'}"])
  out = capsys.readouterr().out
  last = json.loads(out.strip().splitlines()[-1])
  assert last["family"] == "encdec" and (last["source_tokens"], last["tokens"]) == (32, 32)
  assert re.search(r"^note: the source \(the text, framed\) is 33 tokens long; ", out, re.M)
  assert re.search(r"^note: the decoder's input \(its start token and --target\) is \d+ ", out,
                   re.M)


def test_gs_files_data_and_the_default_probe_out(gcs, tmp_path):
  """--file=gs://... and probe --data=gs://... are read (they "did not exist"), as a local file
  is (U+FFFD, newlines); probe's default --out of a gs:// workdir is WORKDIR/inspect (it was
  ./inspect)."""
  from tests.gcs_emulator import BUCKET  # pylint: disable=g-import-not-at-top
  from transformer_jax.config import paths  # pylint: disable=g-import-not-at-top
  url, read = f"gs://{BUCKET}/inspect", inspect_cli._text  # pylint: disable=protected-access
  paths.path(f"{url}/t.txt").write_bytes(b"def f(x):\xff\r\n  return x")
  assert read({"text": "", "file": f"{url}/t.txt"}) == "def f(x):\ufffd\n  return x"
  rows = b"".join(json.dumps({"text": f"t {i}", "label": i % 2}).encode() + b"\r\n"
                  for i in range(4))
  paths.path(f"{url}/d.jsonl").write_bytes(rows)
  assert probe.read_labelled(f"{url}/d.jsonl") == ([f"t {i}" for i in range(4)], [0, 1] * 2)
  with pytest.raises(ConfigError, match=r"--file='gs://.*/none.txt' does not exist"):
    read({"text": "", "file": f"{url}/none.txt"})
  assert inspect_cli.probe_out({"out": "", "workdir": f"gs://{BUCKET}/w"}) == (
      f"gs://{BUCKET}/w/inspect")
  assert inspect_cli.probe_out({"out": "", "workdir": str(tmp_path)}) == str(tmp_path / "inspect")
