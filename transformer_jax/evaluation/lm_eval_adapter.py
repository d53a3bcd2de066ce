"""EleutherAI's lm-eval harness (`pip install "lm-eval>=0.4.2,<0.5"`) on our checkpoints.

Importing this module registers the model name `transformer_jax`; lm-eval 0.4 finds models only
in its registry (no entry points), so run its command line through this module:

  python -m transformer_jax.evaluation.lm_eval_adapter --model transformer_jax \\
      --model_args workdir=runs/smoke[,step=N,batch_size=B] --tasks hellaswag [--include_path DIR]

or from Python: `lm_eval.simple_evaluate(model=TransformerJaxLM(workdir=...), tasks=[...])`.
Requests go through scoring.TextModel, exactly as `python -m transformer_jax.evaluate` scores
them: a local multiple-choice task gives both the same accuracies where lm-eval builds the same
requests. lm-eval puts its task's target_delimiter (" ") before every choice; `evaluate` puts a
space there only where neither the context nor the choice has whitespace (tasks.join): for
contexts that end in a newline or a space (corpus_tasks' next_line), give the lm-eval task
`target_delimiter: ""`, or the two score other texts.
"""

import sys

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from transformer_jax import cli
from transformer_jax.config import ConfigError
from transformer_jax.evaluation import harness

DEFAULT_GEN_TOKENS = 256


@register_model("transformer_jax")
class TransformerJaxLM(LM):
  """lm-eval's LM over a workdir's checkpoint (model_args: workdir, step, batch_size), or over a
  scoring.TextModel given as `text_model`."""

  def __init__(self, workdir: str = "", step=None, batch_size=0, text_model=None, seed=0,
               **unused):
    super().__init__()
    del unused  # lm-eval's device, max_batch_size, ...: the mesh decides placement
    if text_model is None:
      trainer, self.step, params = harness.load_workdir(workdir, _step(step))
      text_model = harness.text_model(trainer, params, batch_size=_rows(batch_size))
    self.text_model, self._calls = text_model, 0
    self.seed = _whole(seed, "--model_args seed")

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config=None):
    """--model_args win over the command line's own settings (it always passes its batch_size,
    default 1: a batch_size in model_args was a duplicate keyword, a traceback)."""
    from lm_eval import utils  # pylint: disable=g-import-not-at-top
    return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    unknown = sorted(set(arg_dict) - set(MODEL_ARGS))  # (a typo was taken for lm-eval's own)
    if unknown:
      raise ConfigError(f"--model_args {', '.join(unknown)}: unknown (use "
                        f"{', '.join(MODEL_ARGS)})")
    given = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls(**{**given, **arg_dict})

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    del disable_tqdm
    return self.text_model.loglikelihood([tuple(r.args[:2]) for r in requests])

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    del disable_tqdm
    return self.text_model.loglikelihood_rolling([r.args[0] for r in requests])

  def generate_until(self, requests, disable_tqdm: bool = False):
    """Each request's gen_kwargs read as lm-eval's own `hf` model reads them (`_generation`):
    greedy, or sampled. The requests that share them are generated together
    (batched, a decoder's prompts of a length bucket in one program); the results come back in
    the requests' order. Sampled ones draw from model_args' seed: each batch of each call from
    its own, so a task's `repeats` copies of a request are independent draws."""
    del disable_tqdm
    out, groups = [None] * len(requests), {}
    for i, r in enumerate(requests):
      until, n, sample = _generation(r.args[1])
      groups.setdefault((until, n, tuple(sorted(sample.items()))), []).append(i)
    for (until, n, sample), members in groups.items():
      if sample:  # (a call's batches draw from seed + 0, 1, ...)
        sample = {**dict(sample), "seed": self.seed + _SEED_STRIDE * self._calls}
        self._calls += 1
      texts = self.text_model.generate([requests[i].args[0] for i in members],
                                       until=list(until), max_new_tokens=n, **dict(sample))
      for i, text in zip(members, texts):
        out[i] = text
    return out


_SEED_STRIDE = 1_000_003  # more batches than one call has


_TOKENS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
HF_TOP_K = 50  # transformers' generate() draws from the top 50 unless top_k says otherwise


