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

  def __init__(self, workdir: str = "", step=None, batch_size=0, text_model=None, **unused):
    super().__init__()
    del unused  # lm-eval's device, max_batch_size, ...: the mesh decides placement
    if text_model is None:
      trainer, self.step, params = harness.load_workdir(workdir, _step(step))
      text_model = harness.text_model(trainer, params, batch_size=_rows(batch_size))
    self.text_model = text_model

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
    """Greedy; each request's gen_kwargs give `until` and `max_gen_toks`. The requests that share
    both are generated together (batched, a decoder's prompts of a length bucket in one
    program); the results come back in the requests' order."""
    del disable_tqdm
    out, groups = [None] * len(requests), {}
    for i, r in enumerate(requests):
      kwargs = dict(r.args[1] or {})
      until = kwargs.get("until") or []
      until = (until,) if isinstance(until, str) else tuple(until)
      n = int(kwargs.get("max_gen_toks", DEFAULT_GEN_TOKENS))  # (generate caps it, and says so)
      groups.setdefault((until, n), []).append(i)
    for (until, n), members in groups.items():
      texts = self.text_model.generate([requests[i].args[0] for i in members],
                                       until=list(until), max_new_tokens=n)
      for i, text in zip(members, texts):
        out[i] = text
    return out


MODEL_ARGS = ("workdir", "step", "batch_size")


def _step(step):
  """model_args' step: None (the latest) or a whole number >= 0."""
  if step in (None, ""):
    return None
  try:
    if int(step) >= 0:
      return int(step)
  except (TypeError, ValueError):
    pass
  raise ConfigError(f"--model_args step={step!r} must be a checkpoint step (a number >= 0)")


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
