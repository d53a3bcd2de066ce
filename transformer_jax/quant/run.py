"""Quantize a workdir's latest parameters into a new workdir and measure what it costs: the
held-out loss of the same evaluation batches (the training loop's) before and after."""

import math

import jax
import numpy as np

from transformer_jax import cli
from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import pipeline
from transformer_jax.parallel import distributed
from transformer_jax.parallel import sharding
from transformer_jax.quant import ptq
from transformer_jax.quant import store
from transformer_jax.training import checkpoint
from transformer_jax.training import fit
from transformer_jax.training import lock
from transformer_jax.training import resume
from transformer_jax.training.step import Trainer


def _check_source(workdir: str) -> None:
  """A training workdir, not quantized, whose tokenizer is the one it trained with (quantize
  evaluates the model on its data)."""
  saved = paths.join(workdir or "", "config.json")
  if not workdir or not paths.isfile(saved):  # local or gs://
    raise ConfigError(f"--workdir must be a training workdir with config.json (got {workdir!r})")
  if store.is_quantized(workdir):
    raise ConfigError(f"{workdir} is already quantized; quantize its source workdir instead")
  resume.check_tokenizer(workdir, config_lib.from_json_file(saved).data.tokenizer)


def load_source(workdir: str, overrides=()):
  """(config, trainer, step, params) of a training workdir's latest checkpoint (_check_source'd
  by the caller); `overrides` (KEY=VALUE) change its saved config."""
  for key in (kv.split("=", 1)[0] for kv in overrides):  # the checkpoint's model, as it is
    if (key.startswith("model.") and key not in resume.EXECUTION_KEYS) or key == "data.tokenizer":
      raise ConfigError(f"--config.{key}: quantize keeps the model and tokenizer the checkpoint "
                        f"was trained with (it would quantize, measure and save another); drop it")
  config = config_lib.without_teacher(config_lib.any_platform(
      cli.load_config(None, list(overrides), workdir)))
  distributed.use_cpu_devices(config.mesh.get("cpu_devices", 0))  # as training split the CPU
  devices = _devices(config.mesh)
  config_lib.validate(config, len(devices))
  trainer = Trainer(config, sharding.make_mesh(config, devices))
  step, params = checkpoint.Checkpoints(workdir, config.checkpoint, read_only=True
                                        ).restore_params(trainer.abstract_state.params)
  if params is None:
    raise ConfigError(f"no checkpoint in {workdir}/checkpoints")
  return config, trainer, step, params


def _devices(mesh) -> list:
  """The devices the workdir's mesh names (all, where an axis is -1 or it wants more)."""
  sizes = [mesh.get(a, 1) for a in config_lib.MESH_AXIS_NAMES]
  wanted = math.prod(sizes) if min(sizes) > 0 else 0
  return jax.devices()[:wanted] if 0 < wanted <= jax.device_count() else jax.devices()


def quantize_workdir(workdir: str, out: str, mode: str, group_size: int = 0,
                     overrides=()) -> dict:
  """Writes the quantized workdir `out`; returns the figures the command prints."""
  group = ptq.check(mode, group_size)
  if not out or paths.abspath(out) == paths.abspath(workdir):
    raise ConfigError("--out=DIR is required and must differ from --workdir")
  if refusal := paths.orbax_refusal(out):
    raise ConfigError(f"--out={refusal}")
  _check_source(workdir)  # before --out is made
  cli.output_folder("out", out)  # (a file there: a FileExistsError traceback)
  paths.makedirs(out)
  with lock.hold(out):  # a second quantize into the same --out is refused in one line
    return _quantize_into(workdir, out, mode, group, overrides)


def _quantize_into(workdir: str, out: str, mode: str, group: int, overrides) -> dict:
  held = [n for n in (store.ARRAYS, store.MANIFEST, "config.json", "checkpoints")
          if paths.exists(paths.join(out, n))]
  if held:  # another run's workdir would be read as this quantized copy from then on
    raise ConfigError(f"--out={out} already holds {held[0]} (a workdir); choose a new --out")
  config, trainer, step, params = load_source(workdir, overrides)
  names = ptq.axis_names(trainer.model)
  stored = ptq.quantize_tree(jax.device_get(params), names, mode, group)
  restored = jax.device_put(ptq.dequantize_tree(stored, trainer.abstract_state.params, names),
                            trainer.state_shardings.params)
  # Every validation batch (of each data.mixture source), pooled: one figure per checkpoint.
  batches = [b for bs in pipeline.eval_sets(config, config.eval.batches).values() for b in bs]
  fit.for_evaluation(trainer)  # (train.microbatches=0: the evaluation's own count)
  before, after = trainer.evaluate(params, batches), trainer.evaluate(restored, batches)
  store.save(out, workdir, stored, {"mode": mode, "group_size": group, "step": step,
                                    "source": paths.abspath(workdir)})
  return {"mode": mode, "group_size": group, "step": step,
          "param_bytes": ptq.nbytes(jax.device_get(params)),
          "quantized_param_bytes": ptq.nbytes(stored),
          "quantized_disk_bytes": store.disk_bytes(out),
          "eval_loss": _figure(before), "quantized_eval_loss": _figure(after),
          "eval_tokens": int(before.get("eval_tokens", 0)), "out": paths.abspath(out)}


def _figure(evals: dict):
  """The eval loss; None without validation data (JSON null), "nan"/"inf" for a non-finite
  loss (JSON has no NaN), so that a broken model does not read as one with nothing to score."""
  loss = evals.get("eval_loss")
  if loss is None:
    return None
  return round(float(loss), 6) if np.isfinite(loss) else str(float(loss))
