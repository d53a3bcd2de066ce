"""Knowledge distillation (Hinton et al. 2015): a student trained on a frozen teacher's soft
targets as well as on the data.

`train.distill.teacher` is a training workdir of ours (its config.json and latest checkpoint) or a
Hugging Face directory (through convert/hf.py). The teacher runs inside the student's jitted step,
on the same mesh with the same logical rules (its parameters sharded like the student's, never
gathered), in the student's compute dtype, under stop_gradient: it has no optimizer state and is
not part of the checkpointed train state. The objective per target token is

  alpha * (the usual loss) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

(T = train.distill.temperature; T^2 keeps the soft term's gradients on the hard term's scale as
T changes). Student and teacher share the tokenizer: a workdir teacher's tokenizer file must have
the student's bytes, and the vocabulary sizes must agree.
"""

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.data import tfds_text
from transformer_jax.data import tokenization
from transformer_jax.models import families
from transformer_jax.parallel import sharding


@dataclasses.dataclass
class Teacher:
  model: nn.Module
  params: Any  # on the student's mesh; frozen
  alpha: float
  temperature: float


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


def load(config, mesh, rule_table) -> Teacher | None:
  """The teacher of config.train.distill (None without one), its parameters placed on `mesh`."""
  check(config)
  d = config.train.distill
  if not d.teacher:
    return None
  path, hf_params = d.teacher, None
  if os.path.isdir(os.path.join(path, "checkpoints")):
    teacher_config = config_lib.from_json_file(os.path.join(path, "config.json"))
    _same_tokenizer(config.data.tokenizer, teacher_config.data.tokenizer, path)
    model = families.build_model(teacher_config)
  elif os.path.isfile(os.path.join(path, "config.json")):
    from transformer_jax.convert import hf  # pylint: disable=g-import-not-at-top
    model, hf_params = hf.from_hf(path)
  else:
    raise ConfigError(f"train.distill.teacher={path!r} is neither a training workdir "
                      f"(config.json + checkpoints/) nor a Hugging Face directory (config.json)")
  if model.cfg.vocab_size != config.model.vocab_size or (
      type(model).__name__ != families.FAMILIES[config.model.family].__name__):
    raise ConfigError(
        f"train.distill.teacher={path!r} is a {type(model).__name__} over "
        f"{model.cfg.vocab_size} tokens; the student a {config.model.family} model over "
        f"{config.model.vocab_size}: a teacher needs the student's family and vocabulary")
  model = type(model)(dataclasses.replace(model.cfg, dtype=config.model.dtype,
                                          dropout_rate=0.0))
  boxed = jax.eval_shape(lambda: model.init(
      jax.random.key(0), *families.init_inputs(model, min(config.data.seq_len, 8)))["params"])
  shardings = sharding.shardings(boxed, mesh, rule_table)
  if hf_params is not None:
    params = jax.device_put(hf_params, shardings)
  else:
    from transformer_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.unbox(boxed), shardings)
    step, params = checkpoint.Checkpoints(path, teacher_config.checkpoint,
                                          read_only=True).restore_params(abstract)
    if params is None:
      raise ConfigError(f"train.distill.teacher={path!r} has no checkpoint")
  return Teacher(model, params, float(d.alpha), float(d.temperature))


def _same_tokenizer(student: str, teacher: str, path: str):
  """Same tokenizer file content (tfds_text's digest, which also keys pretokenized data)."""
  def digest(p):
    exists = os.path.isfile(tokenization.tokenizer_file(p))
    return tfds_text.tokenizer_sha256(p) if exists else p
  if digest(student) != digest(teacher):
    raise ConfigError(f"train.distill.teacher={path!r} was trained with tokenizer {teacher!r}, "
                      f"not the student's data.tokenizer={student!r}")


def kl_sum(student_logits, teacher_logits, w, temperature: float):
  """sum over tokens of w * KL(softmax(teacher / T) || softmax(student / T)), fp32."""
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * w)


def loss_terms(teacher: Teacher, inputs: list, extra: dict, student_logits, base_loss, w):
  """(The distillation objective's sum, the soft term's KL sum) for one batch: `base_loss` is
  the usual loss summed over the target tokens, `w` their weights."""
  logits = jax.lax.stop_gradient(teacher.model.apply({"params": teacher.params}, *inputs,
                                                     **extra))
  kl = kl_sum(student_logits, logits, w, teacher.temperature)
  soft = (1.0 - teacher.alpha) * teacher.temperature ** 2 * kl
  return teacher.alpha * base_loss + soft, kl
