"""Sequence-to-sequence data: pair formats (tsv, jsonl_pairs, functions), the PairCorpus TFDS
builder, TFDS catalog datasets, the seq2seq objective's packed batches, and a short training run."""

import json
import textwrap
import types

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import REPO, TINY_MODEL, tiny_overrides
from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import objectives
from transformer_jax.data.objectives import common
from transformer_jax.data.objectives import seq2seq
from transformer_jax.data import pipeline
from transformer_jax.data import tfds_text
from transformer_jax.data import tokenization as tokenizer_lib
from transformer_jax.evaluation import scoring
from transformer_jax.inference import sampling
from transformer_jax.models import families
from transformer_jax.training import loop

_WORDS = ("alpha", "beta", "gamma", "delta", "one", "two", "three", "red", "green", "blue")


class TjaxTestPairs(tfds.core.GeneratorBasedBuilder):
  """A catalog-style dataset (registered by name) with "de"/"en" features, like TFDS's
  translation datasets, and train/validation splits."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"de": tfds.features.Text(), "en": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(40), "validation": self._generate_examples(6)}

  def _generate_examples(self, n):
    for i in range(n):
      words = [_WORDS[(i + j) % len(_WORDS)] for j in range(1 + i % 5)]
      yield i, {"de": " ".join(words), "en": " ".join(reversed(words))}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
  """A TSV corpus of 80 pairs (target = the source's words reversed) with escaped newlines."""
  root = tmp_path_factory.mktemp("pairs")
  rng = np.random.default_rng(0)
  lines = []
  for _ in range(80):
    words = list(rng.choice(_WORDS, rng.integers(1, 9)))
    lines.append(" ".join(words) + "\\n=\t" + " ".join(reversed(words)))
  (root / "train.tsv").write_text("\n".join(lines) + "\n\n")
  texts = [t for _, t in corpus_lib.iter_documents(f"{root}/*.tsv", "tsv")]
  tok = tokenizer_lib.train(texts * 5, 300, str(root / "tok.model"))
  return {"corpus": f"{root}/*.tsv", "tokenizer": tok, "root": root}


def _config(tiny_data, pairs, **extra):
  kv = {"data.corpus": pairs["corpus"], "data.tokenizer": pairs["tokenizer"],
        "data.format": "tsv", "data.objective": "seq2seq", "data.target_len": 16,
        "model.vocab_size": 320, **extra}
  return config_lib.load(f"{REPO}/configs/transformer.py:tiny", tiny_overrides(tiny_data, **kv))


def test_tsv_jsonl_and_function_pairs(tmp_path):
  (tmp_path / "a.tsv").write_text("x\\ty\\\\z\tout\\n\n\nno tab here\n")
  it = corpus_lib.iter_pairs(f"{tmp_path}/*.tsv", "tsv")
  assert next(it) == ("a.tsv:1", "x\ty\\z", "out\n")
  with pytest.raises(ConfigError, match=r"a\.tsv:3 has 0 tabs; data.format=tsv expects"):
    next(it)
  (tmp_path / "b.jsonl").write_text(json.dumps({"q": "src", "a": "tgt"}) + "\n"
                                    + json.dumps({"q": "src"}) + "\n")
  it = corpus_lib.iter_pairs(f"{tmp_path}/*.jsonl", "jsonl_pairs", "q", "a")
  assert next(it) == ("b.jsonl:1", "src", "tgt")
  with pytest.raises(ConfigError, match=r"data.target_field='a' is missing at .*b\.jsonl:2"):
    next(it)
  (tmp_path / "m.py").write_text(textwrap.dedent('''\
      def f(x):
        """Doubles x."""
        return 2 * x

      class C:
        @staticmethod
        def g(a,
              b):
          """Adds.

          Really.
          """
          s = a + b
          return s

        def only_doc(self):
          """Nothing else."""

      def no_doc():
        def inner(y):
          """Held by no pair: one of its own."""
          return y

        return 1

      def outer():
        """Its target holds inner2's pair: not one of its own (held out apart from outer's)."""
        def inner2():
          """Inner."""
          return 0
        return inner2
      '''))
  (tmp_path / "bad.py").write_text("def broken(:\n")
  skipped = corpus_lib.SkipCounts()
  got = list(corpus_lib.iter_pairs(f"{tmp_path}/*.py", "functions", skipped=skipped))
  assert got == [
      ("m.py:1:f", 'def f(x):\n  """Doubles x."""\n', "return 2 * x\n"),
      ("m.py:7:g", 'def g(a,\n      b):\n  """Adds.\n\n  Really.\n  """\n',
       "s = a + b\nreturn s\n"),
      ("m.py:20:inner", 'def inner(y):\n  """Held by no pair: one of its own."""\n', "return y\n"),
      ("m.py:26:outer", 'def outer():\n  """Its target holds inner2\'s pair: not one of its own '
       '(held out apart from outer\'s)."""\n',
       'def inner2():\n  """Inner."""\n  return 0\nreturn inner2\n')]
  assert skipped.unparsable_files == 1
  docs = list(corpus_lib.iter_documents(f"{tmp_path}/m.py", "functions"))
  assert [d[0] for d in docs] == [f"m.py:{i}:{side}" for i in ("1:f", "7:g", "20:inner", "26:outer")
                                  for side in ("source", "target")]


def _examples(batch, tok):
  """(source text, target text) of every packed example of a batch; checks the decoder shift."""
  out = []
  for r in range(batch["encoder_inputs"].shape[0]):
    es, ds = batch["encoder_segment_ids"][r], batch["decoder_segment_ids"][r]
    for k in np.unique(es[es > 0]):
      enc, tgt = batch["encoder_inputs"][r][es == k], batch["decoder_targets"][r][ds == k]
      dec_in = batch["decoder_inputs"][r][ds == k]
      assert dec_in[0] == tok.bos_id and (dec_in[1:] == tgt[:-1]).all()
      np.testing.assert_array_equal(batch["decoder_positions"][r][ds == k], np.arange(len(tgt)))
      assert enc[0] == tok.bos_id and enc[-1] == tok.eos_id
      if tgt[-1] == tok.eos_id:
        out.append((tok.decode(enc[1:-1].tolist()), tok.decode(tgt[:-1].tolist())))
  return out


def test_decoder_inputs_are_the_targets_shifted_right_even_when_empty():
  """For any lengths, eos or not, and an empty target: as many decoder inputs as targets, each
  the target before it (the decoder start first), so packed pairs stay aligned. The source is
  framed as inference frames it (objectives.source_ids): a source cut to seq_len keeps its eos
  (it was cut off, where inference put one)."""
  rng = np.random.default_rng(0)
  tok = types.SimpleNamespace(bos_id=2, eos_id=3)
  for add_eos in (False, True):
    made = []
    d = types.SimpleNamespace(objective="seq2seq", add_bos=True, add_eos=add_eos)
    for _ in range(40):
      source, target = (list(rng.integers(10, 99, rng.integers(0, 11))) for _ in range(2))
      e = seq2seq.example(source, target, bos_id=2, eos_id=3, start_id=5, add_bos=True,
                          add_eos=add_eos, seq_len=8, target_len=int(rng.integers(1, 7)))
      t = list(e["decoder_targets"])
      assert list(e["decoder_inputs"]) == ([5] + t)[:len(t)], (source, target)
      assert list(e["encoder_inputs"]) == objectives.source_ids(d, tok, source, max_len=8,
                                                                cut_start=False), source
      made.append(e)
    packed = grain.experimental.FirstFitPackIterDataset(
        grain.MapDataset.source(made).to_iter_dataset(), num_packing_bins=2,
        length_struct={"encoder_inputs": 32, "decoder_inputs": 32, "decoder_targets": 32})
    for row in map(common.encdec_row, packed):
      inputs, targets = row["decoder_inputs"], row["decoder_targets"]
      starts = np.flatnonzero(row["decoder_positions"] == 0)
      live = row["decoder_segment_ids"] > 0
      assert (inputs[1:][live[1:]] == np.where(np.isin(np.arange(1, 32), starts), 5,
                                               targets[:-1])[live[1:]]).all()


def test_pipeline_packs_whole_pairs(tiny_data, pairs):
  c = _config(tiny_data, pairs, **{"train.batch_size": 8})
  tok = pipeline.load_tokenizer(c)
  it = pipeline.make_train_iterator(c)
  batches = [next(it) for _ in range(3)]
  assert batches[0]["decoder_targets"].shape == (8, 16)
  known = {tuple(f.replace("\\n", "\n") for f in line.split("\t"))
           for line in (pairs["root"] / "train.tsv").read_text().splitlines() if line}
  examples = [e for b in batches for e in _examples(b, tok)]
  assert len(examples) > 20 and all(e in known for e in examples)
  resumed = pipeline.make_train_iterator(c)
  resumed.set_state(pipeline.make_train_iterator(c).get_state())
  np.testing.assert_array_equal(next(resumed)["encoder_inputs"], batches[0]["encoder_inputs"])
  (ev,) = pipeline.eval_batches(c, 1)
  assert all(e in known for e in _examples(ev, tok))


def test_format_and_objective_must_agree(tiny_data, pairs):
  with pytest.raises(ConfigError, match=r"data.format='text' holds documents: data.objective="
                     r"'seq2seq' needs one of tsv, jsonl_pairs, functions"):
    pipeline.validate(_config(tiny_data, pairs, **{"data.format": "text"}))
  with pytest.raises(ConfigError, match=r"data.format='tsv' holds pairs: data.objective='span'"):
    pipeline.validate(_config(tiny_data, pairs, **{"data.objective": "span"}))
  with pytest.raises(ConfigError, match=r"data.objective='seq2seq' does not train model.family"):
    objectives.check(config_lib.load(f"{REPO}/configs/gpt2.py:tiny",
                                        tiny_overrides(tiny_data, **{"data.objective": "seq2seq"})))
  learned = _config(tiny_data, pairs, **{"model.position": "learned", "model.max_len": 32,
                                         "data.seq_len": 32, "data.target_len": 64})
  with pytest.raises(ConfigError, match=r"^model.max_len=32 is shorter than the decoder's 64 "):
    objectives.check(learned)  # (its rows past 32 read no position: NaN logits)


def test_tfds_catalog_pairs(tiny_data, pairs, tmp_path):
  extra = {"data.corpus": "tfds:tjax_test_pairs", "data.source_field": "de",
           "data.target_field": "en", "data.data_dir": str(tmp_path)}
  c = _config(tiny_data, pairs, **extra)
  tok = pipeline.load_tokenizer(c)
  examples = _examples(next(pipeline.make_train_iterator(c)), tok)
  assert examples and all(s.split() == t.split()[::-1] for s, t in examples)
  assert _examples(pipeline.eval_batches(c, 1)[0], tok)  # the validation split
  docs = list(tfds_text.documents("tfds:tjax_test_pairs", source_field="de",
                                  target_field="en", data_dir=str(tmp_path)))
  assert len(docs) == 80 and docs[1][1].split() == docs[0][1].split()[::-1]  # for a tokenizer
  with pytest.raises(ConfigError, match=r"data.target_field='fr' is not a feature of "
                     r"tfds:tjax_test_pairs \(it has de, en\)"):
    pipeline.validate(_config(tiny_data, pairs, **{**extra, "data.target_field": "fr"}))
  with pytest.raises(ConfigError, match=r"data.corpus=tfds:no_such_dataset_xyz: "):
    pipeline.validate(_config(tiny_data, pairs, **{**extra, "data.corpus": "tfds:no_such_dataset_xyz"}))


def test_a_catalog_dataset_mixes_with_local_pairs(tiny_data, pairs, tmp_path):
  """data.mixture: a tfds: source beside a local TSV one, encoder-decoder rows tagged by source."""
  mix = ({"name": "catalog", "corpus": "tfds:tjax_test_pairs", "format": "tsv",
          "source_field": "de", "target_field": "en", "weight": 1},
         {"name": "local", "weight": 3})
  c = _config(tiny_data, pairs, **{"data.mixture": repr(mix), "data.data_dir": str(tmp_path),
                                   "train.batch_size": 8})
  pipeline.validate(c)
  tok = pipeline.load_tokenizer(c)
  known = {tuple(f.replace("\\n", "\n") for f in line.split("\t"))
           for line in (pairs["root"] / "train.tsv").read_text().splitlines() if line}
  it = pipeline.make_train_iterator(c)
  rows = {0: 0, 1: 0}
  for _ in range(4):
    batch = next(it)
    assert batch["source"].shape == batch["encoder_inputs"].shape
    for r, source in enumerate(batch["source"][:, 0]):
      rows[int(source)] += 1
      one = {k: v[r:r + 1] for k, v in batch.items()}
      for src, tgt in _examples(one, tok):
        assert (src.split() == tgt.split()[::-1]) if source == 0 else ((src, tgt) in known)
  it.close()
  assert rows == {0: 8, 1: 24}
  sets = pipeline.eval_sets(c, 1)
  assert list(sets) == ["catalog", "local"] and _examples(sets["catalog"][0], tok)


def test_transformer_base_reads_wmt14_from_the_catalog():
  """configs/transformer.py:base names TFDS's WMT14 and its fields (checked without a download)."""
  c = config_lib.load(f"{REPO}/configs/transformer.py:base")
  tfds_text.check_catalog_fields(c.data, seq2seq=True)
  assert (c.data.corpus, c.data.source_field, c.data.target_field) == (
      "tfds:wmt14_translate/de-en", "en", "de")


def test_transformer_trains_on_pairs(tiny_data, pairs, tmp_path, capsys):
  """(and `sample` shows its output apart from the source: it printed them run together)"""
  c = _config(tiny_data, pairs, **{"train.steps": 16, "train.log_every": 4, "model.num_layers": 1,
                                   "eval.every_steps": 16, "checkpoint.every_steps": 16,
                                   "optimizer.warmup_steps": 4})
  loop.train(c, str(tmp_path), quiet=True, devices=jax.devices()[:1])
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 4 and losses[-1] < losses[0] - 0.5, losses
  assert any("eval_loss" in r and np.isfinite(r["eval_loss"]) for r in rows)
  from transformer_jax import sample  # pylint: disable=g-import-not-at-top
  capsys.readouterr()
  sample.main([f"--workdir={tmp_path}", "--prompt=def value", "--max_new_tokens=3",
               "--temperature=0"])
  assert capsys.readouterr().out.startswith("[step 16] def value => ")


@pytest.mark.parametrize("recipe, objective, noise", [
    ("t5", "denoise", "infill"), ("t5", "denoise", "delete"), ("t5", "ul2", ""),
    ("t5", "span", ""), ("transformer", "seq2seq", "")])
def test_an_encoder_decoder_request_reads_as_its_training_rows(recipe, objective, noise,
                                                               monkeypatch):
  """A document objective's target is running text (BART's infilling and UL2 kept a word's
  space; denoise's was stripped, scored as pieces it never saw there): a context and
  continuation are split as one text, the context's trailing space moved on; a pair's target is
  a text of its own (stripped). Generation drops a prompt's trailing space from the source (a
  lone space before eos, which training never made). Sources start with bos (data.add_bos).
  BART rebuilt its whole source: its decoder is given the source's text (bos, the context)
  before the continuation, and an infilling source ends with [MASK]; a span T5's decoder is
  given <extra_id_0>, which ends its source."""
  overrides = [f"data.objective={objective}"] + [f"data.denoise_noise={noise}"] * bool(noise)
  config = config_lib.load(f"{REPO}/configs/{recipe}.py:tiny", overrides)
  tok = types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, mask_id=97, mode_ids=[60, 61, 62],
                              sentinel_ids=[99, 98], encode=lambda t: [3 + ord(c) % 50 for c in t],
                              decode=lambda ids: "")
  lm, seen = scoring.Lengths(config, tok), []
  monkeypatch.setattr(lm, "ids_loglikelihood", lambda pairs: seen.extend(pairs) or [(0, 0)])
  lm.loglikelihood([("the cat ", "sat")])
  text = tok.encode("the cat" if objective != "seq2seq" else "the cat ")
  head = [61] * (objective == "ul2") + [1]
  tail = {"ul2": [2], "span": [99, 2], "seq2seq": [2]}.get(objective, [97] * (noise == "infill"))
  given = {"denoise": head + text, "span": [99]}.get(objective, [])
  want = tok.encode(" sat") if objective != "seq2seq" else tok.encode("sat")
  source = head + text + tail
  assert seen == [(source, given, want) if objective != "seq2seq" else (source, want)]
  monkeypatch.setattr(scoring.sampling, "generate",
                      lambda model, params, ids, *a, **k: seen.append((ids, k["decoder_ids"]))
                      or [[2]] * len(ids))
  scoring.TextModel.generate(lm, ["the cat "], max_new_tokens=2)  # (Lengths generates nothing)
  assert seen[-1] == ([source], [[1] + given])


