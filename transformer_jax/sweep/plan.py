"""Sweep plans: a sweep config (configs/sweeps/NAME.py) → one resolved training config per run.

A sweep config's `get_sweep()` returns a ConfigDict with
  base         a training config spec, e.g. "configs/smoke.py"
  overrides    ["KEY=VALUE", ...] applied to it (data, batch, eval, ...)
  grid         "isoflop": every (budget, size) pair, tokens = budget / FLOPs-per-token;
               "nd": every (size, tokens) pair
  budgets      FLOP budgets (isoflop)        tokens   token counts (nd)
  sizes        target NON-embedding parameter counts
  aspect       d_model / num_layers (Kaplan et al. find loss flat over a wide range)
  head_dim     d_model is rounded to a multiple of it; heads = d_model / head_dim
  lr, lr_ref_params, lr_exponent   lr(N) = lr * (N / lr_ref_params) ** -lr_exponent
  warmup_fraction                  warmup steps = this fraction of a run's steps
  min_steps    runs shorter than this are left out of the plan (and reported)

FLOPs per token are the MFU formula's (training/metrics.py): 6·N_matmul + 12·L·H·K·T, with
N_matmul counted from the model's own parameter shapes, so a plan's FLOPs are the FLOPs the runs
will report.
"""

import dataclasses
import json
import math
import os

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import corpus
from transformer_jax.models import families
from transformer_jax.perf import counting


@dataclasses.dataclass
class Run:
  name: str
  num_layers: int
  d_model: int
  num_heads: int
  params: int  # all parameters (an MoE model's: every expert)
  params_nonembed: int  # without the token and position tables
  matmul_params: int  # the N of the FLOP formula (an MoE model's active ones: k of E experts)
  flops_per_token: float
  tokens: int
  flops: float
  steps: int
  batch_size: int
  seq_len: int
  learning_rate: float
  budget: float | None = None


REQUIRED = ("base", "overrides", "grid", "sizes", "aspect", "head_dim", "lr")
OPTIONAL = ("budgets", "tokens", "lr_ref_params", "lr_exponent", "warmup_fraction", "min_steps")
# What plan() sets for every run (an override of one would be silently replaced).
PLANNED = ("train.steps", "optimizer.learning_rate", "optimizer.warmup_steps", "eval.every_steps",
           "model.num_layers", "model.d_model", "model.num_heads")


def load_sweep(path: str):
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
  module = config_lib.exec_python_file(path, "sweep", root)
  if not hasattr(module, "get_sweep"):
    raise ConfigError(f"{path} defines no get_sweep()")
  try:
    sweep = module.get_sweep()
  except (KeyError, ValueError, TypeError) as e:  # e.g. s.budgets = 1.2e8 (ml_collections' type
    raise ConfigError(f"{path}: {e}") from None  # check: a list was expected)
  for key in REQUIRED:
    if key not in sweep:
      raise ConfigError(f"{path}: sweep key {key!r} is missing")
  unknown = sorted(set(sweep) - set(REQUIRED) - set(OPTIONAL))
  if unknown:  # a misspelled lr_exponent or warmup_fraction silently took its default
    raise ConfigError(f"{path}: unknown sweep key(s) {', '.join(unknown)}; known: "
                      f"{', '.join(REQUIRED + OPTIONAL)}")
  planned = [o for o in sweep.overrides if o.partition("=")[0] in PLANNED]
  if planned:
    raise ConfigError(f"{path}: overrides {', '.join(planned)} would be replaced: the plan sets "
                      f"{', '.join(PLANNED)} for each run (use lr, warmup_fraction, sizes)")
  if sweep.grid not in ("isoflop", "nd"):
    raise ConfigError(f"{path}: grid={sweep.grid!r} is not one of isoflop, nd")
  wanted, other = ("budgets", "tokens") if sweep.grid == "isoflop" else ("tokens", "budgets")
  if not sweep.get(wanted):
    raise ConfigError(f"{path}: grid={sweep.grid} needs {wanted!r} (a list)")
  if other in sweep:  # it would be ignored
    raise ConfigError(f"{path}: {other!r} is for the other grid; grid={sweep.grid} reads "
                      f"{wanted!r}")
  _check_numbers(path, sweep, wanted)
  base_file, sep, arg = sweep.base.partition(":")
  if not os.path.isfile(base_file) and os.path.isfile(os.path.join(root, base_file)):
    with sweep.unlocked():  # a base named relative to the repository, from any directory
      sweep.base = os.path.join(root, base_file) + sep + arg
  return sweep


