"""Knowledge distillation (Hinton et al. 2015): a student trained on a frozen teacher's soft
targets as well as on the data.

`train.distill.teacher` is a training workdir of ours (its config.json and latest checkpoint) or a
Hugging Face directory (through convert/hf.py). The teacher runs inside the student's jitted step,
on the same mesh with the same logical rules (its parameters sharded like the student's, never
gathered), in the student's compute dtype, under stop_gradient: it has no optimizer state and is
not part of the checkpointed train state. The objective per target token is

  alpha * (cross-entropy) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(T = train.distill.temperature; T^2 keeps the soft term's gradients on the hard term's scale as
T changes; a train.z_loss term is added at its full weight). Student and teacher share the
tokenizer: a workdir teacher's tokenizer file must have the student's bytes (a Hugging Face
teacher's tokenizer the same ids); their tables may have other padding rows past the
tokenizer's vocabulary (GPT-2's 50,257 rows and a student's 50,304).

Hidden-state matching (TinyBERT's, Jiao et al. 2020), with train.distill.hidden_weight = h > 0,
adds per token

  h * mean over matched layer pairs (i, j) of mean_d ((H_student_i W - H_teacher_j)_d ^ 2)

over the non-padding tokens of each stack (a decoder's or encoder's blocks; an encoder-decoder's
encoder and decoder apiece), H_i being block i's output (the residual stream). W [d_student,
d_teacher] is learned with the student (identity-initialised when the widths agree), kept in the
student's parameters under PROJECTION, which the model itself ignores (evaluation, sampling and
export restore the model's own parameters only). The layer pairs are train.distill.hidden_layers,
((student layer, teacher layer), ...), or by default the uniform map: student block i of L_s
matches teacher block (i + 1) * L_t // L_s - 1, so the last matches the last.
"""

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import objectives
from transformer_jax.data import tfds_text
from transformer_jax.data import tokenization
from transformer_jax.models import families
from transformer_jax.models import layers
from transformer_jax.parallel import sharding


PROJECTION = "distill_projection"  # the student's learned hidden-state projection (params key)
_SEGMENTS = {"": "segment_ids", "encoder": "encoder_segment_ids",
             "decoder": "decoder_segment_ids"}  # each stack's non-padding tokens


@dataclasses.dataclass
class Teacher:
  model: nn.Module
  params: Any  # on the student's mesh; frozen
  alpha: float
  temperature: float
  hidden_weight: float = 0.0
  hidden_layers: tuple = ()  # ((student layer, teacher layer), ...); () = the uniform map
  step: int | None = None  # a workdir teacher's checkpoint (None: a Hugging Face directory)


def pinned(config, workdir: str) -> int | None:
  """The teacher step that `workdir`'s checkpoints were distilled from (resume.TEACHER), when
  it has checkpoints and a record for this config's teacher (another teacher: config_changes
  says so; the newest is read). A resume reads that step again, not the newest: a teacher that
  trained on meanwhile changed the targets mid-run, silently."""
  from transformer_jax.training import resume  # pylint: disable=g-import-not-at-top
  record = paths.join(workdir, resume.TEACHER)
  if not (workdir and paths.isfile(record) and resume.has_checkpoints(workdir)):
    return None
  try:
    saved = json.loads(paths.read_text(record))
    same = saved["teacher"] == paths.abspath(config.train.distill.teacher)
    return int(saved["step"]) if same else None
  except (ValueError, KeyError, TypeError):
    raise ConfigError(f"{record} is damaged (it names the teacher checkpoint this run reads); "
                      f"delete it to read the teacher's newest") from None


def check(config):
  """The distill keys' values (cheap; before anything is built)."""
  d = config.train.distill
  if not d.teacher:
    return
  if not 0 <= d.alpha <= 1:
    raise ConfigError(f"train.distill.alpha must be in [0, 1], got {d.alpha}")
  if not d.temperature > 0:
    raise ConfigError(f"train.distill.temperature must be > 0, got {d.temperature}")
  if config.train.loss_chunk:
    raise ConfigError("train.distill needs the whole logits: set train.loss_chunk=0")
  weight, pairs = d.get("hidden_weight", 0.0), d.get("hidden_layers", ())
  if not weight >= 0:
    raise ConfigError(f"train.distill.hidden_weight must be >= 0, got {weight}")
  if any(not (isinstance(p, (list, tuple)) and len(p) == 2 and all(
      isinstance(i, int) and i >= 0 for i in p)) for p in pairs):
    raise ConfigError(f"train.distill.hidden_layers={pairs!r} must be pairs (student layer, "
                      f"teacher layer) of layer indices, e.g. ((0, 1), (1, 3))")


