"""Hugging Face checkpoints <-> transformer_jax: `from_hf`, `to_hf`, `hf_forward` in hf.py (one
table per family: gpt2.py, llama.py, bert.py, t5.py, on tables.py's machinery) and the
`python -m transformer_jax.convert import|export` command (__main__.py)."""
