"""Downstream evaluation of a checkpoint (the `evaluate` command) or of a training run's current
parameters (`eval.tasks`, at each evaluation of the training loop).

A workdir's parameters are restored straight into the training sharding (the Trainer's abstract
state, on this machine's mesh), so a model evaluates on as many devices as it trained on without
ever being gathered on one.
"""

import functools
import math
import sys
import time

import jax

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import tokenization
from transformer_jax.quant import store
from transformer_jax.evaluation import scoring
from transformer_jax.evaluation import tasks as tasks_lib
from transformer_jax.parallel import sharding
from transformer_jax.training import checkpoint
from transformer_jax.training import fit
from transformer_jax.training import resume
from transformer_jax.training.step import Trainer


def batch_rows(trainer, batch_size: int = 0) -> int:
  """Rows per scoring batch: `batch_size` or the train step's microbatch rows, rounded up to a
  multiple of the number of batch shards."""
  c = trainer.config
  if not batch_size:  # (train.microbatches=0 outside training: as many as evaluation needs)
    fit.for_evaluation(trainer)
  rows = batch_size or max(c.train.batch_size // trainer.microbatches, 1)
  size = trainer.mesh.size
  length = scoring.bucket(0, scoring.MIN_BUCKET, sharding.length_multiple(trainer.mesh,
                                                                          trainer.rules))
  shards = size // trainer.batch_sharding.shard_shape((size, length))[0]
  return sharding.round_up(rows, shards)


def text_model(trainer, params, *, batch_size: int = 0, padding: str = "right"):
  """A scoring.TextModel over a trainer's model, mesh and rules, with its config's tokenizer."""
  tok = tokenization.load(trainer.config.data.tokenizer)
  return scoring.TextModel(trainer.config, params, tok, batch_size=batch_rows(trainer, batch_size),
                           mesh=trainer.mesh, rules=trainer.rules, padding=padding,
                           model=trainer.model)


def read_config(workdir: str):
  """A training workdir's saved config (config.json)."""
  saved = paths.join(workdir or "", "config.json")  # local or gs://
  with paths.storage_errors(workdir or "", f"--workdir={workdir} cannot be read", ConfigError):
    found = bool(workdir) and paths.isfile(saved)
  if not found:
    raise ConfigError(f"--workdir must be a training workdir with config.json (got {workdir!r})")
  config = config_lib.from_json_file(saved)
  resume.check_tokenizer(workdir, config.data.tokenizer)
  return config


def load_workdir(workdir: str, step: int | None = None, *, init: bool = False, devices=None,
                 config=None):
  """(trainer, step, params) of a training workdir: its checkpoint at `step` (default the latest)
  restored into the training sharding, or with `init` the config's initial parameters (step 0,
  the untrained baseline). `config`: its read_config, where the caller has it already."""
  config = read_config(workdir) if config is None else config
  config = config_lib.without_teacher(config_lib.any_platform(config))
  devices = devices if devices is not None else jax.devices()
  trainer = Trainer(config, sharding.make_mesh(config, _mesh_devices(config, devices)))
  if init:
    if step is not None:
      raise ConfigError("--init evaluates the untrained parameters: give it no --step")
    return trainer, 0, trainer.init_state(config.seed).params
  if store.is_quantized(workdir):  # quantize's output: dequantized, placed as training's
    saved, params = store.restore_params(workdir, config.checkpoint, trainer.model,
                                         trainer.abstract_state.params)
    checkpoint.require_step(workdir, [saved], step, quantized=True)
    return trainer, saved, jax.device_put(params, trainer.state_shardings.params)
  ckpts = checkpoint.Checkpoints(workdir, config.checkpoint, read_only=True)
  checkpoint.require_step(workdir, ckpts.all_steps(), step)
  step, params = ckpts.restore_params(trainer.abstract_state.params, step)
  return trainer, step, params


def load_tasks(specs, *, num_fewshot: int = 0, limit: int = 0, fewshot_file: str = "",
               data_dir: str = "", family: str = "") -> list:
  """The tasks of SPECs (PATH or KIND:PATH; already loaded tasks pass through), checked (against
  model.family `family` too, where given); TFDS tasks are prepared under data_dir (the run's
  data.data_dir)."""
  if not specs:
    raise ConfigError("--tasks needs at least one task: PATH.jsonl or KIND:PATH")
  loaded = [s if isinstance(s, tasks_lib.Task) else
            tasks_lib.load(s, num_fewshot=num_fewshot, fewshot_file=fewshot_file, limit=limit,
                           data_dir=data_dir, family=family)
            for s in specs]
  for task in loaded:
    tasks_lib.check_family(task, family)
  if num_fewshot and not any(tasks_lib.takes_fewshot(t.kind, family) for t in loaded):
    on = " on an encoder-decoder" if family == "encdec" else ""  # (read by none: refused)
    raise ConfigError(f"--num_fewshot={num_fewshot}: no task here takes few-shot examples "
                      f"({', '.join(sorted({t.kind for t in loaded}))} are scored without{on})")
  return loaded


def _mesh_devices(config, devices):
  """The devices the saved mesh takes: all of them when an axis fills (-1), else the first
  data * fsdp * ... (a run trained on fewer devices than this machine has still evaluates)."""
  sizes = [config.mesh.get(a, 1) for a in sharding.MESH_AXES]
  sizes += [v for k, v in config.mesh.items() if k.startswith("dcn_")]
  if -1 in sizes:
    return devices
  return devices[:math.prod(sizes)] if math.prod(sizes) <= len(devices) else devices


def evaluate(lm, specs, *, num_fewshot: int = 0, limit: int = 0, fewshot_file: str = "",
             seed: int = 0, timing: bool = True) -> dict:
  """{task name: metrics} for each task (a SPEC or a loaded task); with `timing` each task also
  reports its examples, seconds and examples_per_s."""
  loaded = load_tasks(specs, num_fewshot=num_fewshot, limit=limit, fewshot_file=fewshot_file,
                      family="encdec" if lm.is_seq2seq else "")
  without = [t.name for t in loaded if num_fewshot and not tasks_lib.uses_fewshot(t, lm)]
  if without:
    print(f"note: --num_fewshot={num_fewshot} does not apply to {', '.join(without)}: scored "
          f"without examples", file=sys.stderr)
  out = {}
  for task, name in zip(loaded, unique_names([t.name for t in loaded])):
    start = time.perf_counter()
    metrics = tasks_lib.run(task, lm, num_fewshot=num_fewshot, seed=seed)
    seconds = time.perf_counter() - start
    if timing:
      n = len(task.examples)
      metrics.update(examples=n, seconds=round(seconds, 3), examples_per_s=n / max(seconds, 1e-9))
    out[name] = metrics
  return out


def unique_names(names: list[str]) -> list[str]:
  """`names` with each repeat renamed NAME_k, k the first from 2 that no task is named and no
  earlier repeat took (NAME_{position} could be another task's name, whose results it replaced)."""
  taken, used, out = set(names), set(), []
  for name in names:
    new, k = name, 2
    if name in used:
      while f"{name}_{k}" in taken:
        k += 1
      new = f"{name}_{k}"
    used.add(new)
    taken.add(new)
    out.append(new)
  return out


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str):
  return tokenization.load(path)


