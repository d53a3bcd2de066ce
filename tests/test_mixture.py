"""Weighted data mixtures (data/mixture.py): shares, resume, errors, eval and the tokenizer."""

import collections
import json
import os
import random

import jax
import numpy as np
import pytest

from transformer_jax import benchmark
from transformer_jax import config as config_lib
from transformer_jax import tokenizer as tokenizer_cli
from transformer_jax.config import ConfigError
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import mixture
from transformer_jax.data import pipeline
from transformer_jax.data import tfds_text
from transformer_jax.data import tokenization as tokenizer_lib
from transformer_jax.parallel import sharding
from transformer_jax.training import loop
from transformer_jax.training import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROSE = "the cat sat on a mat and then ran over to see what was there".split()
CODE = "def return self x y = + ( ) : if else for in".split()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Three sources of different document lengths and formats, and a tokenizer for all."""
  root = tmp_path_factory.mktemp("mixture")
  rng = random.Random(0)
  (root / "prose").mkdir()
  (root / "code").mkdir()
  for i in range(40):  # long documents: many chunks each
    words = (rng.choice(PROSE) for _ in range(rng.randint(20, 200)))
    (root / "prose" / f"p{i}.txt").write_text(" ".join(words) + "\n")
    lines = (" ".join(rng.choice(CODE) for _ in range(rng.randint(1, 8)))
             for _ in range(rng.randint(2, 30)))
    (root / "code" / f"c{i}.py").write_text("\n".join(lines) + "\n")
  with open(root / "short.jsonl", "w") as f:  # short documents: many per row
    for _ in range(300):
      words = (rng.choice(PROSE + CODE) for _ in range(rng.randint(2, 12)))
      f.write(json.dumps({"body": " ".join(words)}) + "\n")
  texts = [t for g in (f"{root}/prose/*.txt", f"{root}/code/*.py")
           for _, t in corpus_lib.iter_documents(g)]
  tok = tokenizer_lib.train(texts, 300, str(root / "tok.model"))
  mix = ({"name": "prose", "corpus": f"{root}/prose/*.txt", "weight": 5},
         {"name": "code", "corpus": f"{root}/code/*.py", "weight": 3},
         {"name": "short", "corpus": f"{root}/short.jsonl", "format": "jsonl",
          "text_field": "body", "weight": 2})
  return {"root": root, "tokenizer": tok, "mixture": mix,
          "data_dir": str(tmp_path_factory.mktemp("tfds"))}


def _config(sources, **overrides):
  c = config_lib.base.get_config()
  c.seed = 3
  c.data.update(tokenizer=sources["tokenizer"], data_dir=sources["data_dir"], seq_len=64,
                mixture=sources["mixture"], validation_fraction=0.1)
  c.train.batch_size = 8
  c.model.vocab_size = 512
  for key, value in overrides.items():
    config_lib.set_value(c, key, value if isinstance(value, str) else repr(value))
  return c


def _source_tokens(batch) -> collections.Counter:
  counts = collections.Counter()
  for source, n in zip(batch["source"][:, 0], (batch["segment_ids"] != 0).sum(axis=1)):
    counts[int(source)] += int(n)
  return counts


@pytest.mark.parametrize("packing,temperature", [("first_fit", 1.0), ("concat", 2.0)])
def test_token_shares_follow_the_weights(sources, packing, temperature):
  c = _config(sources, **{"data.packing": packing, "data.mixture_temperature": temperature})
  pipeline.validate(c)
  probs = mixture.probabilities([5, 3, 2], temperature)
  np.testing.assert_allclose(probs, np.array([5, 3, 2]) ** (1 / temperature)
                             / np.sum(np.array([5, 3, 2]) ** (1 / temperature)))
  it = pipeline.make_train_iterator(c)
  counts = collections.Counter()
  for i in range(60):
    batch = next(it)
    counts += _source_tokens(batch)
    if i == 0:  # the train step's count of the same batch
      got = jax.jit(step_lib.mixture_tokens, static_argnums=1)(batch, 3)
      np.testing.assert_array_equal(got, [_source_tokens(batch)[k] for k in range(3)])
  it.close()
  shares = np.array([counts[k] for k in range(3)]) / sum(counts.values())
  np.testing.assert_allclose(shares, probs, atol=0.02)
  if packing == "concat":  # every row full: the shares are the rows', exact to a row or two
    np.testing.assert_allclose(shares, probs, atol=2 / 480)


def test_the_shares_are_those_grain_draws():
  """grain's mix draws rows in integer proportions (the smallest p scaled to 100, the others
  truncated); each source's probability is that realised share, and one period of sum(rows)
  mixed rows holds exactly `rows` of each."""
  import grain  # pylint: disable=g-import-not-at-top
  c = config_lib.base.get_config()
  for weights, t, rows in (([0.3, 0.7], 1.0, [100, 233]), ([1, 1.0099], 1.0, [100, 100]),
                           ([5, 3, 2], 1.0, [250, 150, 100]), ([1, 2, 8], 2.0, [99, 141, 282])):
    c.data.mixture = [{"name": f"s{i}", "weight": w, "corpus": "x"} for i, w in enumerate(weights)]
    c.data.mixture_temperature = t
    got = mixture.sources(c)
    assert [s.rows for s in got] == rows  # (the last: p_min * (100 / p_min) is 99.99... here)
    assert [s.probability for s in got] == pytest.approx(np.array(rows) / sum(rows), abs=1e-12)
    mixed = grain.IterDataset.mix(
        {s.name: grain.MapDataset.repeat(grain.MapDataset.source([i]), None).to_iter_dataset()
         for i, s in enumerate(got)}, mixture.grain_proportions(got))
    drawn = collections.Counter(x for _, x in zip(range(sum(rows)), mixed))
    assert [drawn[i] for i in range(len(rows))] == rows
  # Below float's range too: w^(1/T) of 0 gave shares of 0/0, and a subnormal ones off by 3 %.
  for weights, t, want in (([0.01, 0.01], 0.005, [0.5, 0.5]),
                           ([0.1, 0.1001], 1 / 322, [1 / (1 + 1.001**322), 0])):
    want[1] = 1 - want[0]
    assert mixture.probabilities(weights, t) == pytest.approx(want, rel=1e-9), weights


def test_resume_on_another_process_count_gives_the_same_batches(sources):
  c = _config(sources, **{"data.shards": 2})
  one = pipeline.make_train_iterator(c)
  for _ in range(5):
    next(one)
  state = json.loads(json.dumps(one.get_state()))  # as a checkpoint keeps it
  expected = [next(one) for _ in range(4)]
  one.close()
  halves = [pipeline.make_train_iterator(c, rows) for rows in ((0, 4), (4, 8))]
  for it in halves:
    it.set_state(state)
  for want in expected:
    parts = [next(it) for it in halves]
    for key, value in want.items():
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
  for it in halves:
    it.close()


def test_a_resume_with_other_weights_or_sources_takes_the_new_mixture(sources):
  """The saved position restores under changed weights (the new shares hold at once, and each
  source goes on with the rows it would have given next), with a source dropped, and with one
  added."""
  c = _config(sources)
  it = pipeline.make_train_iterator(c)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))

  def rows_of(iterator, source, n):
    out = []
    while len(out) < n:
      b = next(iterator)
      out += [row for row, s in zip(b["inputs"], b["source"][:, 0]) if s == source]
    return np.stack(out[:n])
  code_next = rows_of(it, 1, 4)  # what the code source gives next under the old weights
  it.close()
  mix = [dict(s) for s in sources["mixture"]]
  mix[1]["weight"] = 60
  codey = pipeline.make_train_iterator(_config(sources, **{"data.mixture": tuple(mix)}))
  codey.set_state(state)
  np.testing.assert_array_equal(rows_of(codey, 1, 4), code_next)
  codey.close()
  mix[1]["weight"] = 3
  mix[0]["weight"] = 90  # prose: 90 / 95 of the rows
  heavy = pipeline.make_train_iterator(_config(sources, **{"data.mixture": tuple(mix)}))
  heavy.set_state(state)
  counts = collections.Counter()
  for _ in range(10):
    counts += _source_tokens(next(heavy))
  heavy.close()
  assert counts[0] / sum(counts.values()) > 0.85, counts
  for changed in (mix[:2], mix + [dict(mix[1], name="code2")]):
    other = pipeline.make_train_iterator(_config(sources, **{"data.mixture": tuple(changed)}))
    other.set_state(state)
    assert set(np.unique(next(other)["source"])) <= set(range(len(changed)))
    other.close()


@pytest.mark.parametrize("change,match", [
    ({1: {"corpus": "/nonexistent/*.txt"}}, r"source 'code': data.corpus=.*matches no files"),
    ({0: {"weight": 0}}, r"source 'prose': weight=0 must be a number > 0"),
    ({2: {"weight": -1.5}}, r"source 'short': weight=-1.5"),
    ({0: {"weight": 0}, 1: {"weight": 0}, 2: {"weight": 0}}, r"source 'prose': weight=0"),
    ({1: {"name": "prose"}}, r"name\(s\) 'prose' repeated"),
    ({2: {"colour": "red"}}, r"source 'short': unknown key\(s\) colour"),
    ({0: {"name": ""}}, r"data.mixture\[0\] needs a 'name'"),
    ({2: {"format": "xml"}}, r"source 'short': .*xml"),
])
def test_bad_mixtures_are_one_line_errors(sources, change, match):
  mix = [dict(e, **change.get(i, {})) for i, e in enumerate(sources["mixture"])]
  c = _config(sources)
  c.data.mixture = tuple(mix)
  with pytest.raises(ConfigError, match=match) as e:
    pipeline.validate(c)
  assert "\n" not in str(e.value)


def test_bad_temperature(sources):
  with pytest.raises(ConfigError, match="data.mixture_temperature=0.0 must be a number > 0"):
    pipeline.validate(_config(sources, **{"data.mixture_temperature": 0.0}))
  with pytest.raises(ConfigError, match=r"data.mixture_temperature=0.001 gives source '\w+' a "
                                        r"share of 0, under 1e-06"):  # (w^1000: inf, then NaN)
    pipeline.validate(_config(sources, **{"data.mixture_temperature": 0.001}))


def test_mixed_eval_weighs_the_sources():
  per = {"a": {"eval_loss": 2.0, "eval_tokens": 10.0}, "b": {"eval_loss": 4.0,
                                                         "eval_tokens": 30.0}, "c": {}}
  out = mixture.mixed_eval(per, {"a": 0.25, "b": 0.5, "c": 0.25})
  assert out == {"eval_loss/a": 2.0, "eval_loss/b": 4.0, "eval_loss": (0.25 * 2 + 0.5 * 4) / 0.75,
                 "eval_tokens": 40.0}
  assert mixture.mixed_eval({"a": {}}, {"a": 1.0}) == {}


def test_planned_epochs_counts_each_source_and_its_share_of_the_run(sources):
  """With a sample as large as the source, its tokens are exact ([bos] + ids + [eos] of every
  training document); the run reads its row share of steps x batch x seq_len tokens."""
  c = _config(sources, **{"train.steps": 50})
  tok = tokenizer_lib.load(sources["tokenizer"])
  planned = pipeline.planned_epochs(c, sample=10**6)
  assert list(planned) == ["prose", "code", "short"]
  for src in mixture.sources(c):
    texts = [e["text"].decode() for e in tfds_text.data_source(src.config.data, "train")]
    tokens = sum(len(tok.encode(t)) + 2 for t in texts)
    read = src.probability * 50 * 8 * 64
    assert planned[src.name] == (len(texts), pytest.approx(tokens), pytest.approx(read / tokens))
  estimate = pipeline.planned_epochs(c, sample=8)["short"]  # 300 documents of 2-12 words
  assert estimate[1] == pytest.approx(planned["short"][1], rel=0.25)
  single = pipeline.planned_epochs(_config(sources, **{"data.mixture": "()",
                                                        "data.corpus": sources["mixture"][0][
                                                            "corpus"]}), sample=10**6)
  assert list(single) == [""] and single[""][:2] == (planned["prose"][0],
                                                     pytest.approx(planned["prose"][1]))


def test_tokenizer_trains_on_the_mixture(sources, tmp_path):
  """Weights decide what the tokenizer learns: a code-heavy mixture's model encodes code in fewer
  tokens than a prose-heavy one's."""
  code = "".join(t for _, t in corpus_lib.iter_documents(f"{sources['root']}/code/*.py"))
  lengths = {}
  for heavy in ("code", "prose"):
    mix = [dict(e, weight=1000.0 if e["name"] == heavy else 1.0) for e in sources["mixture"]]
    out = str(tmp_path / f"{heavy}.model")
    status = tokenizer_cli.main([f"--config={REPO}/configs/gpt2.py:tiny",
                                 f"--config.data.mixture={mix!r}",
                                 f"--config.data.tokenizer={out}",
                                 "--config.model.vocab_size=300", "--max_chars=20000"])
    assert status == 0
    lengths[heavy] = len(tokenizer_lib.load(out).encode(code))
  assert lengths["code"] < 0.8 * lengths["prose"], lengths


