"""Knowledge distillation (training/distill.py): the objective's limits and formula, a frozen,
unsaved teacher from a workdir, every family, and the one-line errors."""

import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import objectives
from transformer_jax.evaluation import harness
from transformer_jax.models import families
from transformer_jax.parallel import sharding
from transformer_jax.training import distill
from transformer_jax.training import loop
from transformer_jax.training import resume
from transformer_jax.training.step import Trainer, loss_parts
from tests.conftest import REPO, synthetic_batch, tiny_overrides


def _setup(recipe="configs/gpt2.py:tiny", *extra):
  config = config_lib.load(f"{REPO}/{recipe}", ["data.seq_len=16", "model.max_len=16",
                                                 "train.batch_size=2", *extra])
  model = families.build_model(config)
  # (jitted: one compile for every seed, where eagerly every op compiled on its own)
  init = jax.jit(lambda seed: nn.unbox(model.init(jax.random.key(seed),
                                                  *families.init_inputs(model, 8))["params"]))
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch(config).items()}
  task = objectives.loss(objectives.check(config))
  return config, model, init, batch, task


def test_kl_matches_its_formula():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 3, 7)) * 3, rng.normal(size=(2, 3, 7)) * 3
  w = rng.uniform(size=(2, 3))
  for temp in (1.0, 2.5):
    p = np.exp(t / temp) / np.exp(t / temp).sum(-1, keepdims=True)
    q = np.exp(s / temp) / np.exp(s / temp).sum(-1, keepdims=True)
    want = np.sum(np.sum(p * np.log(p / q), -1) * w)
    got = distill.kl_sum(jnp.asarray(s), jnp.asarray(t), jnp.asarray(w), temp)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # a student with model.output_vocab=5 (its last 2 ids masked): the teacher's distribution
    # over its first 5 ids (it cost p x 1e9 / T: KL ~1e7 per token)
    masked = np.where(np.arange(7) < 5, s, -1e9)
    p5 = np.exp(t[..., :5] / temp) / np.exp(t[..., :5] / temp).sum(-1, keepdims=True)
    q5 = np.exp(s[..., :5] / temp) / np.exp(s[..., :5] / temp).sum(-1, keepdims=True)
    want = np.sum(np.sum(p5 * np.log(p5 / q5), -1) * w)
    got = distill.kl_sum(jnp.asarray(masked), jnp.asarray(t), jnp.asarray(w), temp)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # tables with other padding rows: a teacher's 5 rows under a student's 7 (its last 2 at 0
    # probability), and a teacher's 7 over a student's 5 (renormalized over those 5)
    p_pad = np.concatenate([p5, np.zeros_like(p5[..., :2])], -1)
    want = np.sum(np.sum(p_pad * np.log(np.where(p_pad > 0, p_pad, q) / q), -1) * w)
    got = distill.kl_sum(jnp.asarray(s), distill.padded_to(jnp.asarray(t[..., :5]), 7),
                         jnp.asarray(w), temp)
    assert float(got) == pytest.approx(want, rel=1e-5)
    want = np.sum(np.sum(p5 * np.log(p5 / q5), -1) * w)
    got = distill.kl_sum(jnp.asarray(s[..., :5]), distill.padded_to(jnp.asarray(t), 5),
                         jnp.asarray(w), temp)
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("recipe", ["configs/gpt2.py:tiny", "configs/bert.py:tiny",
                                    "configs/t5.py:tiny"])
def test_alpha_one_is_the_plain_loss_and_a_twin_teacher_adds_nothing(recipe):
  """alpha = 1: the loss and gradients are the plain ones. A teacher identical to the student:
  the KL and its gradient vanish (alpha = 0 leaves only it). Every family."""
  _, model, init, batch, task = _setup(recipe)
  params, other = init(0), init(1)
  # (jitted: a compile without a teacher, one for every teacher `t` (its parameters, alpha and
  # T traced), one for the hidden states; eagerly every op compiled on its own)
  grad = jax.jit(lambda p, t: jax.value_and_grad(lambda p: loss_parts(
      model, p, batch, task=task,
      teacher=None if t is None else distill.Teacher(model, *t))[0])(p))
  plain, g_plain = grad(params, None)
  one, g_one = grad(params, (other, 1.0, 2.0))
  assert float(one) == pytest.approx(float(plain), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g_one), jax.tree.leaves(g_plain)):  # (two programs: gpt2's
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # differ by 2e-7 past rtol)
  twin, g_twin = grad(params, (params, 0.0, 3.0))
  assert abs(float(twin)) < 1e-4
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_twin)) < 1e-5
  soft, _ = grad(params, (other, 0.0, 3.0))
  assert float(soft) > 1e-3  # another teacher: a real KL
  # Hidden states (every stack: an encoder-decoder's encoder and decoder): a twin through the
  # identity adds nothing; another teacher does.
  with_eye = {**params, distill.PROJECTION: {"kernel": jnp.eye(model.cfg.d_model)}}
  hidden_mse = jax.jit(lambda p, teacher: loss_parts(
      model, p, batch, task=task,
      teacher=distill.Teacher(model, teacher, 1.0, 2.0, hidden_weight=1.0))[2][
          "distill_hidden_mse"])
  for teacher, zero in ((params, True), (other, False)):
    assert (float(hidden_mse(with_eye, teacher)) == 0.0) == zero


