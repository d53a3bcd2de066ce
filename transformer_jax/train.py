"""Pretrain a model: `python -m transformer_jax.train --config=configs/NAME.py[:ARG] --workdir=DIR
[--config.KEY=VALUE ...]`. Re-running the same command in the same workdir resumes exactly."""

import os
import sys

from transformer_jax import cli
from transformer_jax.config import ConfigError


def main(argv):
  spec, overrides, flags = cli.parse(argv, {"workdir": ""})
  if not flags["workdir"]:
    raise ConfigError("--workdir=DIR is required")
  config = cli.load_config(spec, overrides, flags["workdir"])
  with config.unlocked():  # a workdir's saved config must work from any current directory
    if config.data.tokenizer:
      config.data.tokenizer = os.path.abspath(config.data.tokenizer)
  from transformer_jax.training import loop  # pylint: disable=g-import-not-at-top
  try:
    out = loop.train(config, flags["workdir"])
  except loop.AnomalyError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  if out.get("preempted"):
    sys.exit(128 + out["preempted"])  # the conventional status of a signalled process
  if config.train.sample_prompt:
    from transformer_jax import sample  # pylint: disable=g-import-not-at-top
    text = sample.sample_text(config, out["state"].params, config.train.sample_prompt,
                              max_new_tokens=config.train.sample_tokens, temperature=0.8, top_k=40)
    print(f"--- sample (prompt {config.train.sample_prompt!r}) ---\n"
          f"{config.train.sample_prompt}{text}\n---")
  print(f"done: step {out['step']}, loss {out.get('loss', float('nan')):.4f}, "
        f"eval_loss {out.get('eval_loss', float('nan')):.4f}, workdir {flags['workdir']}")


if __name__ == "__main__":
  cli.entry(main)
