"""Scaling-law sweeps: plan, run, fit and report (`python -m transformer_jax.sweep`)."""
