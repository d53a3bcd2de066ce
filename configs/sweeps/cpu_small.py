"""A scaling-law sweep sized for a 2-core CPU: 3 FLOP budgets x 4 model sizes on the embedded
corpus (the smoke recipe's data and tokenizer).

  python -m transformer_jax.sweep plan --sweep=configs/sweeps/cpu_small.py --dir=runs/sweep
"""

import ml_collections


def get_sweep():
  s = ml_collections.ConfigDict()
  s.base = "configs/smoke.py"
  s.overrides = ["train.sample_prompt=", "train.log_every=20", "eval.batches=8",
                 "checkpoint.every_steps=200"]
  s.grid = "isoflop"
  s.budgets = [1.5e12, 5e12, 1.5e13]  # about 30 min on 2 cores (~55 GFLOP/s with overheads)
  s.sizes = [2.5e4, 1e5, 4e5, 1.6e6]  # non-embedding parameters
  s.aspect = 32.0  # d_model / num_layers
  s.head_dim = 32
  s.lr = 3e-3
  s.lr_ref_params = 1e5
  s.lr_exponent = 0.25
  s.warmup_fraction = 0.05
  s.min_steps = 20
  return s