def test_training_logs_tokens_and_eval_loss_per_source(sources, tmp_path, capsys):
  c = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", [
      f"data.tokenizer={sources['tokenizer']}", f"data.data_dir={sources['data_dir']}",
      f"data.mixture={sources['mixture']!r}", "data.validation_fraction=0.1", "data.seq_len=32",
      "model.vocab_size=320", "model.max_len=32", "train.batch_size=4", "train.steps=6",
      "train.log_every=3", "checkpoint.every_steps=6", "eval.every_steps=6", "eval.batches=1",
      "checkpoint.async_save=False", "mesh.data=1"])
  loop.train(c, str(tmp_path / "run"), devices=jax.devices()[:1])
  said = capsys.readouterr()
  for name, (docs, _, epochs) in pipeline.planned_epochs(c).items():
    assert f"source {name!r}: {docs:,} training documents" in said.out + said.err
    assert f"read them ~{epochs:.3g} times" in said.out + said.err
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  logged = [r["mixture_tokens"] for r in rows if "mixture_tokens" in r]
  it = pipeline.make_train_iterator(c)  # the same batches, counted here
  for window in logged:
    counts = sum((_source_tokens(next(it)) for _ in range(3)), collections.Counter())
    assert window == {"prose": counts[0], "code": counts[1], "short": counts[2]}
  # the abstract batch the step is compiled for ahead of time (aot, train.microbatches=0) is
  # the real one, the source index included: the first step reuses that compile
  trainer = step_lib.Trainer(c, sharding.make_mesh(c, jax.devices()[:1]))
  real, abstract = trainer.put_batch(next(it)), trainer.abstract_batch()
  shapes = lambda batch: {k: (v.shape, v.dtype) for k, v in batch.items()}
  assert shapes(real) == shapes(abstract)
  runner = benchmark.JaxRunner.__new__(benchmark.JaxRunner)  # (its batches only: no compile)
  runner.trainer, runner.config, runner.batches = trainer, c, 0
  synthetic = runner.next_batch()  # the benchmark's batches too: its first step is that program
  assert shapes(synthetic) == shapes(abstract)
  assert set(np.unique(synthetic[mixture.SOURCE_KEY])) == {0, 1, 2}
  it.close()
  assert len(logged) == 2
  evals = [r for r in rows if "eval_loss" in r][-1]
  probs = {s.name: s.probability for s in mixture.sources(c)}
  have = {n: p for n, p in probs.items() if f"eval_loss/{n}" in evals}
  assert have, evals
  expected = sum(p * evals[f"eval_loss/{n}"] for n, p in have.items()) / sum(have.values())
  assert evals["eval_loss"] == pytest.approx(expected, rel=1e-6)
