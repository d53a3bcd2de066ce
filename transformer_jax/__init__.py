"""transformer_jax: pretraining Transformer language models with JAX, Flax, Optax and Orbax."""

__version__ = "0.1.0"

from transformer_jax import cli as _cli  # pylint: disable=g-import-not-at-top

_cli.keep_ctrl_c()  # Before anything imports jax: see cli.interrupt.
