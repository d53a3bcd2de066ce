"""`python -m transformer_jax.config --config=FILE.py[:ARG] [--config.KEY=VALUE ...]` (or
`--workdir=DIR`: its saved config.json): the checks of a training config that need no devices,
data or tokenizer, as train runs them first. A bad config is one `error: ...` line and exit 2;
a good one prints `config ok`. The launch scripts run it before they start any machine."""

from transformer_jax import cli
from transformer_jax import config as config_lib


def main(argv):
  spec, overrides, flags = cli.parse(argv, {"workdir": ""})
  config = cli.load_config(spec, overrides, flags["workdir"])
  config_lib.validate(config)
  from transformer_jax.data import objectives  # pylint: disable=g-import-not-at-top
  objectives.check(config)
  print(f"config ok: {spec or flags['workdir']}")


if __name__ == "__main__":
  cli.run(main)