_TASKS = {}  # (eval.tasks, data.data_dir) -> the loaded tasks


def check_tasks(config):
  """Reads the config's eval.tasks now (cached for the run): a missing or bad task file is a
  one-line error before training, not at its first evaluation."""
  specs = tuple(config.eval.get("tasks", ()) or ())
  if not all(isinstance(spec, str) for spec in specs):  # (a traceback reading them)
    raise ConfigError(f"eval.tasks={specs!r} must name tasks as strings, e.g. "
                      f"\"('a.jsonl','cloze:b.jsonl')\"")
  key = (specs, config.data.data_dir)
  if specs and key not in _TASKS:
    loaded = load_tasks(specs, data_dir=config.data.data_dir, family=config.model.family)
    # every example measured against model.max_len now: a passkey or answer too long for the
    # model stopped the run at its first evaluation, before that step's checkpoint
    evaluate(scoring.Lengths(config, _tokenizer(config.data.tokenizer)), loaded, timing=False)
    _TASKS[key] = loaded


def during_training(trainer, params) -> dict:
  """`eval_TASK_METRIC` for each of the config's eval.tasks ({} when it names none): the
  training loop's hook at each evaluation."""
  c = trainer.config
  specs = tuple(c.eval.get("tasks", ()) or ())
  if not specs:
    return {}
  lm = scoring.TextModel(c, params, _tokenizer(c.data.tokenizer), batch_size=batch_rows(trainer),
                         mesh=trainer.mesh, rules=trainer.rules, model=trainer.model)
  check_tasks(c)  # read once per run, not at every evaluation
  results = evaluate(lm, _TASKS[(specs, c.data.data_dir)], timing=False)
  return {f"eval_{name}_{metric}": value for name, metrics in results.items()
          for metric, value in metrics.items()}
