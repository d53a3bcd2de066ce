"""Switch Transformer shapes (Fedus et al. 2022): `configs/switch.py:SIZE` with SIZE one of
tiny | base.

  bash launch/local.sh configs/switch.py:tiny                     # CPU, the embedded corpus
  python -m transformer_jax.train --config=configs/switch.py:base --workdir=runs/switch_base

T5's encoder-decoder (configs/t5.py: relative position bias, pre-RMSNorm, untied output, span
corruption) with every other FFN (layers 1, 3, 5, ... of each stack) a mixture of experts routed
top-1 ("switch" routing: the expert's raw router probability scales its output, no
renormalisation), a fixed capacity per expert of 1.25 x its share of a row's tokens (overflow
dropped and carried by the residual), router inputs jittered by 1% while training, and the
load-balancing loss at 0.01 and ST-MoE's router z-loss at 0.001. base is Switch-Base-8's shape
(T5-base with 8 experts: 12 + 12 layers, width 768, ReLU FFNs 3072 wide, 32128 tokens); the paper
scales the same layout to 128 experts (`--config.model.num_experts=128`).
"""

from configs import t5

# name: (layers per stack, d_model, heads, d_ff, experts, vocab, seq, batch, lr)
SIZES = {
    "tiny": (2, 128, 4, 256, 4, 8192, 128, 16, 3e-3),
    "base": (12, 768, 12, 3072, 8, 32128, 512, 256, 1e-2),
}


def get_config(arg=None):
  size = arg or "base"
  if size not in SIZES:
    raise KeyError(f"unknown switch size {size!r}; one of {', '.join(SIZES)}")
  layers, d, heads, d_ff, experts, vocab, seq, batch, lr = SIZES[size]
  c = t5.get_config("tiny" if size == "tiny" else "base")
  c.model.update(num_layers=layers, num_decoder_layers=layers, d_model=d, num_heads=heads,
                 head_dim=d // heads, d_ff=d_ff, vocab_size=vocab, max_len=seq,
                 activation="relu", init_std=d ** -0.5, num_experts=experts,
                 experts_per_token=1, moe_every=2, expert_capacity_factor=1.25,
                 router_renormalize=False, router_jitter=0.01, router_aux_loss=0.01,
                 router_z_loss=0.001)
  c.data.seq_len = seq
  c.train.batch_size = batch
  c.optimizer.learning_rate = lr
  if size != "tiny":
    c.mesh.update(data=-1, expert=experts)
  return c