def test_the_z_loss_keeps_its_full_weight_whatever_alpha():
  """alpha scales the hard-label loss, not train.z_loss's term (alpha = 0 dropped it)."""
  _, model, init, batch, task = _setup()
  params, other = init(0), init(1)
  w = batch["weights"].astype(jnp.float32)
  logits = jax.jit(model.apply)({"params": params}, *[batch[k] for k in type(model).INPUTS])
  z_sum = 1e-2 * float(jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * w))
  # (jitted, alpha traced: a compile with the z-loss and one without)
  loss = jax.jit(lambda p, teacher, alpha, z: loss_parts(
      model, p, batch, task=task, teacher=distill.Teacher(model, teacher, alpha, 2.0),
      z_loss=z)[0], static_argnums=3)
  for alpha in (0.0, 0.5, 1.0):
    with_z, without = (float(loss(params, other, alpha, z)) for z in (1e-2, 0.0))
    assert with_z - without == pytest.approx(z_sum, rel=1e-4), alpha


def test_a_sentence_pair_heads_loss_keeps_its_full_weight_whatever_alpha():
  """No teacher gives BERT's sentence-pair head a soft target: alpha scaled its loss as the
  hard-label one, so at alpha = 0 the head got no gradient at all (and a quarter of its loss
  at 0.25)."""
  _, model, init, batch, task = _setup("configs/bert.py:tiny", "data.sentence_pair=nsp",
                                       "model.sentence_head=True")
  params, other = init(0), init(1)
  _, _, plain = jax.jit(lambda p: loss_parts(model, p, batch, task=task))(params)

  @jax.jit  # (alpha traced: one compile for both)
  def distilled(p, teacher, alpha):  # ((loss, aux), gradients)
    f = lambda p: (lambda total, _, aux: (total, aux))(*loss_parts(
        model, p, batch, task=task, teacher=distill.Teacher(model, teacher, alpha, 2.0)))
    return jax.value_and_grad(f, has_aux=True)(p)

  for alpha in (0.0, 0.5):
    (total, aux), grads = distilled(params, other, alpha)
    soft = (1 - alpha) * 2.0 ** 2 * float(aux["distill_kl"])
    assert float(total) == pytest.approx(
        soft + alpha * float(plain["cross_entropy"]) + float(plain["sentence_term"]),
        rel=1e-5), alpha
    assert float(jnp.abs(grads["sentence"]).max()) > 1e-3, alpha


