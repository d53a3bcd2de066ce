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


def matmul_params(params, tie_embeddings: bool) -> int:
  """Parameters that take part in matmuls (see the module docstring); `params` may be abstract."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [getattr(k, "key", "") for k in path]
    if names[-2:] == ["embed", "positions"]:
      continue
    if names[-2:] == ["embed", "tokens"] and not tie_embeddings:
      continue
    total += math.prod(leaf.shape)
  return total


def param_counts(params, tie_embeddings: bool) -> tuple[int, int, int]:
  """(all, non-embedding, matmul) parameter counts; non-embedding leaves out everything under
  params["embed"] (token, position and type tables), as Kaplan et al.'s N does."""
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  embed = sum(math.prod(x.shape) for x in jax.tree.leaves(params["embed"]))
  return total, total - embed, matmul_params(params, tie_embeddings)


def flops_per_token(model_cfg, n_matmul_params: int, seq_len: int) -> float:
  c = model_cfg
  return 6.0 * n_matmul_params + 12.0 * c.num_layers * c.num_heads * c.head_dim * seq_len