def as_teacher(model, dtype: str):
  """The model as a teacher runs it: in the student's dtype, as at inference (no dropout; an MoE
  without drops: a token's soft targets must not depend on the other tokens of the batch)."""
  return families.for_inference(type(model)(dataclasses.replace(model.cfg, dtype=dtype,
                                                                dropout_rate=0.0)))


def load(config, mesh, rule_table, workdir: str = "") -> Teacher | None:
  """The teacher of config.train.distill (None without one), its parameters placed on `mesh`:
  a workdir teacher's newest checkpoint, or the one the student `workdir` was distilled from."""
  check(config)
  d = config.train.distill
  if not d.teacher:
    return None
  path, hf_params = d.teacher, None
  from transformer_jax.quant import store  # pylint: disable=g-import-not-at-top
  if store.is_quantized(path):  # (its config.json read as a Hugging Face one's)
    raise ConfigError(f"train.distill.teacher={path!r} is a quantized workdir; give its source "
                      f"(a training workdir) as the teacher")
  if paths.isdir(paths.join(path, "checkpoints")):  # a local or gs:// workdir
    if not paths.isfile(paths.join(path, "config.json")):
      raise ConfigError(f"train.distill.teacher={path!r} has checkpoints/ but no config.json "
                        f"(an unfinished copy or import?)")
    teacher_config = config_lib.any_platform(
        config_lib.from_json_file(paths.join(path, "config.json")))
    _same_tokenizer(config.data.tokenizer, teacher_config.data.tokenizer, path)
    model = families.build_model(teacher_config)
  elif paths.isfile(paths.join(path, "config.json")):
    from transformer_jax.convert import hf  # pylint: disable=g-import-not-at-top
    _same_ids(config.data.tokenizer, path)
    model, hf_params = hf.from_hf(path)
  else:
    raise ConfigError(f"train.distill.teacher={path!r} is neither a training workdir "
                      f"(config.json + checkpoints/) nor a Hugging Face directory (config.json)")
  _same_family_and_vocabulary(config, model, path, hf_params is not None)
  longest = max(config.data.seq_len, objectives.spec(config.data).target_len)
  if model.cfg.position == "learned" and model.cfg.max_len < longest:
    raise ConfigError(f"train.distill.teacher={path!r} has learned positions for "
                      f"{model.cfg.max_len} tokens; the student's rows reach {longest} "
                      f"(data.seq_len / target_len): set data.seq_len <= {model.cfg.max_len}")
  model = as_teacher(model, config.model.dtype)
  _layer_pairs(config, model)  # before the teacher's checkpoint is read
  boxed = jax.eval_shape(lambda: model.init(
      jax.random.key(0), *families.init_inputs(model, min(config.data.seq_len, 8)))["params"])
  shardings = sharding.shardings(boxed, mesh, rule_table)
  if hf_params is not None:
    params = jax.device_put(hf_params, shardings)
  else:
    from transformer_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.unbox(boxed), shardings)
    from transformer_jax.training import resume  # pylint: disable=g-import-not-at-top
    ckpts = checkpoint.Checkpoints(path, teacher_config.checkpoint, read_only=True)
    step = pinned(config, workdir)
    if step is not None and step not in ckpts.all_steps():
      raise ConfigError(
          f"train.distill.teacher={path!r}: its checkpoint {step}, which the checkpoints in "
          f"{workdir} were distilled from, is gone (it has "
          f"{', '.join(map(str, ckpts.all_steps())) or 'none'}); to go on from its newest (other "
          f"targets from here on), delete {paths.join(workdir, resume.TEACHER)}")
    step, params = ckpts.restore_params(abstract, step=step)
    if params is None:
      raise ConfigError(f"train.distill.teacher={path!r} has no checkpoint")
  return Teacher(model, params, float(d.alpha), float(d.temperature),
                 float(d.get("hidden_weight", 0.0)), _layer_pairs(config, model),
                 None if hf_params is not None else step)


def _same_family_and_vocabulary(config, model, path: str, hf: bool):
  """The student's family, and a table with a row for every id of the student's tokenizer (the
  tokenizers are the same: rows past its vocabulary are padding, which each side may have in
  other numbers). A Hugging Face directory of weights alone has no tokenizer to compare: its
  table must be the student's size."""
  tokens = tokenization.load(config.data.tokenizer).vocab_size
  weights_only = hf and not paths.isfile(paths.join(path, "tokenizer.json"))
  vocab = model.cfg.vocab_size
  if (vocab != config.model.vocab_size if weights_only else vocab < tokens) or (
      type(model).__name__ != families.FAMILIES[config.model.family].__name__):
    raise ConfigError(
        f"train.distill.teacher={path!r} is a {type(model).__name__} over {vocab} tokens; the "
        f"student a {config.model.family} model over {config.model.vocab_size} (its tokenizer "
        f"{tokens}): a teacher needs the student's family and a row for every token" +
        (" (a directory without tokenizer.json: the student's vocabulary size)"
         if weights_only else ""))