def test_a_workdir_teacher_trains_the_student_frozen_and_unsaved(tiny_data, tmp_path):
  """A 2-layer teacher trained 10 steps (its config then saying splash attention, as a TPU's
  would); a 1-layer student with more padding rows distilled from it on this machine: distill_kl
  is logged, the teacher's checkpoint is unchanged and the student's saved state holds only its
  own parameters."""
  teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student"
  kv = {"train.steps": 10, "eval.every_steps": 0}
  loop.train(config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data, **kv)),
             str(teacher_dir), quiet=True, devices=jax.devices()[:1])
  saved = json.loads((teacher_dir / "config.json").read_text())  # as if trained on a TPU: the
  saved["model"]["attention_impl"] = "splash"  # teacher runs the kernel this machine has
  (teacher_dir / "config.json").write_text(json.dumps(saved))
  student = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(
      tiny_data, **{**kv, "model.num_layers": 1, "train.distill.teacher": str(teacher_dir),
                    "model.vocab_size": 384,  # the teacher's 320
                    "train.distill.alpha": 0.3, "train.steps": 5,
                    "train.distill.hidden_weight": 1.0}))
  trainer = Trainer(student, sharding.make_mesh(student, jax.devices()[:1]))
  before = jax.device_get(trainer.teacher.params)
  loop.train(student, str(student_dir), quiet=True, devices=jax.devices()[:1])
  rows = [json.loads(l) for l in open(student_dir / "metrics.jsonl")]
  assert all(r["distill_kl"] > 0 and r["distill_hidden_mse"] > 0 for r in rows if "loss" in r)
  after = jax.device_get(Trainer(student, trainer.mesh).teacher.params)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  saved = jax.tree.leaves(trainer.abstract_state.params)  # + the hidden-state projection
  assert len(saved) == len(jax.tree.leaves(families.abstract_params(trainer.model))) + 1
  assert trainer.abstract_state.params[distill.PROJECTION]["kernel"].shape == (64, 64)
  assert "layer_1" in trainer.teacher.params and "layer_1" not in trainer.abstract_state.params
  # The teacher trains on (as RESULTS' recipe does): a resume of the student read its newest
  # checkpoint, other targets from there on, silently; it reads the one its run started from.
  assert json.loads((student_dir / resume.TEACHER).read_text())["step"] == 10
  loop.train(config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(
      tiny_data, **{**kv, "train.steps": 15})), str(teacher_dir), quiet=True,
             devices=jax.devices()[:1])
  assert Trainer(student, trainer.mesh).teacher.step == 15
  assert Trainer(student, trainer.mesh, workdir=str(student_dir)).teacher.step == 10
  shutil.rmtree(teacher_dir / "checkpoints" / "10")
  with pytest.raises(ConfigError, match=r"^train.distill.teacher='\S+': its checkpoint 10, which "
                                        r"the checkpoints in \S+ were distilled from, is gone"):
    Trainer(student, trainer.mesh, workdir=str(student_dir))
  (teacher_dir / "config.json").rename(teacher_dir / "config.moved")
  with pytest.raises(ConfigError, match=r"has checkpoints/ but no config.json"):
    Trainer(student, trainer.mesh)  # (a traceback: FileNotFoundError)
  shutil.rmtree(teacher_dir)  # evaluating the student needs no teacher
  _, step, params = harness.load_workdir(str(student_dir), devices=jax.devices()[:1])
  assert step == 5 and distill.PROJECTION not in params


def test_the_uniform_layer_map():
  """Each student block to the teacher block that ends its share of the depth, last to last;
  a student deeper than its teacher never pairs with a block past it (nor wraps round)."""
  assert distill.uniform_pairs(2, 4) == [(0, 1), (1, 3)]
  assert distill.uniform_pairs(3, 12) == [(0, 3), (1, 7), (2, 11)]
  assert distill.uniform_pairs(4, 4) == [(i, i) for i in range(4)]
  assert distill.uniform_pairs(6, 3) == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 2)]


def test_explicit_pairs_are_checked_against_every_stack():
  """An encoder-decoder's pairs apply to its encoder and its decoder: a layer the shallower
  stack lacks is refused in one line, not an index error inside the compiled step."""
  config = config_lib.load(f"{REPO}/configs/t5.py:tiny", [
      "model.num_layers=4", "model.num_decoder_layers=2", "train.distill.hidden_layers=((3, 1),)"])
  model = families.build_model(config)
  with pytest.raises(ConfigError, match=r"student layer 3 does not exist \(the student's stacks "
                     r"have 2 and 4 layers\)$"):
    distill._layer_pairs(config, model)  # pylint: disable=protected-access
  config.train.distill.hidden_layers = ((1, 1),)
  assert distill._layer_pairs(config, model) == ((1, 1),)  # pylint: disable=protected-access


