"""Downstream evaluation: log-likelihoods are sums of token log-probabilities (ours and
transformers' for an imported GPT-2), independent of padding side and batch mates; few-shot
prompts are deterministic; the CLI prints one JSON line; eval.tasks reach metrics.jsonl; bad
task files and steps are one-line errors; the lm-eval adapter agrees with `evaluate`."""

import json
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.conftest import REPO, TINY_MODEL, tiny_overrides
from transformer_jax import config as config_lib
from transformer_jax import evaluate as evaluate_cli
from transformer_jax.config import ConfigError
from transformer_jax.evaluation import harness
from transformer_jax.evaluation import scoring
from transformer_jax.evaluation import tasks as tasks_lib
from transformer_jax.models import families
from transformer_jax.training import loop

MC = [{"context": "def read_config(path", "choices": ["):", "x = 1", "import os"], "label": 0},
      {"context": "for x in", "choices": ["range(10):", "def", "return self"], "label": 0},
      {"context": "class Data", "choices": ["(object):", "print name", "1 + 1"], "label": 0},
      {"context": "import", "choices": ["os", "the data", "else"], "label": 1}]


def _write(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("tasks")
  texts = [{"text": "def value(self, x):\n    return self.data"},
           {"text": "for name in data:\n    print name"}]
  gen = [{"source": "x =", "target": "1"}]
  return {"mc": _write(d / "mc.jsonl", MC), "mc_train": _write(d / "mc_train.jsonl", MC[::-1]),
          "cloze": _write(d / "words.jsonl", texts), "ppl": _write(d / "docs.jsonl", texts),
          "cloze_train": _write(d / "words_train.jsonl", texts[::-1]),
          "gen": _write(d / "gen.jsonl", gen), "gen_train": _write(d / "gen_train.jsonl", gen)}


@pytest.fixture(scope="module")
def run(tiny_data, files, tmp_path_factory):
  """A 4-step tiny GPT-2 run, one layer (checkpoints 2 and 4) with eval.tasks = the
  multiple-choice task."""
  workdir = str(tmp_path_factory.mktemp("eval_run"))
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(
      tiny_data, **{"train.steps": 4, "checkpoint.every_steps": 2, "eval.every_steps": 0,
                    "eval.batches": 1, "train.log_every": 2, "model.num_layers": 1,
                    "eval.tasks": repr((files["mc"], "cloze:" + files["cloze"]))}))
  loop.train(config, workdir, quiet=True, devices=jax.devices()[:1])
  trainer, step, params = harness.load_workdir(workdir, devices=jax.devices()[:1])
  return workdir, trainer, step, params


def _lm(run, **kwargs):
  _, trainer, _, params = run
  return harness.text_model(trainer, params, **kwargs)


