"""Parameter and FLOP counting, one way for every caller (MFU in training and benchmark, the AOT
check's model FLOPs, the sweep planner's sizes).

MFU = model FLOPs per second / peak FLOPs per second of the devices used. Model FLOPs per token are
PaLM's (appendix B) 6*N + 12*L*H*K*T, where N counts the parameters that take part in matmuls
(the token table counts only when tied, as the output projection; lookups, the learned position
and token-type tables and T5's relative-position bias table, do not) and T is the sequence
length. The causal attention term is NOT halved (as in PaLM and nanoGPT; MaxText and Megatron
halve it, which gives lower figures). A sliding-window layer
(model.attention_window W) counts the keys of its band instead of T: min(T, 2W - 1 + the global
tokens + the random blocks' keys), halved for neither side either. Rematerialization is not
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
      if names[-2:] in (["embed", "positions"], ["embed", "types"]) or (
          names[-1] == "relative_bias"):  # lookups: BERT's type table, T5's relative buckets
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


def flops_per_token(model_cfg, params, seq_len: int, target_len: int = 0) -> float:
  """Model FLOPs per counted token: 6 N + 12 L H K T (the module docstring). An encoder-decoder
  counts seq_len (S, the encoder's) tokens a row, and its decoder runs target_len (T) of them:
  6 N_enc S + 6 N_cross_kv S + 6 (N_dec - N_cross_kv) T + 12 H K (L_enc S^2 + L_dec (T^2 + T S))
  a row, per S tokens: the cross-attention's key and value projections run on the S encoder
  outputs, the rest of the decoder's side of N (the output projection included) on its T
  tokens; its self-attention and cross-attention scores as written. `params` may be abstract."""
  c = model_cfg
  n, hk = matmul_params(params, c), 12.0 * c.num_heads * c.head_dim
  if not (c.num_decoder_layers or "decoder" in params):
    return 6.0 * n + hk * keys(c, c.num_layers, seq_len)
  s, t = seq_len, target_len or seq_len
  n_enc, decoder_layers = matmul_params(params["encoder"], c), c.num_decoder_layers or c.num_layers
  n_kv = _cross_kv_params(params["decoder"])
  row = (6.0 * (n_enc + n_kv) * s + 6.0 * (n - n_enc - n_kv) * t
         + hk * (s * keys(c, c.num_layers, s) + t * keys(c, decoder_layers, t)
                 + decoder_layers * t * s))  # the cross-attention: every source key
  return row / s


def _cross_kv_params(decoder) -> int:
  """The decoder's cross-attention key and value projection parameters (every layer's)."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(decoder):
    names = [getattr(k, "key", None) for k in path]
    if "cross_attention" in names and names[names.index("cross_attention") + 1] in ("key",
                                                                                      "value"):
      total += math.prod(leaf.shape)
  return total


def keys(c, num_layers: int, length: int) -> int:
  """Keys a query is counted against, summed over a stack's self-attention layers (the module
  docstring): `length` in a global layer, its band in a sliding-window one."""
  from transformer_jax.models import stack  # pylint: disable=g-import-not-at-top
  extra = c.global_tokens + c.random_blocks * c.block_size
  return sum(min(length, 2 * w - 1 + extra) if w else length
             for w in stack.layer_windows(c, num_layers))


def for_config(config, model_cfg, params) -> float:
  """flops_per_token of a config's model (`model_cfg`, the built model's) and its data lengths."""
  from transformer_jax.data import objectives  # pylint: disable=g-import-not-at-top
  return flops_per_token(model_cfg, params, config.data.seq_len,
                         objectives.spec(config.data).target_len)