def test_bart_scores_and_generates_in_its_training_frame():
  """A denoise model's score is its loss's: the source bos + context + [MASK], the decoder
  given start + bos + context and scored on the continuation alone; greedy generation goes on
  from that same given prefix; a context too long for the model loses its start in both."""
  config = config_lib.load(f"{REPO}/configs/t5.py:tiny", ["data.objective=denoise"])
  config.model.update({"max_len": 16, "num_layers": 1})
  model = families.build_model(config)
  params = jax.jit(model.init)(jax.random.key(0), *families.init_inputs(model))["params"]
  tok = types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, mask_id=4, sentinel_ids=[],
                              encode=lambda t: [5 + ord(c) % 60 for c in t], decode=list)
  lm = scoring.TextModel(config, params, tok, batch_size=2)
  ctx, cont = tok.encode("abcdefghijklmnopqrstu"), tok.encode(" vw")
  got = lm.loglikelihood([("abcdefghijklmnopqrstu", " vw"), ("ab", " vw")])
  apply = jax.jit(model.apply)  # (eagerly each forward compiled every op on its own)
  for kept, (ll, _) in zip([ctx[-(16 - 1 - 3):], ctx[:2]], got):
    start = objectives.decoder_start(tok)
    enc, dec = [[1] + kept + [4]], [[start, 1] + kept + cont[:-1]]
    log_p = jax.nn.log_softmax(apply({"params": params}, jnp.asarray(enc),
                                     jnp.asarray(dec))[0, -len(cont):])
    assert ll == pytest.approx(float(sum(log_p[j, t] for j, t in enumerate(cont))), abs=1e-4)
  new = sampling.generate(model, params, [[1] + ctx[:2] + [4]], 3, temperature=0.0,
                          start_id=start, decoder_ids=[[start, 1] + ctx[:2]])
  assert lm.generate(["ab"], max_new_tokens=3) == [new[0]]
  with pytest.raises(ConfigError, match="^a continuation of 16 tokens after the 1 its decoder "
                                        "is given first is longer than the model's 16"):
    lm.loglikelihood([("ab", " " + "c" * 15)])  # (bos, then the continuation: 17 positions)


