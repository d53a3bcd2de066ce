"""Smoke run: a tiny decoder pretrained on the embedded corpus (this Python's standard library
sources, a CODE corpus) on CPU in a couple of minutes.

  bash launch/local.sh                      # = configs/smoke.py, workdir runs/smoke
  python -m transformer_jax.train --config=configs/smoke.py --workdir=runs/smoke

Expected on a 2-core CPU: loss from ~9.0 to ~4 in 300 steps, eval_loss ~5.5, ~2 minutes.
"""

from transformer_jax.config import base


def get_config(arg=None):
  if arg:
    raise KeyError(f"configs/smoke.py takes no :ARG (got {arg!r})")
  c = base.get_config()
  c.model.update(num_layers=2, d_model=128, num_heads=4, max_len=128, vocab_size=8192)
  c.data.seq_len = 128
  c.train.update(batch_size=16, steps=300, log_every=10, sample_prompt="def read_config(path",
                 sample_tokens=48)
  c.optimizer.update(learning_rate=3e-3, warmup_steps=30, weight_decay=0.01)
  c.checkpoint.every_steps = 100
  c.eval.update(every_steps=100, batches=4)
  return c
