"""Parameter and FLOP counting, one way for every caller (MFU in training and benchmark, the AOT
check's model FLOPs, the sweep planner's sizes).

MFU = model FLOPs per second / peak FLOPs per second of the devices used. Model FLOPs per token are
PaLM's (appendix B) 6*N + 12*L*H*K*T, where N counts the parameters that take part in matmuls
(the token table counts only when tied, as the output projection; lookups and the learned position
table do not) and T is the sequence length. The causal attention term is NOT halved (as in PaLM and
nanoGPT; MaxText and Megatron halve it, which gives lower figures). Rematerialization is not
counted: MFU measures useful model work, not hardware work.
"""

import math

import jax


def matmul_params(params, model_cfg) -> int:
  """Parameters that take part in matmuls, per token (see the module docstring); `params` may be
  abstract, `model_cfg` is the model's config (tie_embeddings, experts_per_token). In an MoE
  layer (a module with a "router") each token meets experts_per_token of its E stacked experts:
  their parameters count k/E of their number (the active parameters); the router and shared
  experts count whole."""
  k = model_cfg.experts_per_token

  def count(tree, names, moe_share):
    if not isinstance(tree, dict) and not hasattr(tree, "items"):
      if names[-2:] == ["embed", "positions"]:
        return 0
      if names[-2:] == ["embed", "tokens"] and not model_cfg.tie_embeddings:
        return 0
      return math.prod(tree.shape) * moe_share
    experts = "router" in tree
    total = 0
    for name, sub in tree.items():
      share = moe_share
      if experts and name not in ("router", "shared", "shared_gate"):
        share = k / tree["router"].shape[-1]
      total += count(sub, names + [name], share)
    return total

  return round(count(params, [], 1.0))


def param_counts(params, model_cfg) -> tuple[int, int, int]:
  """(all, non-embedding, matmul) parameter counts; non-embedding leaves out everything under
  params["embed"] (token, position and type tables), as Kaplan et al.'s N does; matmul counts
  an MoE layer's active parameters (matmul_params), all and non-embedding every expert."""
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  embed = sum(math.prod(x.shape) for x in jax.tree.leaves(params["embed"]))
  return total, total - embed, matmul_params(params, model_cfg)


def flops_per_token(model_cfg, n_matmul_params: int, seq_len: int) -> float:
  c = model_cfg
  return 6.0 * n_matmul_params + 12.0 * c.num_layers * c.num_heads * c.head_dim * seq_len