def test_a_span_corruption_t5_is_asked_for_its_first_masked_span():
  """A span-corruption T5 was trained to fill <extra_id_0>: the source ends with it and eos, the
  target starts with it (given, not scored) and then holds the span as the text had it, its
  leading space included (it was stripped: scored as pieces the model never saw there);
  generation is given it too and stops at the next sentinel."""
  config = config_lib.base.get_config()
  config.model.update({**TINY_MODEL, "family": "encdec", "max_len": 32, "num_layers": 1})
  config.data.update(objective="span")
  model = families.build_model(config)
  params = jax.jit(model.init)(jax.random.key(0), *families.init_inputs(model))["params"]
  s0, s1 = 250, 249
  tok = types.SimpleNamespace(bos_id=-1, eos_id=1, pad_id=0, sentinel_ids=[s0, s1],
                              encode=lambda t: [3 + ord(c) % 200 for c in t],
                              decode=lambda ids: ",".join(map(str, ids)))
  lm = scoring.TextModel(config, params, tok, batch_size=2)
  pairs = [("abcdef", " xyz"), ("hello ", "you")]
  got = [ll for ll, _ in lm.loglikelihood(pairs)]
  forward = jax.jit(lambda source, target: model.apply({"params": params}, source, target))
  # the masked span kept its word's space (a tokenizer without a dummy prefix: " xyz" is not
  # "xyz"), and a context's trailing space moves to the continuation, as lm-eval splits them
  for (context, continuation), ll in zip([("abcdef", " xyz"), ("hello", " you")], got):
    cont = tok.encode(continuation)
    logits = forward(jnp.asarray([tok.encode(context) + [s0, 1]]),
                     jnp.asarray([[0, s0] + cont[:-1]]))
    log_p = np.asarray(jax.nn.log_softmax(logits[0]))
    assert ll == pytest.approx(sum(log_p[1 + j, t] for j, t in enumerate(cont)), abs=1e-4)
  assert lm._span_text([7, 8, s1, 9]) == [7, 8] and lm._span_text([7, s0, 9]) == [7]
  source = jnp.asarray([tok.encode("abcdef") + [s0, 1]])
  row = [0, s0]  # greedy decoding (4 tokens after the given sentinel) by full forward passes
  for _ in range(4):  # (the decoder is causal: the zeros after the row change nothing before)
    logits = forward(source, jnp.asarray([row + [0] * (6 - len(row))]))
    row.append(int(jnp.argmax(logits[0, len(row) - 1])))
  new = row[2:row.index(1)] if 1 in row else row[2:]
  assert lm.generate(["abcdef"], max_new_tokens=4) == [",".join(map(str, lm._span_text(new)))]