def padded_to(teacher_logits, vocab: int):
  """The teacher's logits over the student's `vocab` rows: its padding rows cut, or the student's
  padding rows added at MASKED_LOGIT (kl_sum renormalizes over the ids the student predicts)."""
  have = teacher_logits.shape[-1]
  if have >= vocab:
    return teacher_logits[..., :vocab]
  pad = [(0, 0)] * (teacher_logits.ndim - 1) + [(0, vocab - have)]
  return jnp.pad(teacher_logits, pad, constant_values=layers.MASKED_LOGIT)


def _layer_pairs(config, teacher_model) -> tuple:
  """train.distill.hidden_layers as pairs, each layer checked against every stack of its model
  (an encoder-decoder's pairs apply to the encoder and to the decoder)."""
  pairs = tuple(tuple(p) for p in config.train.distill.get("hidden_layers", ()))
  student = config.model
  for m, i, who in ((student, 0, "student"), (teacher_model.cfg, 1, "teacher")):
    depths = {m.num_layers}
    if student.family == "encdec":
      depths.add(m.num_decoder_layers or m.num_layers)
    bad = [p for p in pairs if not 0 <= p[i] < min(depths)]
    if bad:
      raise ConfigError(f"train.distill.hidden_layers: {who} layer {bad[0][i]} does not exist "
                        f"(the {who}'s stacks have {' and '.join(map(str, sorted(depths)))} "
                        f"layers)")
  return pairs


def with_projection(params, teacher: Teacher | None, student_width: int):
  """The student's parameters plus the hidden-state projection (boxed, sharded along the
  student's width) when the teacher matches hidden states."""
  if teacher is None or not teacher.hidden_weight:
    return params
  t = teacher.model.cfg.d_model
  if t == student_width:
    init = lambda key, shape, dtype: jnp.eye(shape[0], shape[1], dtype=dtype)  # pylint: disable=unnecessary-lambda-assignment
  else:
    init = nn.initializers.lecun_normal()
  kernel = nn.LogicallyPartitioned(init(jax.random.key(0), (student_width, t), jnp.float32),
                                   names=("embed", None))
  return {**params, PROJECTION: {"kernel": kernel}}