def _number(path, key, value, low=0.0, low_ok=False, high=math.inf, integer=False):
  """`value` of sweep key `key` when it is a finite number in range; else a one-line error."""
  kind = "an int" if integer else "a number"
  if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
    raise ConfigError(f"{path}: sweep key {key} must be {kind}, got {value!r}")
  if not (math.isfinite(value) and (low <= value if low_ok else low < value) and value < high):
    bound = f"{'>=' if low_ok else '>'} {low:g}" + (f" and < {high:g}" if high < math.inf else "")
    raise ConfigError(f"{path}: sweep key {key} must be {kind} {bound}, got {value!r}")
  return value


def _check_numbers(path, sweep, listed):
  """The sweep's numbers, each checked (0 sizes were a ZeroDivisionError, a budget given as a
  string a TypeError, a nan budget a ValueError: tracebacks, or a plan of nonsense)."""
  for key in ("sizes", listed):
    values = sweep[key]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
      raise ConfigError(f"{path}: sweep key {key} must be a list of numbers, got {values!r}")
    for i, value in enumerate(values):
      _number(path, f"{key}[{i}]", value)
  _number(path, "head_dim", sweep.head_dim, integer=True)
  for key in ("aspect", "lr") + (("lr_ref_params",) if "lr_ref_params" in sweep else ()):
    _number(path, key, sweep[key])
  if "lr_exponent" in sweep:
    _number(path, "lr_exponent", sweep.lr_exponent, low=-math.inf, low_ok=True)
  if "warmup_fraction" in sweep:
    _number(path, "warmup_fraction", sweep.warmup_fraction, low_ok=True, high=1.0)
  if "min_steps" in sweep:
    _number(path, "min_steps", sweep.min_steps, low=1, low_ok=True, integer=True)


# Every run's shape follows its width: the base config's fixed sizes would stay the same at
# every width (a Llama base's d_ff, a GPT-3 base's head_dim, T5's decoder depth).
SIZE_RESETS = ("model.d_ff=0", "model.head_dim=0", "model.num_kv_heads=0",
               "model.num_decoder_layers=0")


def shape_for(target_nonembed: float, aspect: float, head_dim: int, per_layer: float = 12.0):
  """(num_layers, d_model, heads) whose per_layer·L·d² non-embedding parameters (12 for a
  plain block; measured by layer_factor) come closest to the target with d ≈ aspect·L and d a
  multiple of head_dim."""
  best = None
  for layers in range(1, 129):
    d = max(head_dim, int(round(aspect * layers / head_dim)) * head_dim)
    err = abs(math.log(per_layer * layers * d * d / target_nonembed))
    if best is None or err < best[0]:
      best = (err, layers, d)
  _, layers, d = best
  return layers, d, d // head_dim


def layer_factor(sweep, overrides: list) -> float:
  """Non-embedding parameters a layer adds, over d_model² (12 for a plain block, 16 for a gated
  FFN of 4 d, 28 for an encoder-decoder's pair of layers), from two abstract inits."""
  d = 8 * sweep.head_dim
  counts = [count_params(config_lib.load(sweep.base, overrides + [
      f"model.num_layers={layers}", f"model.d_model={d}", "model.num_heads=8"]))[1]
            for layers in (1, 2)]
  return (counts[1] - counts[0]) / d ** 2


def count_params(config):
  """(all, non-embedding, matmul) parameter counts and the model's FLOPs per token, from its
  abstract init (no compute)."""
  model = families.build_model(config)
  params = families.abstract_params(model)
  return (*counting.param_counts(params, config.model),
          counting.for_config(config, model.cfg, params))


