"""transformer_jax: pretraining Transformer language models with JAX, Flax, Optax and Orbax."""

__version__ = "0.1.0"