def uniform_pairs(student_layers: int, teacher_layers: int) -> list:
  """Student block i -> teacher block (i + 1) * L_t // L_s - 1 (the last to the last; a
  student deeper than its teacher matches its first blocks to the teacher's first)."""
  return [(i, max(0, (i + 1) * teacher_layers // student_layers - 1))
          for i in range(student_layers)]


def token_counts(batch) -> dict:
  """Each stack's non-padding tokens in `batch` ({"" | "encoder" | "decoder": count})."""
  return {where: jnp.sum((batch[key] != 0).astype(jnp.float32))
          for where, key in _SEGMENTS.items() if key in batch}


def hidden_mse(teacher: Teacher, student_sown, teacher_sown, projection, batch, tokens=None):
  """The mean over the matched layer pairs of every stack of the per-token mean squared error
  between the projected student residual stream and the teacher's, over non-padding tokens
  (`tokens`: the counts to divide by, a whole step's for one of its microbatches)."""
  from transformer_jax.models import stack  # pylint: disable=g-import-not-at-top
  mine, theirs = stack.sown_layers(student_sown), stack.sown_layers(teacher_sown)
  terms = []
  for (where, name), hs in mine.items():
    ht = theirs.get((where, name))
    if name != "residual" or ht is None:
      continue
    mask_BT = (batch[_SEGMENTS[where]] != 0).astype(jnp.float32)
    for i, j in teacher.hidden_layers or uniform_pairs(len(hs), len(ht)):
      diff_BTD = (jnp.einsum("BTd,de->BTe", hs[i].astype(jnp.float32), projection)
                  - jax.lax.stop_gradient(ht[j]).astype(jnp.float32))
      per_token_BT = jnp.mean(jnp.square(diff_BTD), axis=-1)
      count = jnp.sum(mask_BT) if tokens is None else tokens[where]
      terms.append(jnp.sum(per_token_BT * mask_BT) / jnp.maximum(count, 1.0))
  return sum(terms) / max(len(terms), 1)


def _same_tokenizer(student: str, teacher: str, path: str):
  """The same tokenizer: file content (and a Hugging Face one's tokenizer_config.json). The
  teacher workdir's record of the one it trained with decides (the file at its data.tokenizer
  may since be another, or on another machine); a workdir without one, that file."""
  from transformer_jax.training import resume  # pylint: disable=g-import-not-at-top
  def digest(p):
    exists = paths.isfile(tokenization.tokenizer_file(p))
    return tfds_text.tokenizer_identity(p) if exists else p
  recorded = paths.join(path, resume.TOKENIZER_SHA)
  if paths.isfile(recorded):
    theirs = paths.read_text(recorded).strip()
    if not (paths.isfile(tokenization.tokenizer_file(student))
            and tfds_text.matches_identity(theirs, student)):
      raise ConfigError(f"train.distill.teacher={path!r} was trained with another tokenizer "
                        f"(its {resume.TOKENIZER_SHA}: {theirs[:12]}...) than the student's "
                        f"data.tokenizer={student!r}")
    return
  if digest(student) != digest(teacher):
    raise ConfigError(f"train.distill.teacher={path!r} was trained with tokenizer {teacher!r}, "
                      f"not the student's data.tokenizer={student!r}")


# Text whose ids tell two tokenizers apart: words, digits, accents, CJK, whitespace, code.
_PROBE = ("The quick brown fox jumps over 13 lazy dogs in 2024. Naïve café, ü, 東京。\n"
          "  def f(x):\n\treturn x ** 2  # ok?")


def _same_ids(student: str, hf_dir: str):
  """A Hugging Face teacher's tokenizer (its directory's, where it has one) gives the student
  tokenizer's ids: same vocabulary size, same ids for a probe text (a tokenizer.json and a
  SentencePiece model of one vocabulary pass)."""
  if not paths.isfile(paths.join(hf_dir, "tokenizer.json")):
    return  # a directory of weights only: the vocabulary size check is all there is
  theirs, ours = tokenization.load(hf_dir), tokenization.load(student)
  if (theirs.vocab_size, theirs.encode(_PROBE)) != (ours.vocab_size, ours.encode(_PROBE)):
    raise ConfigError(f"train.distill.teacher={hf_dir!r} has another tokenizer than the "
                      f"student's data.tokenizer={student!r} (other ids for the same text); "
                      f"train the student with data.tokenizer={hf_dir}")


def kl_sum(student_logits, teacher_logits, w, temperature: float):
  """sum over tokens of w * KL(softmax(teacher / T) || softmax(student / T)), fp32. The teacher's
  distribution is renormalized over the ids the student can predict: a student's masked ids
  (model.output_vocab) would cost p x 1e9 / T each."""
  masked = student_logits <= layers.MASKED_LOGIT / 2
  teacher_logits = jnp.where(masked, layers.MASKED_LOGIT, teacher_logits.astype(jnp.float32))
  log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * w)


def loss_terms(teacher: Teacher, inputs: list, extra: dict, student_logits, base_loss, w,
               hidden=None, totals=None):
  """(The distillation objective's sum, {distill_kl: the soft term's KL sum[, distill_hidden_mse:
  hidden_mse]}) for one batch: `base_loss` is the usual loss summed over the target tokens, `w`
  their weights; `hidden` = (the student's sown intermediates, its projection, the batch) when
  hidden states are matched (their term counts once per target token, like the mean loss);
  `totals`: the whole step's counts (step.batch_totals) when this batch is a microbatch."""
  if hidden is None:
    logits = teacher.model.apply({"params": teacher.params}, *inputs, **extra)
  else:
    from transformer_jax.models import layers  # pylint: disable=g-import-not-at-top
    logits, sown = teacher.model.apply({"params": teacher.params}, *inputs, **extra,
                                       mutable=[layers.INTERMEDIATES])
  logits = padded_to(jax.lax.stop_gradient(logits), student_logits.shape[-1])
  kl = kl_sum(student_logits, logits, w, teacher.temperature)
  soft = (1.0 - teacher.alpha) * teacher.temperature ** 2 * kl
  total, aux = teacher.alpha * base_loss + soft, {"distill_kl": kl}
  if hidden is not None:
    student_sown, projection, batch = hidden
    mse = hidden_mse(teacher, student_sown, sown[layers.INTERMEDIATES], projection, batch,
                     None if totals is None else totals["tokens"])
    weight = jnp.sum(w) if totals is None else totals["weights"]
    total = total + teacher.hidden_weight * mse * weight
    aux["distill_hidden_mse"] = mse
  return total, aux
