"""Mixture-of-Experts FFN: a drop-in for layers.MLP in any stack (Shazeer et al. 2017; GShard,
Switch Transformer, Mixtral, DeepSeek-MoE / Qwen-MoE's shared experts).

A softmax router in fp32 scores the E experts of each token; the top K carry it, weighted by
their router probabilities (renormalised to sum to 1 with `router_renormalize`, as Mixtral; raw
as Switch and GShard). Two ways to run the experts:

- dropless (`expert_capacity_factor` = 0): the token-expert assignments are sorted by expert and
  each expert multiplies its contiguous group (`jax.lax.ragged_dot`); nothing is dropped.
- capacity (> 0): each row (the group) gives every expert C = ceil(T K factor / E) slots;
  assignments past C are dropped (the token keeps its residual). Dispatch and combine are one-hot
  einsums over [B, T, E, C], the experts one batched einsum. The slots fill in order of
  position, then choice rank, so that what a token keeps depends only on the tokens before it.
  GShard's order (every token's first choice before any second choice) would let a later
  token's first choice take an earlier token's slot: the future would reach a causal or
  prefix LM's past, and the padding that ends a packed row would take real tokens' slots.
  Sampling, beam search and scoring run the model without drops (families.for_inference).

Expert parallelism: the stacked expert weights' leading axis is logical "expert" and the rules
map it to mesh.expert; the experts run inside `shard_map` over the whole mesh. With the tokens
spread over the expert axis (act_batch includes it), capacity dispatch exchanges each expert's
slots with `all_to_all` (GShard); dropless gathers the expert group's tokens, runs the local
experts on theirs, and reduce-scatters the outputs back. The FFN width may be sharded too
(tensor: a psum after the down projection) and the weights' model dim (fsdp: gathered on entry).

Each MoE layer sows into the "moe" collection (model.apply(..., mutable=["moe"])): `aux_loss`
(Switch's E * sum_e f_e P_e, f_e the share of the N K assignments routed to e and P_e its mean
router probability: 1 at uniform routing), `z_loss` (ST-MoE: mean squared log-partition),
`dropped` (the share of assignments dropped) and `load` (max / mean assignments per expert), all
over the real tokens: the padding (segment id 0) is routed but takes no slot and is not counted.

Letters: E experts, K experts per token, C capacity slots, N = B T tokens, M = N K assignments.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from transformer_jax.models import attention
from transformer_jax.models import layers
from transformer_jax.models import ops

STATS = ("aux_loss", "z_loss", "dropped", "load")  # what each MoE layer sows, in "moe"


def is_moe_layer(c: layers.ModelConfig, i: int) -> bool:
  """Whether layer i (0-based, in its stack) has the MoE FFN: every moe_every-th, counted from 1
  (moe_every=2: layers 1, 3, 5, ... as Switch and Qwen's decoder_sparse_step)."""
  return c.num_experts > 0 and (i + 1) % c.moe_every == 0


def capacity(c: layers.ModelConfig, t: int) -> int:
  """Slots per expert in a group (row) of t tokens: ceil(t K factor / E), at most t (rounded to
  9 digits first: 100 x 1.1 is 110.00000000000001 in floats, one slot too many)."""
  exact = round(t * c.experts_per_token * c.expert_capacity_factor / c.num_experts, 9)
  return min(math.ceil(exact), t)


def route(c: layers.ModelConfig, logits_BTE):
  """(weights [B, T, K] fp32, experts [B, T, K] int32, probabilities [B, T, E])."""
  probs_BTE = jax.nn.softmax(logits_BTE, axis=-1)
  weights_BTK, experts_BTK = jax.lax.top_k(probs_BTE, c.experts_per_token)
  if c.router_renormalize:
    weights_BTK = weights_BTK / jnp.sum(weights_BTK, axis=-1, keepdims=True)
  return weights_BTK, experts_BTK.astype(jnp.int32), probs_BTE


def slots(experts_BTK, num_experts: int, cap: int, real_BT=None):
  """Each assignment's slot in its expert within the row, in priority order (position, then
  choice rank); `cap` (no slot: dropped) where the expert is full, and for the padding (where
  `real_BT` is False), which takes no slot. int32 [B, T, K]."""
  b, t, k = experts_BTK.shape
  onehot_BME = jax.nn.one_hot(experts_BTK.reshape(b, t * k), num_experts, dtype=jnp.int32)
  if real_BT is not None:
    onehot_BME = onehot_BME * jnp.repeat(real_BT, k, axis=1)[..., None].astype(jnp.int32)
  position_BM = jnp.sum((jnp.cumsum(onehot_BME, axis=1) - 1) * onehot_BME, axis=-1)
  position_BTK = position_BM.reshape(b, t, k)
  if real_BT is not None:
    position_BTK = jnp.where(real_BT[..., None], position_BTK, cap)
  return jnp.where(position_BTK < cap, position_BTK, cap).astype(jnp.int32)


def router_stats(c: layers.ModelConfig, logits_BTE, probs_BTE, experts_BTK, slots_BTK,
                 real_BT) -> dict:
  """This layer's aux_loss, z_loss, dropped and load (see the module docstring), over the real
  tokens (`real_BT`; the padding is routed but neither trains the router nor counts)."""
  e, w_BT = c.num_experts, real_BT.astype(jnp.float32)
  tokens = jnp.maximum(jnp.sum(w_BT), 1.0)
  counts_E = jnp.einsum("btke,bt->e", jax.nn.one_hot(experts_BTK, e, dtype=jnp.float32), w_BT)
  assigned = jnp.maximum(jnp.sum(counts_E), 1.0)
  kept = jnp.sum(counts_E) if slots_BTK is None else jnp.sum(  # (none on padding alone)
      (slots_BTK < capacity(c, slots_BTK.shape[1])) * w_BT[..., None])
  mean_prob_E = jnp.einsum("bte,bt->e", probs_BTE, w_BT) / tokens
  log_z_BT = jax.nn.logsumexp(logits_BTE, axis=-1)
  return {"aux_loss": e * jnp.sum(counts_E / assigned * mean_prob_E),
          "z_loss": jnp.sum(jnp.square(log_z_BT) * w_BT) / tokens,
          "dropped": (jnp.sum(counts_E) - kept) / assigned,
          "load": jnp.max(counts_E) / jnp.maximum(jnp.mean(counts_E), 1e-9)}


def expert_ffn(activation: str, w: dict, matmul):
  """The experts' FFN of the tokens `matmul` holds: matmul(name) multiplies them by weight
  w[name] (+ its bias, if any); `down` by the hidden. Same activations as layers.MLP."""
  return matmul("down", layers.activate(activation, matmul))


class MoE(nn.Module):
  """Router + E stacked expert FFNs (+ shared experts, always on); replaces layers.MLP."""
  cfg: layers.ModelConfig

  @nn.compact
  def __call__(self, x_BTD, *, deterministic=True, segment_ids_BT=None):
    """`segment_ids_BT`: the rows' packed segments; the padding (0) takes no capacity slot and
    is left out of the router's losses and statistics."""
    c = self.cfg
    e, f, dt = c.num_experts, c.expert_d_ff or c.d_ff, c.compute_dtype
    init, resid = nn.initializers.normal(c.init_std), nn.initializers.normal(c.resid_std)
    x32_BTD = x_BTD.astype(jnp.float32)
    if c.router_jitter and not deterministic:  # Switch: multiplicative noise on the inputs
      x32_BTD = x32_BTD * jax.random.uniform(self.make_rng("dropout"), x32_BTD.shape,
                                             minval=1 - c.router_jitter,
                                             maxval=1 + c.router_jitter)
    router_DE = layers.param(self, "router", (c.d_model, e), ("embed", None), init)
    logits_BTE = jnp.einsum("btd,de->bte", x32_BTD, router_DE.astype(jnp.float32))
    weights_BTK, experts_BTK, probs_BTE = route(c, logits_BTE)

    names = (("gate",) if c.activation in layers.GATED else ()) + ("up",)
    w = {n: layers.param(self, n, (e, c.d_model, f), ("expert", "embed", "mlp"), init)
         for n in names}
    w["down"] = layers.param(self, "down", (e, f, c.d_model), ("expert", "mlp", "embed"), resid)
    if c.use_bias:
      for n in names:
        w[n + "_bias"] = layers.param(self, n + "_bias", (e, f), ("expert", "mlp"),
                                      nn.initializers.zeros)
      w["down_bias"] = layers.param(self, "down_bias", (e, c.d_model), ("expert", "embed"),
                                    nn.initializers.zeros)
    w = {n: v.astype(dt) for n, v in w.items()}
    x_BTD = x_BTD.astype(dt)
    real_BT = (jnp.ones(x_BTD.shape[:2], bool) if segment_ids_BT is None
               else segment_ids_BT > 0)
    if c.expert_capacity_factor:
      cap = capacity(c, x_BTD.shape[1])
      slots_BTK = slots(experts_BTK, e, cap, real_BT)
      run = functools.partial(_capacity, c.activation, e, cap)
    else:
      slots_BTK = None
      run = functools.partial(_dropless, c.activation, e)
    y_BTD = _sharded(run, x_BTD, experts_BTK, weights_BTK.astype(dt), slots_BTK, w)
    for name, value in router_stats(c, logits_BTE, probs_BTE, experts_BTK, slots_BTK,
                                    real_BT).items():
      self.sow("moe", name, value)
    if c.num_shared_experts:  # always-on experts: one dense FFN of their summed width
      shared_BTD = layers.MLP(c, d_ff=c.num_shared_experts * f, name="shared")(x_BTD)
      if c.shared_expert_gate:  # Qwen-MoE: scaled by sigmoid(x . g)
        g_D1 = layers.param(self, "shared_gate", (c.d_model, 1), ("embed", None), init)
        shared_BTD = shared_BTD * jax.nn.sigmoid(ops.dense(x_BTD, g_D1.astype(dt)))
      y_BTD = y_BTD + shared_BTD
    return checkpoint_name(y_BTD.astype(dt), "mlp_out")


def _sharded(run, x_BTD, experts_BTK, weights_BTK, slots_BTK, w: dict):
  """`run` on each device's tokens and experts (shard_map over the context mesh, the specs from
  the rules' act_batch, act_length, expert and mlp), or on everything with no mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return run(x_BTD, experts_BTK, weights_BTK, slots_BTK, w, axes={})
  b, t = x_BTD.shape[:2]
  e, f = w["down"].shape[:2]
  batch = attention.mesh_axes(mesh, "act_batch", b)
  length = attention.mesh_axes(mesh, "act_length", t)
  expert = attention.mesh_axes(mesh, "expert", e)
  mlp = attention.mesh_axes(mesh, "mlp", f)
  names = lambda a: (a,) if isinstance(a, str) else tuple(a or ())
  axes = {"expert": names(expert), "mlp": names(mlp), "length": names(length),
          "ep": math.prod(mesh.shape[a] for a in names(expert)),
          "spread": bool(names(expert)) and set(names(expert)) <= set(names(batch))}
  token = P(batch, length, None)
  w_specs = {n: P(expert, None, mlp) if n in ("gate", "up") else
             P(expert, mlp, None) if n == "down" else
             P(expert, mlp) if n in ("gate_bias", "up_bias") else P(expert, None) for n in w}
  local = jax.shard_map(functools.partial(run, axes=axes), mesh=mesh,
                        in_specs=(token, token, token, None if slots_BTK is None else token,
                                  w_specs), out_specs=token, check_vma=False)
  return local(x_BTD, experts_BTK, weights_BTK, slots_BTK, w)


def _local_experts(axes: dict, e: int) -> tuple:
  """(this device's first expert, how many it holds, the expert-parallel size)."""
  ep = axes.get("ep", 1)
  first = jax.lax.axis_index(axes["expert"]) * (e // ep) if ep > 1 else 0
  return first, e // ep, ep


def _bias(w: dict, name: str, axes: dict):
  """An expert bias [E_local, ...]; the down projection's only on the first FFN-width shard (the
  shards' outputs are summed)."""
  bias = w[name + "_bias"]
  if name == "down" and axes.get("mlp"):
    bias = bias * (jax.lax.axis_index(axes["mlp"]) == 0).astype(bias.dtype)
  return bias


def _finish(y, axes: dict, ep: int, scatter_axis: int):
  """Sums the partial outputs: over the FFN width's shards (tensor), and over the expert group:
  reduce-scattered back to the tokens' owners when spread over it, else summed."""
  if axes.get("mlp"):
    y = jax.lax.psum(y, axes["mlp"])
  if ep > 1:
    y = (jax.lax.psum_scatter(y, axes["expert"], scatter_dimension=scatter_axis, tiled=True)
         if axes["spread"] else jax.lax.psum(y, axes["expert"]))
  return y


def _dropless(activation, e, x_BTD, experts_BTK, weights_BTK, slots_BTK, w, *, axes):
  """Sort the assignments by expert and multiply each expert's group (ragged_dot)."""
  del slots_BTK
  first, local, ep = _local_experts(axes, e)
  b, t, d = x_BTD.shape
  k = experts_BTK.shape[-1]
  if ep > 1 and axes["spread"]:  # the expert group's tokens, in the order psum_scatter returns
    x_BTD, experts_BTK, weights_BTK = (jax.lax.all_gather(a, axes["expert"], axis=0, tiled=True)
                                       for a in (x_BTD, experts_BTK, weights_BTK))
  n = x_BTD.shape[0] * t
  ids_M = experts_BTK.reshape(-1) - first
  mine_M = (ids_M >= 0) & (ids_M < local)
  ids_M = jnp.where(mine_M, ids_M, local)  # others' assignments sort last, in no group
  order_M = jnp.argsort(ids_M, stable=True)
  sizes_E = jnp.bincount(ids_M, length=local + 1)[:local].astype(jnp.int32)
  token_M, sorted_M = order_M // k, ids_M[order_M]
  x_MD = jnp.take(x_BTD.reshape(n, d), token_M, axis=0)

  def matmul(name, h=None):
    y = jax.lax.ragged_dot(x_MD if h is None else h, w[name], sizes_E)
    if name + "_bias" in w:
      y = y + _bias(w, name, axes)[jnp.minimum(sorted_M, local - 1)]
    return y

  gate_M = (weights_BTK.reshape(-1) * mine_M.astype(weights_BTK.dtype))[order_M]
  y_MD = expert_ffn(activation, w, matmul) * gate_M[:, None]
  y_ND = jnp.zeros((n, d), y_MD.dtype).at[token_M].add(y_MD)
  y_BTD = _finish(y_ND.reshape(-1, t, d), axes, ep, scatter_axis=0)
  return y_BTD.reshape(b, t, d)


def _capacity(activation, e, cap, x_BTD, experts_BTK, weights_BTK, slots_BTK, w, *, axes):
  """One-hot dispatch into [E, B, C] slots, the experts batched, one-hot combine (GShard)."""
  first, local, ep = _local_experts(axes, e)
  dt = x_BTD.dtype
  onehot_BTKE = jax.nn.one_hot(experts_BTK, e, dtype=dt)
  onehot_BTKC = jax.nn.one_hot(slots_BTK, cap, dtype=dt)  # slot == cap (dropped): all zero
  dispatch_BTEC = jnp.einsum("btke,btkc->btec", onehot_BTKE, onehot_BTKC)
  combine_BTEC = jnp.einsum("btke,btkc->btec", onehot_BTKE * weights_BTK[..., None],
                            onehot_BTKC)
  x_EBCD = jnp.einsum("btec,btd->ebcd", dispatch_BTEC, x_BTD)
  if axes.get("length"):  # a row's slots are filled from all of its length shards
    x_EBCD = jax.lax.psum(x_EBCD, axes["length"])
  if ep > 1 and axes["spread"]:  # GShard: each device gets its experts' slots of every row
    x_EBCD = jax.lax.all_to_all(x_EBCD, axes["expert"], 0, 1, tiled=True)
  elif ep > 1:
    x_EBCD = jax.lax.dynamic_slice_in_dim(x_EBCD, first, local, axis=0)

  def matmul(name, h=None):
    y = jnp.einsum("ebcd,edf->ebcf", x_EBCD if h is None else h, w[name])
    if name + "_bias" in w:
      y = y + _bias(w, name, axes)[:, None, None, :]
    return y

  y_EBCD = expert_ffn(activation, w, matmul)
  if axes.get("mlp"):
    y_EBCD = jax.lax.psum(y_EBCD, axes["mlp"])
  if ep > 1 and axes["spread"]:
    y_EBCD = jax.lax.all_to_all(y_EBCD, axes["expert"], 1, 0, tiled=True)
  elif ep > 1:  # this device's experts' part of every token's output, summed over the group
    combine_BTEC = jax.lax.dynamic_slice_in_dim(combine_BTEC, first, local, axis=2)
  y_BTD = jnp.einsum("btec,ebcd->btd", combine_BTEC, y_EBCD)
  if ep > 1 and not axes["spread"]:
    y_BTD = jax.lax.psum(y_BTD, axes["expert"])
  return y_BTD
