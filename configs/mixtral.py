"""Mixtral shapes (Jiang et al. 2024, "Mixtral of Experts"): `configs/mixtral.py:SIZE` with SIZE
one of tiny | 8x7b | 8x22b.

  bash launch/local.sh configs/mixtral.py:tiny                    # CPU, the embedded corpus
  python -m transformer_jax.aot --config=configs/mixtral.py:8x7b --topology=v5p-64
  python -m transformer_jax.train --config=configs/mixtral.py:8x7b --workdir=runs/mixtral

A Mistral-style decoder (rotary positions, theta 10^6; grouped-query attention with 8 KV heads;
pre-RMSNorm, eps 1e-5; no biases; untied output projection) whose every FFN is a sparse mixture
of 8 SwiGLU experts, 2 per token, routed by a softmax router with the top-2 weights renormalised
and computed dropless (models/moe.py), with Switch's load-balancing loss at 0.04: the released
config.json's router_aux_loss_coef 0.02 in Hugging Face's form, which counts each of a token's 2
choices and so is 2x ours (convert/ maps between the two). 8x7b: 32 layers, width 4096, 32 heads, experts 14336 wide, 32000
tokens: 46.7B parameters, 12.9B active per token. 8x22b: 56 layers, width 6144, 48 heads,
experts 16384 wide, 32768 tokens: 141B parameters, 39B active. Mixtral's context is 32k (8x7b)
and 64k (8x22b); these pretrain on 4096-token rows. Every dense config becomes an MoE one with
the same keys (`--config.model.num_experts=8`). `tiny` is a CPU-sized model for tests.

The big sizes scan their layers, compute in bfloat16 and place experts on their own mesh axis
(mesh.expert: each chip holds whole experts; dropless, an expert group gathers its tokens and
reduce-scatters the outputs; with a capacity factor the tokens go to the experts by all-to-all)
with every parameter also sharded over fsdp, and split the batch into microbatches (16 for 8x7b,
8 for 8x22b: what a v5p-64 and a v5p-256 need, dropless); which slices they fit:
benchmarks/RESULTS.md.
"""

from configs import llama
from transformer_jax.config import base

# name: (layers, d_model, heads, kv_heads, expert d_ff, vocab, seq_len, batch, lr)
SIZES = {
    "tiny": (2, 64, 4, 2, 128, 8192, 64, 8, 1e-3),
    "8x7b": (32, 4096, 32, 8, 14336, 32000, 4096, 1024, 3e-4),
    "8x22b": (56, 6144, 48, 8, 16384, 32768, 4096, 1024, 2e-4),
}


def get_config(arg=None):
  """Llama's recipe (configs/llama.py: optimizer, schedule, precision, layer scan) with
  Mixtral's shapes and experts."""
  size = arg or "8x7b"
  if size not in SIZES:
    raise KeyError(f"unknown mixtral size {size!r}; one of {', '.join(SIZES)}")
  layers, d, heads, kv_heads, d_ff, vocab, seq, batch, lr = SIZES[size]
  c = llama.get_config("tiny" if size == "tiny" else "7b")
  c.model.update(num_layers=layers, d_model=d, num_heads=heads, num_kv_heads=kv_heads,
                 d_ff=d_ff, vocab_size=vocab, max_len=seq, rope_theta=1e6,
                 num_experts=4 if size == "tiny" else 8, experts_per_token=2,
                 expert_capacity_factor=0.0, router_renormalize=True, router_aux_loss=0.04,
                 router_z_loss=0.0)
  c.data.seq_len = seq
  c.train.batch_size = batch
  c.optimizer.learning_rate = lr
  if size == "tiny":
    base.cpu_sized(c)
  else:
    c.train.steps = 250_000
    c.train.microbatches = 16 if size == "8x7b" else 8
    c.mesh.update(data=1, fsdp=-1, expert=8, tensor=1)
  return c