def _generation(kwargs) -> tuple:
  """(until, max new tokens, sampling settings or {} for greedy) of a request's gen_kwargs, read
  as lm-eval's `hf` model reads them (`_normalized`); a temperature of 0 is greedy, do_sample
  with no temperature draws at 1.0, with no top_k from the 50 likeliest (transformers' default;
  top_k=0 for all). A key that would be ignored, num_beams > 1 (no beam search
  here) or a bad value is refused in one line: tasks that sample (pass@k, self-consistency)
  were given greedy answers, silently."""
  kwargs = {k: v for k, v in (kwargs or {}).items() if v is not None}  # (yaml's null: unset)
  for key in _TOKENS:  # (checked here: lm-eval's int() would say less)
    if kwargs.get(key) is not None:
      _whole(kwargs[key], f"generation_kwargs {key}")
  do_sample, top_k, top_p = (kwargs.get(k) for k in ("do_sample", "top_k", "top_p"))
  temperature = kwargs.get("temperature")
  try:
    values = [float(v) for v in (temperature, top_p) if v is not None]
    ok = all(v == v for v in values) and (top_k is None or _whole(top_k, "") >= 0)
  except (TypeError, ValueError, ConfigError):
    ok = False
  if not ok or str(do_sample).lower() not in ("true", "false", "1", "0", "none"):
    raise ConfigError(f"generation_kwargs do_sample={do_sample!r}, temperature={temperature!r}, "
                      f"top_k={top_k!r}, top_p={top_p!r}: need a bool, numbers, a whole top_k")
  kwargs = _normalized(kwargs)
  until = kwargs.pop("until", None) or []
  until = (until,) if isinstance(until, str) else tuple(until)
  n = _whole(kwargs.pop("max_gen_toks"), "generation_kwargs max_gen_toks")
  do_sample = str(kwargs.pop("do_sample", False)).lower() in ("true", "1")
  temperature = kwargs.pop("temperature", None)
  top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
  if str(kwargs.pop("num_beams", 1)) != "1":
    raise ConfigError("generation_kwargs num_beams: beam search is not offered through lm-eval "
                      "(greedy, or do_sample)")
  if kwargs:
    raise ConfigError(f"generation_kwargs {', '.join(sorted(kwargs))}: not read here (read: "
                      f"until, {', '.join(_TOKENS)}, do_sample, temperature, top_k, top_p)")
  if not do_sample or (temperature is not None and float(temperature) == 0):
    return until, n, {}
  sample = {"temperature": 1.0 if temperature is None else float(temperature),
            "top_k": HF_TOP_K if top_k is None else int(top_k),
            "top_p": 1.0 if top_p is None else float(top_p)}
  if not (0 < sample["temperature"] < float("inf") and 0 < sample["top_p"] <= 1):
    raise ConfigError(f"generation_kwargs temperature={temperature!r}, top_k={top_k!r}, "
                      f"top_p={top_p!r}: need temperature > 0, top_k >= 0, 0 < top_p <= 1")
  return until, n, sample


def _normalized(kwargs: dict) -> dict:
  """gen_kwargs through lm-eval's own normalize_gen_kwargs where it has one (0.4.13 has: a
  temperature > 0 alone samples, max_gen_toks wins over its aliases); else by the older `hf`
  model's rules (only do_sample samples; max_new_tokens wins, as transformers' generate
  reads it)."""
  try:
    from lm_eval.models.utils import normalize_gen_kwargs  # pylint: disable=g-import-not-at-top
  except ImportError:
    normalize_gen_kwargs = None
  if normalize_gen_kwargs is not None:
    return dict(normalize_gen_kwargs(kwargs, DEFAULT_GEN_TOKENS))
  n = kwargs.pop("max_gen_toks", DEFAULT_GEN_TOKENS)
  for key in _TOKENS[1:]:
    n = kwargs.pop(key, None) or n
  return {**kwargs, "max_gen_toks": n}


MODEL_ARGS = ("workdir", "step", "batch_size", "seed")


def _step(step):
  """model_args' step: None (the latest) or a checkpoint's (a whole number >= 0)."""
  return None if step in (None, "") else _whole(step, "--model_args step")


def _whole(value, name: str) -> int:
  """A whole number >= 0 (lm-eval passes strings too), or a one-line error naming it."""
  try:
    if int(value) >= 0 and float(value) == int(value):
      return int(value)
  except (TypeError, ValueError, OverflowError):
    pass
  raise ConfigError(f"{name}={value!r} must be a whole number >= 0")


def _rows(batch_size) -> int:
  """lm-eval passes batch_size as an int, a string or "auto"; "auto" and its default 1 become
  ours (the train step's microbatch rows): scoring one row at a time is only slower."""
  try:
    rows = int(batch_size)
  except (TypeError, ValueError):
    return 0
  return rows if rows > 1 else 0


def main(argv=None):
  """lm-eval's command line (its own flags), our errors as one line (cli.run)."""
  del argv  # (lm-eval reads sys.argv)
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top
  sys.argv[0] = "lm_eval"
  cli_evaluate()


if __name__ == "__main__":
  cli.run(main)