def _reference(model, params, ctx, cont):
  """log p(cont | ctx) from one unpadded forward pass, summed in numpy."""
  full = ctx + cont
  logits = jax.jit(model.apply)({"params": params}, jnp.asarray([full[:-1]], jnp.int32))[0]
  log_p = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
  return float(sum(log_p[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))


def _pairs(seed, n, vocab=300, length=0):
  """Random (context, continuation) id pairs; `length` > 0: all of that total length."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = rng.integers(3, vocab, length or rng.integers(2, 17)).tolist()
    cut = int(rng.integers(1, len(ids)))
    out.append((ids[:cut], ids[cut:]))
  return out


def test_loglikelihood_is_the_sum_of_token_log_probs(run):
  lm = _lm(run, batch_size=4)
  pairs = _pairs(0, 6, length=13)  # the reference compiles one shape
  got = [ll for ll, _ in lm.ids_loglikelihood(pairs)]
  want = [_reference(lm.model, lm.params, c, x) for c, x in pairs]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)


def test_padding_side_and_batch_mates_do_not_change_a_score(run):
  pairs = _pairs(1, 5)
  right = _lm(run, batch_size=4).ids_loglikelihood(pairs)
  left = _lm(run, batch_size=4, padding="left").ids_loglikelihood(pairs)
  alone = [_lm(run, batch_size=1).ids_loglikelihood([p])[0] for p in pairs[:2]]
  mixed = _lm(run, batch_size=4).ids_loglikelihood(pairs[:2] + _pairs(2, 5))[:2]
  np.testing.assert_allclose([s for s, _ in left], [s for s, _ in right], atol=1e-4)
  np.testing.assert_allclose([s for s, _ in alone], [s for s, _ in right[:2]], atol=1e-4)
  np.testing.assert_allclose([s for s, _ in mixed], [s for s, _ in right[:2]], atol=1e-4)
  # A document's rolling log-likelihood = its windows' (the model is 32 tokens long).
  lm = _lm(run, batch_size=4)
  ids = list(range(5, 75))
  windows = lm.rolling_windows(ids)
  assert [t for _, cont in windows for t in cont] == ids
  assert all(len(c) + len(x) - 1 <= lm.max_len for c, x in windows)
  # a continuation longer than the model is refused, as lm-eval refuses it (its end alone was
  # scored, its first kept token after a context token)
  lm.ids_loglikelihood([([5], list(range(6, 6 + lm.max_len)))])
  with pytest.raises(ConfigError, match=r"^a continuation of 33 tokens is longer than the "):
    lm.ids_loglikelihood([([5], list(range(6, 6 + lm.max_len + 1)))])


@pytest.mark.parametrize("family", ["decoder", "encdec"])
def test_a_capacity_moe_scores_and_samples_without_drops(family):
  """With expert_capacity_factor, a row's padded length set its experts' capacity: its score
  moved with a longer batch mate (0.07 nats), and a prompt's prefill dropped tokens that the
  one-token steps never drop. Scoring and sampling run the model dropless."""
  from transformer_jax.inference import sampling  # pylint: disable=g-import-not-at-top
  config = config_lib.base.get_config()
  config.model.update({**TINY_MODEL, "family": family, "max_len": 64, "num_layers": 1,
                       "num_experts": 4, "experts_per_token": 1, "moe_every": 1,
                       "expert_capacity_factor": 1.0})
  model = families.build_model(config)
  params = jax.jit(model.init)(jax.random.key(0), *families.init_inputs(model))["params"]
  tok = types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0)
  rng = np.random.default_rng(0)
  pair = (rng.integers(3, 256, 8).tolist(), rng.integers(3, 256, 6).tolist())
  mate = (rng.integers(3, 256, 30).tolist(), rng.integers(3, 256, 10).tolist())
  lm = scoring.TextModel(config, params, tok, batch_size=2)
  alone, with_mate = lm.ids_loglikelihood([pair])[0][0], lm.ids_loglikelihood([pair, mate])[0][0]
  assert alone == pytest.approx(with_mate, abs=1e-4)
  dropless = families.for_inference(model)  # the unpadded row's own forward pass, no drops
  forward = jax.jit(dropless.apply)  # (jitted: eagerly it compiled each of its ops)
  ctx, cont = pair
  if family == "decoder":
    logits = forward({"params": params}, jnp.asarray([ctx + cont[:-1]]))[0, len(ctx) - 1:]
  else:
    logits = forward({"params": params}, jnp.asarray([ctx]), jnp.asarray([[1] + cont[:-1]]))[0]
  want = float(np.sum(np.take_along_axis(jax.nn.log_softmax(logits), np.asarray(cont)[:, None],
                                         axis=-1)))
  assert alone == pytest.approx(want, abs=1e-4)
  if family == "decoder":  # greedy: the prefill's last logits vs one token at a time
    prompt = rng.integers(3, 256, (1, 24)).tolist()
    want = [int(np.argmax(forward({"params": params}, jnp.asarray(prompt))[0, -1]))]
    assert sampling.generate(model, params, prompt, 1, temperature=0.0) == [want]


def test_a_prefix_lm_scores_and_generates_from_its_context_read_both_ways():
  """data.objective=prefix_lm trains every prediction on a prefix read bidirectionally: scoring
  reads the context as that prefix (whatever the padding side or batch mates), rolling windows
  their context, and generation prefills the prompt as the prefix, then decodes causally (the
  cached steps equal full forward passes with the prompt as prefix)."""
  from transformer_jax.inference import sampling  # pylint: disable=g-import-not-at-top
  config = config_lib.base.get_config()
  config.data.objective = "prefix_lm"
  config.model.update({**TINY_MODEL, "max_len": 64, "num_layers": 2, "init_std": 0.2})
  model = families.build_model(config)
  params = jax.jit(model.init)(jax.random.key(1), *families.init_inputs(model))["params"]
  ids = list(range(5, 150))
  tok = types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0, encode=lambda text: ids)
  apply = jax.jit(model.apply)

  def forward(row, prefix=None):  # one row's logits, the row right-padded to max_len: one
    # compile with a prefix and one without (every later position, padding included, is
    # causal and no prefix: it changes nothing before it)
    pad = lambda values: jnp.asarray([list(values) + [0] * (64 - len(values))])
    extra = {} if prefix is None else {"prefix_BT": pad(prefix)}
    return apply({"params": params}, pad(row), **extra)[0, :len(row)]

  def score(ctx, cont, prefix):  # log p(cont | ctx), the context as its prefix or causal
    logits = forward(ctx + cont[:-1], [1] * len(ctx) + [0] * (len(cont) - 1) if prefix else None)
    log_p = np.asarray(jax.nn.log_softmax(logits[len(ctx) - 1:].astype(jnp.float32)))
    return float(sum(log_p[j, t] for j, t in enumerate(cont)))

  reference = lambda ctx, cont: score(ctx, cont, True)  # one row, the context as its prefix
  pairs = _pairs(3, 5, vocab=256)
  want = [reference(c, x) for c, x in pairs]
  causal = [score(c, x, False) for c, x in pairs]
  assert np.max(np.abs(np.subtract(want, causal))) > 1e-1  # the prefix changes the score
  for padding in ("right", "left"):
    lm = scoring.TextModel(config, params, tok, batch_size=4, padding=padding)
    got = [ll for ll, _ in lm.ids_loglikelihood(pairs + _pairs(4, 2, vocab=256))[:5]]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
  windows = lm.rolling_windows(ids)  # rolling windows: each window's context is its prefix
  assert len(windows) == 3 and lm.loglikelihood_rolling(["any text"])[0] == pytest.approx(
      sum(reference(c, x) for c, x in windows), abs=1e-3)
  prompt = np.random.default_rng(5).integers(3, 256, 12).tolist()
  new = sampling.generate(model, params, [prompt], 6, temperature=0.0, prefix=True)[0]
  row = list(prompt)
  for _ in range(6):
    prefix = [1] * len(prompt) + [0] * (len(row) - len(prompt))
    row.append(int(jnp.argmax(forward(row, prefix)[-1])))
  assert new == row[len(prompt):]
  plain = sampling.generate(model, params, [prompt], 6, temperature=0.0)[0]
  full = list(prompt)  # the causal path is unchanged: the same as full causal forward passes
  for _ in range(6):
    full.append(int(jnp.argmax(forward(full)[-1])))
  assert plain == full[len(prompt):]


def test_a_seq2seq_source_longer_than_the_model_is_cut_as_scoring_cuts_it():
  """generate fed an encoder-decoder the whole source: past model.max_len learned positions the
  table lookup gave NaN. It keeps the last max_len tokens, as scoring does."""
  config = config_lib.base.get_config()
  config.model.update({**TINY_MODEL, "family": "encdec", "max_len": 32, "num_layers": 1,
                       "position": "learned"})
  config.data.update(objective="seq2seq", add_bos=False, add_eos=False)
  model = families.build_model(config)
  params = jax.jit(model.init)(jax.random.key(0), *families.init_inputs(model))["params"]
  tok = types.SimpleNamespace(bos_id=1, eos_id=2, pad_id=0,
                              encode=lambda t: [3 + ord(c) % 200 for c in t],
                              decode=lambda ids: "".join(chr(97 + i % 26) for i in ids))
  lm = scoring.TextModel(config, params, tok, batch_size=1)
  text = "".join(chr(97 + i % 26) for i in range(50))
  assert lm.generate([text], max_new_tokens=4) == lm.generate([text[-32:]], max_new_tokens=4)
  # A pair model's bos and eos (or UL2's mode token) stay: the text loses its start instead
  config.data.update(add_bos=True, add_eos=True)
  framed = scoring.TextModel(config, params, tok, batch_size=1).source_ids(text)
  assert framed == [1] + tok.encode(text[-30:]) + [2]
  with pytest.raises(ConfigError, match="a continuation with no tokens cannot be scored"):
    lm.loglikelihood([("abc", "  ")])  # (the target drops spaces: log p 0, every choice's best)


def test_sharded_scores_equal_unsharded(run):
  """On a data x fsdp = 2 x 2 mesh (parameters sharded as training shards them) the scores are
  the single device's."""
  _, trainer, _, params = run
  config = config_lib.from_json_file(os.path.join(run[0], "config.json"))
  config.mesh.update(data=2, fsdp=2)
  sharded = harness.Trainer(config, harness.sharding.make_mesh(config, jax.devices()[:4]))
  placed = jax.device_put(params, sharded.state_shardings.params)
  assert not all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(placed))
  pairs = _pairs(4, 6)
  got = harness.text_model(sharded, placed).ids_loglikelihood(pairs)
  want = _lm(run).ids_loglikelihood(pairs)
  np.testing.assert_allclose([s for s, _ in got], [s for s, _ in want], atol=1e-4)