def test_hidden_state_matching_equals_its_formula():
  """The hidden term is the mean over the uniform map's pairs (1 student block: the teacher's
  last) of the per-token mean squared error of the projected residual streams over non-padding
  tokens; a twin teacher through the identity projection adds nothing; the projection learns."""
  _, model, init, batch, task = _setup()
  _, student, student_init, _, _ = _setup("configs/gpt2.py:tiny", "model.num_layers=1")
  s_params, t_params = student_init(3), init(1)
  w = np.asarray(jax.random.normal(jax.random.key(4), (64, 64))) * 0.2
  batch = dict(batch, segment_ids=batch["segment_ids"].at[1, -5:].set(0))  # some padding
  hs = _block_outputs(student, s_params, batch)
  ht = _block_outputs(model, t_params, batch)
  mask = np.asarray(batch["segment_ids"] != 0, np.float64)
  per_token = np.mean((hs[0] @ w - ht[1]) ** 2, axis=-1)
  want = np.sum(per_token * mask) / mask.sum()
  params = {**s_params, distill.PROJECTION: {"kernel": jnp.asarray(w, jnp.float32)}}
  # (jitted: one compile each, where eagerly every op compiled on its own)
  f = lambda p, t: (lambda total, _, aux: (total, aux))(*loss_parts(
      student, p, batch, task=task, teacher=distill.Teacher(model, t, 1.0, 2.0,
                                                            hidden_weight=0.5)))
  (loss, aux), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params, t_params)
  assert float(aux["distill_hidden_mse"]) == pytest.approx(want, rel=1e-4)
  plain, _, _ = jax.jit(lambda p: loss_parts(student, p, batch, task=task))(s_params)
  assert float(loss) == pytest.approx(float(plain) + 0.5 * want * float(
      jnp.sum(batch["weights"])), rel=1e-4)
  assert float(jnp.abs(grads[distill.PROJECTION]["kernel"]).max()) > 0
  eye = {**init(0), distill.PROJECTION: {"kernel": jnp.eye(64)}}
  _, _, aux = jax.jit(lambda p, t: loss_parts(  # a twin teacher
      model, p, batch, task=task, teacher=distill.Teacher(model, t, 1.0, 2.0,
                                                          hidden_weight=1.0)))(eye, init(0))
  assert float(aux["distill_hidden_mse"]) == 0.0


def test_hidden_matching_over_microbatches_adds_up_to_the_whole_batch():
  """Microbatches holding different numbers of real tokens: each one's hidden term divides by
  the whole step's token count (step.batch_totals), so their sums are the whole batch's loss
  (a microbatch's own mean weighted every microbatch alike), and the reported mean adds up."""
  from transformer_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  _, model, init, batch, task = _setup()
  # row 0: 3 tokens, 3 targets; row 1: every token, a target at every other one (MLM-like)
  batch = dict(batch, segment_ids=batch["segment_ids"].at[0, 3:].set(0),
               weights=batch["weights"].at[0, 3:].set(0.0).at[1, ::2].set(0.0))
  params, teacher = {**init(0), distill.PROJECTION: {"kernel": jnp.eye(64) * 3.0}}, init(1)
  # (jitted: a compile for the whole batch, one for a row with the step's totals, one without)
  parts_of = jax.jit(lambda p, t, b, totals: loss_parts(
      model, p, b, task=task, teacher=distill.Teacher(model, t, 0.5, 2.0, hidden_weight=50.0),
      totals=totals))
  whole, weight, aux = parts_of(params, teacher, batch, None)
  totals = step_lib.batch_totals(model, batch)
  parts = [parts_of(params, teacher, jax.tree.map(lambda x, r=r: x[r:r + 1], batch), totals)
           for r in range(2)]
  assert sum(float(p[0]) for p in parts) == pytest.approx(float(whole), rel=1e-5)
  assert sum(float(p[1]) for p in parts) == pytest.approx(float(weight))
  assert sum(float(p[2]["distill_hidden_mse"]) for p in parts) == pytest.approx(
      float(aux["distill_hidden_mse"]), rel=1e-5)
  own = [parts_of(params, teacher, jax.tree.map(lambda x, r=r: x[r:r + 1], batch), None)[0]
         for r in range(2)]
  assert abs(sum(map(float, own)) - float(whole)) > 1e-3 * abs(float(whole))  # it mattered


def _block_outputs(model, params, batch):
  """Each block's output from flax's own capture_intermediates, float64 [B, T, D]."""
  _, captured = jax.jit(lambda p: model.apply(  # (jitted: one compile, not one per op)
      {"params": p}, batch["inputs"], batch["segment_ids"], batch["positions"],
      capture_intermediates=True))(params)
  inter = captured["intermediates"]
  return [np.asarray(inter[f"layer_{i}"]["__call__"][0], np.float64)
          for i in range(model.cfg.num_layers)]