def plan(sweep_path: str):
  """All runs of the sweep (sorted by FLOPs) and the (name, reason) of those left out."""
  sweep = load_sweep(sweep_path)
  pairs = ([(c, n, None) for c in sweep.budgets for n in sweep.sizes] if sweep.grid == "isoflop"
           else [(None, n, d) for n in sweep.sizes for d in sweep.tokens])
  runs, dropped = [], []
  overrides = list(SIZE_RESETS) + list(sweep.overrides)  # the sweep's own still win
  per_layer = layer_factor(sweep, overrides)
  for budget, target, tokens in pairs:
    layers, d, heads = shape_for(target, sweep.aspect, sweep.head_dim, per_layer)
    config = config_lib.load(sweep.base, overrides + [
        f"model.num_layers={layers}", f"model.d_model={d}", f"model.num_heads={heads}"])
    total, nonembed, matmul, fpt = count_params(config)
    tokens = int(budget / fpt) if budget else int(tokens)
    per_step = config.train.batch_size * config.data.seq_len
    steps = max(1, round(tokens / per_step))
    lr = sweep.lr * (nonembed / sweep.get("lr_ref_params", nonembed)) ** -sweep.get(
        "lr_exponent", 0.0)
    name = (f"C{budget:.3g}_N{nonembed:.3g}" if budget  # an nd run: the tokens it trains on
            else f"N{nonembed:.3g}_D{steps * per_step:.3g}")
    name = name.replace("e+", "e")
    run = Run(name=name, num_layers=layers, d_model=d, num_heads=heads, params=total,
              params_nonembed=nonembed, matmul_params=matmul, flops_per_token=fpt,
              tokens=steps * per_step, flops=fpt * steps * per_step, steps=steps,
              batch_size=config.train.batch_size, seq_len=config.data.seq_len,
              learning_rate=lr, budget=budget)
    if steps < sweep.get("min_steps", 1):
      dropped.append((name, f"{steps} steps < min_steps={sweep.min_steps}"))
      continue
    same = [r.name for r, _ in runs if (r.num_layers, r.d_model, r.steps, r.budget) == (
        layers, d, steps, budget)]
    if same:  # sizes or token counts that round to one run: planned, trained and fitted once
      dropped.append((name, f"size {target:.3g}" + ("" if budget else f", {tokens:.3g} tokens")
                      + f" make the same run as {same[0]}"))
      continue
    clash = [r for r, _ in runs if r.name == name]
    if clash:  # one workdir for two runs: one result would be lost, the other rerun forever
      other = clash[0]
      raise ConfigError(
          f"two runs get the name {name}: {other.steps} and {steps} steps"
          + (f" at budgets {other.budget:.6g} and {budget:.6g}" if budget else "")
          + " (the names keep 3 significant figures): space the sweep's "
          + ("budgets" if budget else "tokens") + " further apart")
    config.train.steps = steps
    config.optimizer.learning_rate = lr
    config.optimizer.warmup_steps = max(1, int(sweep.get("warmup_fraction", 0.05) * steps))
    config.checkpoint.every_steps = max(1, min(config.checkpoint.every_steps, steps))
    config.eval.every_steps = steps  # one held-out evaluation, at the end: the fitted loss
    config_lib.validate(config)  # (a config train refuses was planned, written and launched)
    _check_held_out(config)
    runs.append((run, config))
  runs.sort(key=lambda rc: rc[0].flops)
  return runs, dropped


def _check_held_out(config):
  """A run's result is its final held-out eval_loss: a local corpus with
  data.validation_fraction=0 has none, so its runs finished with no result (and, counted
  unfinished, were started again at every `sweep run`)."""
  sources = list(config.data.mixture) or [{}]
  local = [s for s in sources if not s.get("corpus", config.data.corpus).startswith(
      corpus.TFDS_PREFIX)]
  if local and config.data.validation_fraction <= 0:
    raise ConfigError("data.validation_fraction=0 holds out no documents of a local corpus: a "
                      "sweep's runs are fitted on their final held-out eval_loss (leave it at "
                      "its default, or set one > 0)")


def _started(run_dir: str) -> bool:
  """Whether a train has run in `run_dir` (a checkpoint or a metrics line): its config.json is
  then the run's own, which a resume must keep."""
  return (paths.exists(paths.join(run_dir, "checkpoints"))
          or paths.exists(paths.join(run_dir, "metrics.jsonl")))


def write(runs, out_dir: str):
  """DIR/NAME/config.json per run (train resumes from it: `--workdir=DIR/NAME`) and
  DIR/plan.jsonl, one line per run (DIR may be gs://...: config/paths.py)."""
  lines, texts = [], {run.name: config_lib.to_json(config) for run, config in runs}
  stale = set()
  for name, text in texts.items():  # never rewrite the config of a run that has started, and
    path = paths.join(out_dir, name, "config.json")  # never plan one it contradicts
    if paths.exists(path) and paths.read_text(path) != text:
      if _started(paths.join(out_dir, name)):
        raise ConfigError(f"{path} holds another config than this plan's for run {name}, which "
                          f"has started (the sweep changed since it was planned): plan into a "
                          f"new directory")
      stale.add(name)  # planned, never trained: a corrected sweep is planned again in place
  for run, _ in runs:
    path = paths.join(out_dir, run.name, "config.json")
    if run.name in stale or not paths.exists(path):
      paths.makedirs(paths.join(out_dir, run.name))
      paths.write_text(path, texts[run.name])
    lines.append(json.dumps(dataclasses.asdict(run)) + "\n")
  paths.write_text(paths.join(out_dir, "plan.jsonl"), "".join(lines))


def table(runs) -> str:
  head = (f"{'run':<24}{'layers':>7}{'d':>6}{'heads':>6}{'params':>11}{'non-emb':>11}"
          f"{'tokens':>11}{'FLOPs':>11}{'steps':>7}{'batch':>6}{'lr':>9}")
  rows = [f"{r.name:<24}{r.num_layers:>7}{r.d_model:>6}{r.num_heads:>6}{r.params:>11.3g}"
          f"{r.params_nonembed:>11.3g}{r.tokens:>11.3g}{r.flops:>11.3g}{r.steps:>7}"
          f"{r.batch_size:>6}{r.learning_rate:>9.2g}" for r, _ in runs]
  return "\n".join([head] + rows)