def test_encoder_decoder_scores_the_target_given_the_source():
  """Context -> encoder, continuation -> decoder (after the start token), any padding."""
  config = config_lib.base.get_config()
  config.model.update({**TINY_MODEL, "family": "encdec", "max_len": 32, "num_layers": 1})
  model = families.build_model(config)
  params = jax.jit(model.init)(jax.random.key(0), *families.init_inputs(model))["params"]
  tok = types.SimpleNamespace(bos_id=0, eos_id=1)
  ids = np.random.default_rng(5).integers(3, 256, (3, 10))
  pairs = [(row[:6].tolist(), row[6:].tolist()) for row in ids]  # one shape: one compile
  logits = jax.jit(model.apply)({"params": params}, jnp.asarray(ids[:, :6]),
                                jnp.asarray(np.concatenate([ids[:, :1] * 0, ids[:, 6:9]], 1)))
  log_p = np.asarray(jax.nn.log_softmax(logits))
  want = [sum(log_p[i, j, t] for j, t in enumerate(tgt)) for i, (_, tgt) in enumerate(pairs)]
  for padding in ("right", "left"):
    lm = scoring.TextModel(config, params, tok, batch_size=4, padding=padding)
    got = [ll for ll, _ in lm.ids_loglikelihood(pairs)]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_imported_gpt2_matches_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformer_jax.convert.hf import from_hf  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64))
  hf.eval()
  hf.save_pretrained(str(tmp_path))
  model, params = from_hf(str(tmp_path))
  config = config_lib.base.get_config()
  config.model.update(family="decoder", max_len=64)
  config.data.add_bos = False
  tok = types.SimpleNamespace(bos_id=0, eos_id=0)
  lm = scoring.TextModel(config, params, tok, model=model, batch_size=4)
  pairs = _pairs(3, 5, vocab=100)
  got = [ll for ll, _ in lm.ids_loglikelihood(pairs)]
  want = []
  for ctx, cont in pairs:
    with torch.no_grad():
      logits = hf(input_ids=torch.tensor([ctx + cont])).logits[0].double()
    log_p = torch.log_softmax(logits, -1).numpy()
    want.append(sum(log_p[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_fewshot_prompts_are_deterministic(files):
  task = tasks_lib.load(files["mc"], num_fewshot=2)
  assert task.train  # mc_train.jsonl beside mc.jsonl
  first = [tasks_lib.fewshot_prefix(task, i, 2, seed=0) for i in range(4)]
  again = tasks_lib.load(files["mc"], num_fewshot=2)
  assert first == [tasks_lib.fewshot_prefix(again, i, 2, seed=0) for i in range(4)]
  assert all(p.count(tasks_lib.SHOT_SEPARATOR) == 2 for p in first)
  for i, prefix in enumerate(first):  # never the example itself
    mine = "".join(tasks_lib.join(MC[i]["context"], MC[i]["choices"][MC[i]["label"]]))
    assert mine + tasks_lib.SHOT_SEPARATOR not in prefix
  assert len(set(first)) > 1  # drawn per example


def test_bad_tasks_and_steps_are_one_line_errors(files, run, tmp_path):
  cases = {"lacks field(s) label": [{"context": "a", "choices": ["b"]}, {"context": "a"}],
           "holds no examples": [],
           "cannot tell the task kind": [{"question": "?"}],
           # wrong types were tracebacks at the first evaluation (mid-training with eval.tasks)
           "example 1's context is 3, not a string": [{"context": 3, "choices": ["b"],
                                                       "label": 0}],
           "list of string choices": [{"context": "a", "choices": [1, 2], "label": 0}],
           "example 1's text is 7, not a string": [{"text": 7}],
           "every text is empty: nothing to score": [{"text": ""}, {"text": ""}],  # (ppl 1.0)
           "a depth in [0, 1]": [{"length": 10, "depth": 3.0}],  # (it placed the key at 1.0)
           "an integer length >= 0": [{"length": "long", "depth": 0.5}],
           # no token to score: log p 0, the best of every example's choices
           "example 1's choice 1 is '': a choice needs text to score": [
               {"context": "a", "choices": ["b", ""], "label": 0}]}
  for message, rows in cases.items():
    path = _write(tmp_path / "bad.jsonl", rows)
    spec = path if "label" not in message else f"multiple_choice:{path}"
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
      tasks_lib.load(spec)
    assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="does not exist"):
    tasks_lib.load(str(tmp_path / "none.jsonl"))
  with pytest.raises(ConfigError, match=r"\?nosuch= names no field a multiple_choice task reads "
                                        r"\(context, choices, label\)$"):  # (it was ignored)
    tasks_lib.load(_write(tmp_path / "mc.jsonl", MC) + "?nosuch=x")
  with pytest.raises(ConfigError, match=r"--num_fewshot=2: no task here takes few-shot .*"
                                        r"\(perplexity are scored without\)"):
    harness.load_tasks([files["ppl"]], num_fewshot=2)  # (ignored)
  with pytest.raises(ConfigError, match="--fewshot_file gives the examples of --num_fewshot"):
    evaluate_cli.main([f"--workdir={run[0]}", f"--tasks={files['mc']}",
                       f"--fewshot_file={files['mc']}"])  # (read by nothing)
  with pytest.raises(ConfigError, match="train split"):
    tasks_lib.load(_write(tmp_path / "alone.jsonl", MC), num_fewshot=1)
  # an encoder-decoder's generation reads no examples: no train split asked for (it was), and
  # alone it is the same refusal as perplexity's
  gen = _write(tmp_path / "g.jsonl", [{"source": "a b", "target": "c"}])
  assert tasks_lib.load(gen, num_fewshot=1, family="encdec").train == []
  with pytest.raises(ConfigError, match=r"\(generation are scored without on an encoder-dec"):
    harness.load_tasks([gen], num_fewshot=1, family="encdec")
  with pytest.raises(ConfigError, match="train split"):
    harness.load_tasks([gen], num_fewshot=1, family="decoder")
  for spec in (files["ppl"], "passkey:" + _write(tmp_path / "pk.jsonl",
                                                  [{"length": 10, "depth": 0.5}])):
    with pytest.raises(ConfigError, match=r"task '\w+' is a (perplexity|passkey) task, which "
                       r"scores a decoder's text from its first token; this model is an "
                       r"encoder-decoder"):  # (passkey's prompt reached T5 unframed)
      harness.load_tasks([spec], family="encdec")
  # A lone surrogate escape (valid JSON) is U+FFFD, as in a corpus (the tokenizer's traceback)
  with open(tmp_path / "surrogate.jsonl", "w") as f:
    f.write('{"context": "a \\ud83d b", "choices": ["x", "y"], "label": 0}\n')
  assert tasks_lib.load(str(tmp_path / "surrogate.jsonl")).examples[0]["context"] == "a \ufffd b"
  with pytest.raises(ConfigError, match=r"no checkpoint for step 99 .*steps: 2, 4\)") as e:
    harness.load_workdir(run[0], 99, devices=jax.devices()[:1])
  assert "\n" not in str(e.value)


def test_cli_prints_every_tasks_metrics_as_one_json_line(run, files, capsys):
  specs = [files["mc"], "cloze:" + files["cloze"], files["ppl"], files["gen"]]
  evaluate_cli.main([f"--workdir={run[0]}", "--step=2", "--tasks=" + ",".join(specs),
                     "--num_fewshot=1", "--batch_size=4"])
  printed = capsys.readouterr()
  out = json.loads(printed.out.strip().splitlines()[-1])
  assert "note: --num_fewshot=1 does not apply to docs: scored without examples" in printed.err
  assert out["step"] == 2
  t = out["tasks"]
  assert set(t) == {"mc", "words", "docs", "gen"}
  assert 0 <= t["mc"]["acc"] <= 1 and 0 <= t["mc"]["acc_norm"] <= 1
  assert t["words"]["perplexity"] > 1 and t["docs"]["bits_per_byte"] > 0
  assert {"exact_match", "bleu", "chrf"} <= set(t["gen"])
  assert all(m["examples_per_s"] > 0 for m in t.values())


def test_a_passkey_rows_own_key_is_used_even_zero():
  rng = np.random.default_rng(0)
  assert [tasks_lib.passkey_key(r, rng) for r in ({"key": 0}, {"key": 7}, {"key": None})][:2] \
      == [0, 7]
  assert 10_000 <= tasks_lib.passkey_key({}, rng) < 100_000


def test_only_tasks_that_read_the_examples_count_as_few_shot():
  """An encoder-decoder's generation and summarization feed the source alone to the encoder;
  perplexity and passkey take no examples (evaluate notes these when --num_fewshot is set)."""
  kinds = {k: tasks_lib.Task(name=k, kind=k, path="", examples=[]) for k in tasks_lib.KINDS}
  for seq2seq, reads in ((False, {"multiple_choice", "generation", "summarization", "cloze"}),
                         (True, {"multiple_choice", "cloze"})):
    lm = types.SimpleNamespace(is_seq2seq=seq2seq)
    assert {k for k, t in kinds.items() if tasks_lib.uses_fewshot(t, lm)} == reads


def test_a_passkey_longer_than_the_model_is_refused_not_cut(run, tmp_path):
  """Scoring keeps a row's last model.max_len tokens: a longer passkey prompt lost its start
  (the needle, at depth 0) and was still reported under its length."""
  spec = _write(tmp_path / "long_keys.jsonl", [{"length": 200, "depth": 0.0, "key": 12345}])
  with pytest.raises(ConfigError, match=r"passkey length=200 needs \d+ prompt tokens, more than "
                                        r"model.max_len=32 .* too short for it") as e:
    harness.evaluate(_lm(run), [spec])
  assert "\n" not in str(e.value)
  # A model long enough for the rows: scored (a random one rarely retrieves the key).
  config = config_lib.from_json_file(os.path.join(run[0], "config.json"))
  config.model.update(position="rotary", max_len=256)
  model = families.build_model(config)
  params = jax.jit(model.init)(jax.random.key(0), *families.init_inputs(model))["params"]
  lm = scoring.TextModel(config, params, _lm(run).tokenizer, batch_size=2)
  spec = _write(tmp_path / "keys.jsonl", [{"length": 120, "depth": d} for d in (0.0, 1.0)])
  assert harness.evaluate(lm, [spec])["keys"]["acc"] in (0.0, 0.5, 1.0)
  with pytest.raises(ConfigError, match=r"passkey length=400 .*use lengths up to 25\d"):
    harness.evaluate(lm, [_write(tmp_path / "k.jsonl", [{"length": 400, "depth": 0.5}])])


def test_eval_tasks_reach_metrics_jsonl(run, files):
  with open(os.path.join(run[0], "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if "eval_loss" in line]
  assert rows and {"eval_mc_acc", "eval_mc_acc_norm", "eval_words_acc",
                   "eval_words_perplexity"} <= set(rows[-1])
  want = harness.evaluate(_lm(run), [files["mc"]])["mc"]
  assert rows[-1]["eval_mc_acc"] == pytest.approx(want["acc"])


def test_lm_eval_adapter_agrees_with_evaluate(run, files, tmp_path):
  pytest.importorskip("lm_eval")
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  from transformer_jax.evaluation import lm_eval_adapter  # pylint: disable=g-import-not-at-top
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  (tmp_path / "tjax_mc.yaml").write_text(
      "task: tjax_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
      f"    test: {files['mc']}\ntest_split: test\noutput_type: multiple_choice\n"
      "doc_to_text: '{{context}}'\ndoc_to_target: '{{label}}'\ndoc_to_choice: '{{choices}}'\n"
      "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
  lm = _lm(run)
  out = lm_eval.simple_evaluate(
      model=lm_eval_adapter.TransformerJaxLM(text_model=lm), tasks=["tjax_mc"],
      task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False), num_fewshot=0)
  got = out["results"]["tjax_mc"]
  want = harness.evaluate(lm, [files["mc"]])["mc"]
  assert got["acc,none"] == pytest.approx(want["acc"])
  assert got["acc_norm,none"] == pytest.approx(want["acc_norm"])
  # (context, continuation) ids are lm-eval's own split at every cut of a text, also where a
  # token spans the cut ("sel|f": the continuation starts after the context's token count)
  from lm_eval.api.model import TemplateLM  # pylint: disable=g-import-not-at-top
  theirs = types.SimpleNamespace(backend="causal", tok_encode=lm.encode)
  text = "def value(self, x):\n    return self.data  "
  split = TemplateLM._encode_pair  # pylint: disable=protected-access
  for cut in range(1, len(text)):
    assert lm.encode_pair(text[:cut], text[cut:]) == split(theirs, text[:cut], text[cut:]), cut
  # the command line's own batch_size (always given) does not clash with model_args'
  made = lm_eval_adapter.TransformerJaxLM.create_from_arg_string(
      f"workdir={run[0]},batch_size=4", {"batch_size": 1, "device": None})
  assert made.text_model.batch_size == 4
  for args, match in ((f"workdri={run[0]}", "workdri: unknown"), (f"workdir={run[0]},step=x",
                                                                  "step='x' must be")):
    with pytest.raises(ConfigError, match=f"^--model_args {match}"):  # (not a typo's "got ''")
      lm_eval_adapter.TransformerJaxLM.create_from_arg_string(args, {"batch_size": 1})


def _fake_lm(outputs, seen):
  """A stand-in TextModel for the scoring tests: `generate` writes the given outputs (and keeps
  the prompts), `loglikelihood` prefers the continuation that names the context's last word."""
  def generate(prompts, until, max_new_tokens):
    seen.extend(prompts)
    assert until and max_new_tokens > 0
    return list(outputs)
  def loglikelihood(pairs):
    return [(0.0 if ctx.split()[-1] in cont else -5.0, False) for ctx, cont in pairs]
  return types.SimpleNamespace(is_seq2seq=False, encode=str.split, generate=generate,
                               loglikelihood=loglikelihood)


def test_a_cloze_perplexity_is_not_capped_at_e50():
  """An untrained model's per-word perplexity (a word of many tokens) is past e^50 (it read
  5e21 where it was 3e35)."""
  lm = types.SimpleNamespace(loglikelihood=lambda pairs: [(-81.6, False) for _ in pairs])
  task = tasks_lib.Task("c", "cloze", "c.jsonl", [{"text": "the cat sat"}])
  assert tasks_lib.run(task, lm)["perplexity"] == pytest.approx(np.exp(81.6), rel=1e-9)


def test_cloze_cuts_before_the_last_word():
  split = tasks_lib._split_last_word  # pylint: disable=protected-access
  assert split("the cat sat\n") == ("the cat", " sat")
  assert split("one line\nlast") == ("one line", "\nlast")  # not "line\nlast"
  assert split("x\tword") == ("x", "\tword") and split("alone") == ("", "alone")


def test_generation_prompts_end_where_the_target_would_start(tmp_path):
  """A decoder's prompt ends with the source (and a summary's with the cue): the model writes
  the target's leading space, as lm-eval's generate_until; the shots hold it."""
  rows = [{"source": "The capital of France is", "target": "Paris"},
          {"source": "One plus one is", "target": "two"}]
  task = tasks_lib.load(_write(tmp_path / "gen.jsonl", rows))
  seen = []
  assert tasks_lib.run(task, _fake_lm([" Paris", "three"], seen))["exact_match"] == 0.5
  assert seen == [r["source"] for r in rows]
  task.train = rows
  assert tasks_lib.fewshot_prefix(task, 0, 1) == "One plus one is two" + tasks_lib.SHOT_SEPARATOR
  summary = {"document": "Dogs bark.", "summary": "dogs bark"}
  answered = tasks_lib._answered  # pylint: disable=protected-access
  assert answered("summarization", summary) == "Dogs bark.\nTL;DR: dogs bark"


def test_summaries_are_scored_with_rouge(tmp_path):
  rows = [{"document": "The cat sat on the mat all day.", "summary": "the cat sat on the mat"},
          {"document": "Dogs bark.", "summary": "dogs bark loudly"}]
  task = tasks_lib.load(_write(tmp_path / "sums.jsonl", rows))
  assert task.kind == "summarization"
  seen = []
  exact = tasks_lib.run(task, _fake_lm([r["summary"] for r in rows], seen))
  assert exact == {"rouge1": 100.0, "rouge2": 100.0, "rougeLsum": 100.0}
  assert seen == [r["document"] + tasks_lib.SUMMARY_CUE for r in rows]
  partial = tasks_lib.run(task, _fake_lm(["the cat sat", "cats"], []))
  # rouge1: P 3/3, R 3/6 -> F 2/3 and "cats" stems to "cat", not in "dogs bark loudly": 0.
  # rouge2: P 2/2, R 2/5 -> F 4/7; the second has no bigram: 0.
  assert partial["rouge1"] == pytest.approx(100 * (2 / 3) / 2)
  assert partial["rouge2"] == pytest.approx(100 * (4 / 7) / 2)
  # rougeLsum takes the LCS sentence by sentence (split at . ! ? and line breaks): the same two
  # sentences in the other order score 100 (one LCS over the whole text would give 50).
  task.examples = [{"document": "x", "summary": "The cat sat. The dog ran!"}]
  swapped = tasks_lib.run(task, _fake_lm(["The dog ran!  The cat sat."], []))
  assert swapped["rougeLsum"] == pytest.approx(100.0) and swapped["rouge1"] == 100.0


class TjaxTestChoices(tfds.core.GeneratorBasedBuilder):
  """A HellaSwag-shaped catalog dataset (ctx, endings, label), registered by name."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "ctx": tfds.features.Text(), "endings": tfds.features.Sequence(tfds.features.Text()),
        "label": np.int64}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(5, 0), "validation": self._generate_examples(6, 100)}

  def _generate_examples(self, n, start):
    for i in range(start, start + n):
      label = i % 3
      endings = [f"no{j}" for j in range(3)]
      endings[label] = f"yes {i}"
      yield i, {"ctx": f"pick {i}", "endings": endings, "label": label}


def test_a_tfds_dataset_is_a_task_with_renamed_fields(tmp_path):
  spec = "tfds:tjax_test_choices?context=ctx&choices=endings"
  task = tasks_lib.load(spec, num_fewshot=2, data_dir=str(tmp_path), limit=4)
  assert (task.name, task.kind, len(task.examples), len(task.train)) == (
      "tjax_test_choices", "multiple_choice", 4, 5)  # validation by default; train for shots
  (one,) = [e for e in task.examples if e["ctx"] == "pick 101"] or [
      e for e in tasks_lib.load(spec, data_dir=str(tmp_path)).examples if e["ctx"] == "pick 101"]
  assert one == {"ctx": "pick 101", "endings": ["no0", "no1", "yes 101"],
                              "label": 2, "context": "pick 101",
                              "choices": ["no0", "no1", "yes 101"]}
  assert tasks_lib.run(task, _fake_lm([], []))["acc"] == 1.0
  assert len(tasks_lib.load(spec, data_dir=str(tmp_path)).examples) == 6
  with pytest.raises(ConfigError, match=r"no split 'dev' \(it has train, validation\)"):
    tasks_lib.load("tfds:tjax_test_choices@dev", data_dir=str(tmp_path))
  with pytest.raises(ConfigError, match=r"lacks field\(s\) context"):
    tasks_lib.load("multiple_choice:tfds:tjax_test_choices?choices=endings",
                   data_dir=str(tmp_path))
  with pytest.raises(ConfigError, match=r"'context' is not OURS=THEIRS"):
    tasks_lib.load("tfds:tjax_test_choices?context", data_dir=str(tmp_path))


def test_eval_tasks_too_long_for_the_model_are_refused_before_training(run, files, tmp_path):
  """Measured at start-up (harness.check_tasks): they stopped the run at its first evaluation."""
  config = run[1].config.copy_and_resolve_references()
  long_answer = [{"context": "x =", "choices": ["1", " value" * config.model.max_len], "label": 0}]
  for rows, message in ((long_answer, r"^task '\d+' \(\S+\), example 1 choice 1: a continuation "
                                      r"of \d+ tokens is longer than the model's"),
                        ([{"length": 4 * config.model.max_len, "depth": 0.5}], "passkey length")):
    config.eval.tasks = (_write(tmp_path / f"{len(message)}.jsonl", rows),)
    with pytest.raises(ConfigError, match=message):
      harness.check_tasks(config)
  config.eval.tasks = (files["mc"], "generation:" + files["gen"])
  harness.check_tasks(config)  # (scores nothing: no params)


def test_eval_tasks_are_logged_without_validation_data(monkeypatch):
  """A corpus with no held-out documents still gets eval.tasks' metrics at every evaluation."""
  written = []
  trainer = types.SimpleNamespace(config=config_lib.base.get_config(),
                                  evaluate=lambda params, batches: {})
  writer = types.SimpleNamespace(write=lambda step, values: written.append((step, values)))
  monkeypatch.setattr(harness, "during_training", lambda trainer, params: {"eval_mc_acc": 0.5})
  evaluate = loop._evaluate  # pylint: disable=protected-access
  out = evaluate(trainer, {}, {"": []}, writer, 4, lambda msg: None)
  assert out == {"eval_mc_acc": 0.5} and written == [(4, {"eval_mc_acc": 0.5})]
  monkeypatch.setattr(harness, "during_training", lambda trainer, params: {})
  assert evaluate(trainer, {}, {"": []}, writer, 6, print) == {}
  assert len(written) == 1