@pytest.mark.parametrize("extra, message", [
    (["model.vocab_size=512"], "has no checkpoint"),  # other padding rows: accepted
    (["train.distill.alpha=1.5"], "train.distill.alpha must be in [0, 1]"),
    (["train.loss_chunk=16"], "train.distill needs the whole logits"),
    (["train.distill.hidden_layers=((0, 5),)"], "teacher layer 5 does not exist"),
    (["train.distill.hidden_layers=((0,),)"], "must be pairs .student layer, teacher layer. of layer"),
    (["data.tokenizer=/nonexistent.model"], "was trained with tokenizer"),
])
def test_bad_teachers_fail_in_one_line(tiny_data, tmp_path, extra, message):
  teacher_dir = tmp_path / "teacher"
  teacher_dir.mkdir()
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data))
  (teacher_dir / "checkpoints").mkdir()
  config_lib.write_json(config, str(teacher_dir / "config.json"))
  student = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(
      tiny_data, **{"train.distill.teacher": str(teacher_dir)}) + extra)
  with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as e:
    Trainer(student, sharding.make_mesh(student, jax.devices()[:1]))
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="neither a training workdir"):
    bad = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", [f"train.distill.teacher={tmp_path}"])
    distill.load(bad, None, ())
  from transformer_jax.quant import store  # pylint: disable=g-import-not-at-top
  (tmp_path / "q").mkdir()  # a quantized workdir (its config.json was read as an HF model's)
  config_lib.write_json(config, str(tmp_path / "q" / "config.json"))
  (tmp_path / "q" / store.MANIFEST).write_text("{}")
  with pytest.raises(ConfigError, match="is a quantized workdir; give its source"):
    q = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", [f"train.distill.teacher={tmp_path}/q"])
    distill.load(q, None, ())


def test_a_workdir_teachers_record_of_its_tokenizer_decides(tiny_data, tmp_path):
  """WORKDIR/tokenizer.sha256, not the file now at the teacher's data.tokenizer: a teacher trained
  on another machine (its path gone) with the student's tokenizer passes (it was refused), one
  whose tokenizer was since replaced at that path is refused (it passed)."""
  from transformer_jax.data import tfds_text  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import resume  # pylint: disable=g-import-not-at-top
  tok, record = tiny_data["tokenizer"], tmp_path / resume.TOKENIZER_SHA
  record.write_text(tfds_text.tokenizer_identity(tok) + "\n")
  same = distill._same_tokenizer  # pylint: disable=protected-access
  same(tok, "/home/alice/tiny.model", str(tmp_path))
  record.write_text("0" * 64 + "\n")
  with pytest.raises(ConfigError, match="was trained with another tokenizer .*tokenizer.sha256"):
    same(tok, tok, str(tmp_path))


def test_a_teacher_must_cover_the_rows_and_share_the_tokenizer(tiny_data, tmp_path):
  """A teacher whose learned positions end before the student's rows (its logits would be NaN
  past them and every such step skipped) and a Hugging Face teacher whose tokenizer gives other
  ids are refused; a Hugging Face teacher whose tokenizer.json is the student's passes that
  check (and here fails on the missing weights)."""
  teacher_dir = tmp_path / "teacher"
  (teacher_dir / "checkpoints").mkdir(parents=True)
  teacher = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data))
  teacher.model.max_len = teacher.data.seq_len // 2
  config_lib.write_json(teacher, str(teacher_dir / "config.json"))
  student = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(
      tiny_data, **{"train.distill.teacher": str(teacher_dir)}))
  with pytest.raises(ConfigError, match=f"learned positions for {teacher.model.max_len} tokens"):
    distill.load(student, None, ())
  teacher.model.max_len, teacher.model.vocab_size = teacher.data.seq_len, 256  # < 300 tokens
  config_lib.write_json(teacher, str(teacher_dir / "config.json"))
  with pytest.raises(ConfigError, match=r"over 256 tokens; the student a decoder model over 320 "
                     r"\(its tokenizer 300\): a teacher needs the student's family and a row for "
                     r"every token$"):
    distill.load(student, None, ())
  from tests import test_hf_tokenizer  # pylint: disable=g-import-not-at-top
  texts = [t for _, t in corpus_lib.iter_documents(tiny_data["corpus"])]
  hf_dir = test_hf_tokenizer._gpt2_style(texts, tmp_path / "hf")  # pylint: disable=protected-access
  (hf_dir / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 400}))
  for tokenizer, message in ((tiny_data["tokenizer"], "has another tokenizer"),
                             (str(hf_dir), "safetensors")):
    student = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(
        tiny_data, **{"train.distill.teacher": str(hf_dir), "data.tokenizer": tokenizer}))
    with pytest.raises(ConfigError, match=message):
      distill.load(student, None, ())


def test_a_teacher_runs_as_at_inference():
  """An MoE teacher trained with a capacity gives soft targets without drops (a token's must not
  depend on the rest of the batch), with no dropout, in the student's dtype."""
  config = config_lib.load(f"{REPO}/configs/mixtral.py:tiny",
                           ["model.expert_capacity_factor=0.5", "model.dropout_rate=0.1"])
  teacher = distill.as_teacher(families.build_model(config), "bfloat16")
  c = teacher.cfg
  assert (c.expert_capacity_factor, c.dropout_rate, c.dtype) == (0.0, 0.0, "bfloat16")
  assert c.num_experts == config.model.num_experts
