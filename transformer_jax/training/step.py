"""Train state, loss, and the jitted, sharded train/eval steps."""

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from transformer_jax.data import mixture
from transformer_jax.data import objectives
from transformer_jax.models import attention
from transformer_jax.models import ops
from transformer_jax.models import families
from transformer_jax.models import stack
from transformer_jax.parallel import distributed
from transformer_jax.parallel import sharding
from transformer_jax.perf import compiler
from transformer_jax.training import distill
from transformer_jax.training import optimizer



def aux_kind(key: str) -> str:
  """How an aux metric combines over microbatches and data shards: max, sum or mean."""
  if key == "moe_expert_load" or key.startswith("act_max"):
    return "max"
  return "sum" if key in ("extra_loss", "cross_entropy", "distill_kl",
                          "distill_hidden_mse") else "mean"


AUX_REDUCE = {"max": jnp.max, "sum": jnp.sum, "mean": jnp.mean}  # over the microbatches


def _runs_cudnn(cfg, platform: str) -> bool:
  """Whether a model's attention may run jax's cuDNN kernel on `platform`."""
  impl = attention.KERNELS.get(platform) if cfg.attention_impl == "auto" else cfg.attention_impl
  return impl == "cudnn" and jnp.dtype(cfg.compute_dtype).itemsize == 2


def _split(batch, m: int):
  """[rows, ...] -> [m, rows / m, ...], row r in microbatch r % m (each device keeps its rows)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1),
                      batch)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  loss_mean: jax.Array  # running mean of the loss over applied steps (the spike reference)
  skipped: jax.Array  # steps whose update was not applied (anomalies), over the whole run

  @classmethod
  def create(cls, params, opt_state):
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
               loss_mean=jnp.zeros((), jnp.float32), skipped=jnp.zeros((), jnp.int32))


LOSS_MEAN_DECAY = 0.99


def loss_sums(model, params, batch, **kwargs):
  """Sum of token cross-entropies (fp32) and of target weights over one batch (`loss_parts`)."""
  loss, weight, _ = loss_parts(model, params, batch, **kwargs)
  return loss, weight


def loss_parts(model, params, batch, *, task=objectives.Loss(), z_loss=0.0, label_smoothing=0.0,
               dropout_rng=None, chunk=0, teacher=None, activations=False, totals=None):
  """(Sum of token cross-entropies (fp32), sum of target weights, sums for metrics) over one
  batch. `task` (the objective's `loss`) names the batch keys the model also takes (a prefix
  LM's prefix, BERT's token types) and whether a sentence-pair head adds its mean pair loss,
  weighted like the mean token loss, reporting sentence_nll, sentence_correct and sentence_pairs
  (sums over the pairs). With label smoothing e the target distribution is (1 - e) one-hot + e
  uniform over the vocabulary. `chunk` > 0 forms the [tokens, vocab] logits `chunk` tokens at a
  time (chunked_loss_sum). Training-only terms: an MoE model's weighted router losses
  (moe_sums), added like the sentence loss, and with a `teacher` (training/distill.py) the
  distillation objective in place of the usual loss (its KL sum as distill_kl; matched hidden
  states' mean squared error as distill_hidden_mse);
  aux["extra_loss"] is what they add (metrics report the loss without it). Where the loss is
  more than the tokens' cross-entropy (label smoothing, z-loss, a sentence head) aux
  ["cross_entropy"] is their plain cross-entropy sum (eval_loss's kind). `activations`
  (train.log_activations) adds each layer's output RMS and max |x| (stack.activation_metrics).
  `totals` (batch_totals of the whole step's batch, when `batch` is one of its microbatches)
  normalise the batch-mean terms (sentence pairs, hidden states) by the step's counts, so that
  the microbatches' sums add up to the whole batch's loss.
  """
  extra = {keyword: batch[key] for key, keyword in task.inputs}
  sentence, moe = task.sentence, model.cfg.num_experts > 0
  hidden = teacher is not None and teacher.hidden_weight > 0  # distill hidden states
  inputs = [batch[k] for k in type(model).INPUTS]
  mutable = ["moe"] * moe + [stack.ACTIVATIONS] * activations + [stack.INTERMEDIATES] * hidden
  out = model.apply({"params": params}, *inputs, **extra,
                    deterministic=dropout_rng is None, hidden=chunk > 0 or sentence,
                    rngs={"dropout": dropout_rng} if dropout_rng is not None else None,
                    mutable=mutable or False)
  out, sown = out if mutable else (out, {})
  moe = bool(sown.get("moe"))  # False when no layer is MoE (e.g. moe_every > num_layers)
  targets_key, weights_key = type(model).TARGETS
  w_BT = batch[weights_key].astype(jnp.float32)
  if chunk:
    loss, cross_entropy = chunked_loss_sum(model, params, out, batch[targets_key], w_BT, chunk,
                                           z_loss, label_smoothing)
  else:
    logits = model.apply({"params": params}, out, method="logits") if sentence else out
    loss_BT, ce_BT = token_loss(logits, batch[targets_key], z_loss, label_smoothing,
                                model.cfg.output_vocab)
    loss, cross_entropy = jnp.sum(loss_BT * w_BT), jnp.sum(ce_BT * w_BT)
  aux = {}
  weight = jnp.sum(w_BT) if totals is None else totals["weights"]
  if sentence:  # + the mean sentence-pair loss, weighted like the mean token loss
    aux = sentence_sums(model, params, out, batch)
    pairs = aux["sentence_pairs"] if totals is None else totals["pairs"]
    aux["sentence_term"] = aux["sentence_nll"] / jnp.maximum(pairs, 1.0) * weight
    loss = loss + aux["sentence_term"]
  if z_loss or label_smoothing or sentence:
    aux["cross_entropy"] = cross_entropy
  base = loss
  if teacher is not None:
    student = (sown[stack.INTERMEDIATES], params[distill.PROJECTION]["kernel"],
               batch) if hidden else None
    # the z-loss and a sentence-pair head's loss (no teacher gives it a soft target: at alpha
    # 0 the head never trained) at their full weight, not train.distill's alpha's share
    kept = (z_loss * jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)) * w_BT)
            if z_loss else 0.0) + aux.get("sentence_term", 0.0)
    loss, terms = distill.loss_terms(teacher, inputs, extra, logits, loss - kept, w_BT,
                                     hidden=student, totals=totals)
    loss = loss + kept
    aux.update(terms)
  if moe:
    c = model.cfg
    aux.update(moe_sums(sown["moe"]))
    loss = loss + (c.router_aux_loss * aux["moe_aux_loss"]
                   + c.router_z_loss * aux["moe_z_loss"]) * jnp.sum(w_BT)
  if teacher is not None or moe:
    aux["extra_loss"] = loss - base
  if activations:
    aux.update(stack.activation_metrics(sown[stack.ACTIVATIONS]))
  return loss, jnp.sum(w_BT), aux


def batch_totals(model, batch) -> dict:
  """The counts a step's batch-mean terms divide by: target weights, sentence pairs and each
  stack's non-padding tokens (distill.token_counts)."""
  out = {"weights": jnp.sum(batch[type(model).TARGETS[1]].astype(jnp.float32)),
         "tokens": distill.token_counts(batch)}
  if "sentence_weights" in batch:
    out["pairs"] = jnp.sum(batch["sentence_weights"].astype(jnp.float32))
  return out


def mixture_tokens(batch, num_sources: int):
  """float32 [num_sources]: the batch's non-padding tokens (every feature with segment ids, e.g.
  an encoder-decoder's encoder and decoder tokens) per source of a data.mixture."""
  tokens_B = sum(jnp.sum(v != 0, axis=-1) for k, v in batch.items() if k.endswith("segment_ids"))
  onehot_BK = jax.nn.one_hot(batch[mixture.SOURCE_KEY][:, 0], num_sources, dtype=jnp.float32)
  return jnp.sum(onehot_BK * tokens_B[:, None].astype(jnp.float32), axis=0)


def moe_sums(sown) -> dict:
  """The MoE layers' sown router statistics (models/moe.py) of one batch: moe_aux_loss,
  moe_z_loss and moe_dropped_fraction (means over the layers), moe_expert_load (the largest
  max/mean tokens per expert of any layer), and moe_batches = 1 (sums of these over batches
  divided by it are their means)."""
  by_name = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(sown):
    name = next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))
    by_name.setdefault(name, []).append(jnp.ravel(leaf))
  values = {k: jnp.concatenate(v) for k, v in by_name.items()}
  return {"moe_aux_loss": jnp.mean(values["aux_loss"]), "moe_z_loss": jnp.mean(values["z_loss"]),
          "moe_dropped_fraction": jnp.mean(values["dropped"]),
          "moe_expert_load": jnp.max(values["load"]), "moe_batches": jnp.ones((), jnp.float32)}


def sentence_sums(model, params, x_BTD, batch) -> dict:
  """The sentence-pair head (NSP / SOP) over the pairs of a batch (their [CLS] positions):
  sums of cross-entropy, of correct argmax predictions, and of pair weights."""
  logits_BTC = model.apply({"params": params}, x_BTD, method="sentence_logits")
  log_p_BTC = jax.nn.log_softmax(logits_BTC)
  labels_BT = batch["sentence_labels"]
  w_BT = batch["sentence_weights"].astype(jnp.float32)
  nll_BT = -jnp.take_along_axis(log_p_BTC, labels_BT[..., None], axis=-1)[..., 0]
  correct_BT = (jnp.argmax(logits_BTC, axis=-1) == labels_BT).astype(jnp.float32)
  return {"sentence_nll": jnp.sum(nll_BT * w_BT), "sentence_correct": jnp.sum(correct_BT * w_BT),
          "sentence_pairs": jnp.sum(w_BT)}


def token_loss(logits_BTV, targets_BT, z_loss, label_smoothing, vocab=0):
  """(The per-token loss: cross-entropy with label smoothing spread over the first `vocab` ids
  (the model's output_vocab; 0 = all), + z_loss * logZ^2 at its full weight; the plain
  cross-entropy), fp32 [B, T] each."""
  ce_BT, log_z_BT = ops.cross_entropy(logits_BTV, targets_BT)
  token_loss_BT = ce_BT
  if label_smoothing:
    mean_BT = jnp.mean(logits_BTV[..., :vocab or logits_BTV.shape[-1]], axis=-1)
    token_loss_BT = ((1 - label_smoothing) * ce_BT + label_smoothing * (log_z_BT - mean_BT))
  if z_loss:
    token_loss_BT = token_loss_BT + z_loss * jnp.square(log_z_BT)
  return token_loss_BT, ce_BT


def chunked_loss_sum(model, params, x_BTD, targets_BT, w_BT, chunk, z_loss, label_smoothing):
  """sum(w * token_loss)s (the loss, the cross-entropy) from the final hidden states, with the
  model's head applied to `chunk`
  tokens at a time in a scan, so no more than [chunk, V] logits exist at once. The B*T tokens are
  padded with weight-0 tokens to n * chunk and token i goes to chunk i % n: a chunk is strided
  over the whole batch, so it stays spread over the batch shards (as microbatches are). Each
  chunk's body is rematerialized: the backward recomputes its logits instead of keeping them."""
  b, t = targets_BT.shape
  chunk = min(chunk, b * t)
  n = -(-b * t // chunk)

  def split(a_BT):  # [B, T, ...] -> [n, chunk, 1, ...]: chunk k holds tokens k, k + n, ...
    a = a_BT.reshape(b * t, *a_BT.shape[2:])
    a = jnp.pad(a, [(0, n * chunk - b * t)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape(chunk, n, 1, *a.shape[1:]).swapaxes(0, 1)

  @jax.checkpoint
  def body(totals, xs):
    x_C1D, targets_C1, w_C1 = xs
    x_C1D = nn.with_logical_constraint(x_C1D, ("act_batch", None, "act_embed"))
    logits_C1V = model.apply({"params": params}, x_C1D, method="logits")
    losses = token_loss(logits_C1V, targets_C1, z_loss, label_smoothing, model.cfg.output_vocab)
    return tuple(t + jnp.sum(l_C1 * w_C1) for t, l_C1 in zip(totals, losses)), None

  zero = jnp.zeros((), jnp.float32)
  totals, _ = jax.lax.scan(body, (zero, zero), (split(x_BTD), split(targets_BT), split(w_BT)))
  return totals


@dataclasses.dataclass
class Trainer:
  """Everything one run compiles: model, optimizer, shardings and the jitted steps."""
  config: Any
  mesh: jax.sharding.Mesh
  model: nn.Module = None
  tx: optax.GradientTransformation = None
  lr_schedule: Callable = None
  rules: tuple = ()
  state_shardings: Any = None
  abstract_state: Any = None
  batch_sharding: Any = None
  teacher: distill.Teacher | None = None  # train.distill's frozen teacher, on this mesh
  workdir: str = ""  # the run's: a resumed distillation reads the teacher step it started from
  microbatch_search_s: float = 0.0  # train.microbatches=0: seconds training/fit.py compiled
  microbatches_chosen: bool = False  # ... and whether it has chosen

  def __post_init__(self):
    c = self.config
    self.objective = objectives.check(c, self.mesh.shape.get("sequence", 1))  # its Spec
    self.task = objectives.loss(self.objective)
    self.batch_keys = tuple(objectives.batch_spec(self.objective, 1))  # put_batch's, every step
    self.mixture_size = len(c.data.mixture)  # a mixture's batches add their rows' source
    if self.mixture_size:
      self.batch_keys += (mixture.SOURCE_KEY,)
    self.model = families.build_model(c)
    self.tx, self.lr_schedule = optimizer.make(c.optimizer, c.train.steps)
    self.rules = sharding.rules(c, self.mesh)
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    self._row_groups = None
    self.teacher = distill.load(c, self.mesh, self.rules, self.workdir)
    boxed = jax.eval_shape(self._init_boxed, jax.random.key(0))
    self.state_shardings = sharding.shardings(boxed, self.mesh, self.rules)
    sharding.check_divisible(boxed.params, self.state_shardings.params, self.mesh,
                             c.model.vocab_size)
    self._stacked = jax.tree.map(  # a scanned stack's parameters: [layers, ...]
        lambda spec: len(spec) > 0 and spec[0] == "layers", nn.get_partition_spec(boxed.params),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    self.abstract_state = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        nn.unbox(boxed), self.state_shardings)
    self._init = jax.jit(lambda rng: nn.unbox(self._init_boxed(rng)),
                         out_shardings=self.state_shardings)
    self.compiler_options = compiler.options(c, self.mesh.devices.flat[0].platform)
    # train.microbatches=0 (auto) runs 1 until training/fit.py chooses (use_microbatches)
    self.use_microbatches(c.train.microbatches or 1)

  def use_microbatches(self, m: int):
    """The train and eval steps (jitted anew) split each batch into `m` microbatches."""
    self.microbatches = m
    # Gradient accumulation sums each data shard's microbatches on the shard and all-reduces
    # once, where the loss is a sum over rows: not an MoE's (its balance losses are batch
    # statistics), a sentence head's or hidden-state distillation's (means per microbatch); and
    # not through cuDNN attention (jax's batching rule for it wants a bias per head).
    platform = self.mesh.devices.flat[0].platform
    models = [self.model] + ([self.teacher.model] if self.teacher is not None else [])
    self._defer_data_reduce = (
        m > 1 and not any(mod.cfg.num_experts for mod in models)
        and not self.task.sentence
        and not (self.teacher is not None and self.teacher.hidden_weight > 0)
        and not any(_runs_cudnn(mod.cfg, platform) for mod in models)
        and sharding.rows_own_data_axis(self.mesh, self.batch_sharding,
                                        self.state_shardings.params, self._teacher_params()))
    self._train = jax.jit(self._train_step,
                          in_shardings=(self.state_shardings, None, None, None),
                          out_shardings=(self.state_shardings, None), donate_argnums=(0,),
                          compiler_options=self.compiler_options)
    self._eval = jax.jit(self._eval_step, in_shardings=(self.state_shardings.params, None),
                         compiler_options=self.compiler_options)

  # ---- pure functions (traced once)
  def _init_boxed(self, rng):
    seq = min(self.config.data.seq_len, 8)
    params = self.model.init(rng, *families.init_inputs(self.model, seq))["params"]
    params = distill.with_projection(params, self.teacher, self.model.cfg.d_model)
    opt_state = self.tx.init(params)
    return TrainState.create(params, opt_state)

  def _train_step(self, state, batch, rng, teacher_params):
    c = self.config
    if self.microbatches == 1:
      loss, weight, grads, moe = self._micro_grads(state.params, batch, 0, rng, state.step,
                                                   teacher_params)
    elif self._defer_data_reduce:  # each data shard sums its own microbatches, then one psum
      loss, weight, grads, moe = self._accumulate_shards(state.params, batch, rng, state.step,
                                                         teacher_params)
    else:
      loss, weight, grads, moe = self._accumulate(state.params, batch, rng, state.step,
                                                  teacher_params)
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
    loss, grad_norm = loss / denom, optax.tree.norm(grads)
    # The logged loss is the usual one (comparable to a dense, undistilled model's); the router
    # and distillation terms have their own metrics.
    token_loss_mean = loss - (moe.pop("extra_loss") / denom if "extra_loss" in moe else 0.0)
    for key in ("distill_kl", "cross_entropy"):
      if key in moe:
        moe[key] = moe[key] / denom
    # Anomaly guard, on device: the update is applied only to a finite loss and gradient that is
    # not a spike, so a bad batch never reaches the parameters or the optimizer moments.
    nonfinite = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    # The running mean starts at the first applied step's loss (0: none yet, as after a
    # non-finite first step or a rollback to the initial state); no spike is judged before it.
    seeded = state.loss_mean > 0
    spike = ((c.train.spike_factor > 0) & (state.step >= c.train.spike_warmup_steps) & seeded
             & (loss > c.train.spike_factor * state.loss_mean))
    bad = nonfinite | spike

    def apply(_):
      with jax.named_scope("optimizer"):  # how perf/profile.py tells the update's ops
        updates, opt_state = self.tx.update(
            grads, optimizer.at_step(state.opt_state, state.step), state.params)
        mean = jnp.where(seeded, LOSS_MEAN_DECAY * state.loss_mean + (1 - LOSS_MEAN_DECAY) * loss,
                         loss)
        return optax.apply_updates(state.params, updates), opt_state, mean

    params, opt_state, loss_mean = jax.lax.cond(
        bad, lambda _: (state.params, state.opt_state, state.loss_mean), apply, None)
    metrics = {"loss": token_loss_mean, "grad_norm": grad_norm,
               "param_norm": optax.tree.norm(params),
               "learning_rate": self.lr_schedule(state.step), "tokens": weight,
               "nonfinite": nonfinite, "spike": spike,
               **{k: v for k, v in moe.items() if k != "moe_batches"}}
    if mixture.SOURCE_KEY in batch:
      metrics["mixture_tokens"] = mixture_tokens(batch, self.mixture_size)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      loss_mean=loss_mean, skipped=state.skipped + bad), metrics

  def _micro_grads(self, params, micro, i, rng, step, teacher_params, shard=None, totals=None):
    """(loss sum, target weight, gradients, aux metrics) of one microbatch; `shard`: the data
    shard's index when each shard runs its own rows (its dropout then differs from the others');
    `totals`: the whole step's batch_totals."""
    c = self.config
    teacher = (dataclasses.replace(self.teacher, params=teacher_params)
               if self.teacher is not None else None)
    drng = None
    if c.model.dropout_rate > 0 or c.model.router_jitter > 0:
      drng = jax.random.fold_in(jax.random.fold_in(rng, step), i)
      drng = drng if shard is None else jax.random.fold_in(drng, shard)

    chunk = c.train.loss_chunk  # in tokens of the whole microbatch: a data shard's share of them
    chunk = -(-chunk // self.mesh.shape[sharding.DATA]) if shard is not None else chunk

    def f(p):
      loss, weight, aux = loss_parts(self.model, p, micro, task=self.task, z_loss=c.train.z_loss,
                                     label_smoothing=c.train.label_smoothing, dropout_rng=drng,
                                     chunk=chunk, teacher=teacher,
                                     activations=c.train.log_activations, totals=totals)
      return loss, (weight, {k: v for k, v in aux.items()
                             if k.startswith(("moe_", "distill_", "act_"))
                             or k in ("extra_loss", "cross_entropy")})
    (loss, (weight, aux)), grads = jax.value_and_grad(f, has_aux=True)(params)
    return loss, weight, grads, aux

  def _accumulate(self, params, batch, rng, step, teacher_params, shard=None):
    """_micro_grads summed over the microbatches (row r of `batch` in microbatch r % m: every
    device keeps its own rows, no resharding); aux metrics: max, sum or mean over them."""
    m = self.microbatches
    totals = batch_totals(self.model, batch)  # of this shard's rows, per shard (sums over rows)
    micro = _split(batch, m)

    def body(carry, xs):
      loss, weight, grads = carry
      mb, i = xs
      l, w, g, aux = self._micro_grads(params, mb, i, rng, step, teacher_params, shard, totals)
      return (loss + l, weight + w,
              jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)), aux

    # fp32 sums whatever the parameters' dtype (bf16 partial sums lose the small microbatches)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss, weight, grads), aux = jax.lax.scan(body, (0.0, 0.0, zeros), (micro, jnp.arange(m)))
    return loss, weight, grads, {k: AUX_REDUCE[aux_kind(k)](v) for k, v in aux.items()}

  def _accumulate_shards(self, params, batch, rng, step, teacher_params):
    """_accumulate by each data shard on its own rows (vmapped over mesh axis data), then the
    shards' sums added up: one gradient all-reduce over data per step, not one per microbatch."""
    d = self.mesh.shape[sharding.DATA]
    shards = jax.tree.map(lambda x: x.reshape(d, x.shape[0] // d, *x.shape[1:]), batch)
    per_shard = jax.vmap(
        lambda b, i: self._accumulate(params, b, rng, step, teacher_params, i),
        spmd_axis_name=sharding.DATA)
    with nn.logical_axis_rules(sharding.without_axis(self.rules, sharding.DATA)):
      loss, weight, grads, aux = per_shard(shards, jnp.arange(d))
    total = lambda x: jnp.sum(x, axis=0)

    def layer_by_layer(g, stacked):  # a loop: each trip's all-reduce reuses one layer's buffers
      return jax.lax.map(total, jnp.swapaxes(g, 0, 1)) if stacked else total(g)
    return (total(loss), total(weight), jax.tree.map(layer_by_layer, grads, self._stacked),
            {k: AUX_REDUCE[aux_kind(k)](v) for k, v in aux.items()})

  def _eval_step(self, params, batch):
    """The batch's sums (evaluate adds them up), a microbatch at a time as the train step goes
    (its rows' activations and logits would need the memory the microbatches save)."""
    def sums(rows):
      loss, weight, aux = loss_parts(self.model, params, rows, task=self.task,
                                     chunk=self.config.train.loss_chunk)
      # eval_loss: the tokens' cross-entropy alone (the pair loss is eval_sentence_loss)
      loss = loss - aux.pop("extra_loss", 0.0) - aux.pop("sentence_term", 0.0)
      aux.pop("cross_entropy", None)  # (= loss here: eval adds no smoothing or z-loss)
      return {"loss": loss, "weight": weight, **aux}
    if self.microbatches == 1:
      return sums(batch)
    parts = jax.lax.map(sums, _split(batch, self.microbatches))
    # An MoE's statistics are the batch's as training takes them over its microbatches (max
    # or mean: moe_batches stays 1); the rest are sums.
    return {k: AUX_REDUCE[aux_kind(k)](v, axis=0) if k.startswith("moe_") else jnp.sum(v, axis=0)
            for k, v in parts.items()}

  # ---- host-side API
  def init_state(self, seed: int) -> TrainState:
    with sharding.context(self.mesh, self.rules):
      return self._init(jax.random.key(seed))

  def put_batch(self, local_batch):
    """Process-local numpy rows (whole rows: a sequence axis across hosts slices them here) ->
    one global array per key, rows sharded over the batch axes, tokens over the sequence axis."""
    if self._row_groups is None:  # how many processes' row ranges make up a global batch
      spans = distributed.batch_rows(self.batch_sharding, self.config.train.batch_size,
                                     self.config.data.seq_len)
      self._row_groups = len(set(spans.values()))
    return {k: jax.make_array_from_process_local_data(
                self.batch_sharding, local_batch[k],
                (len(local_batch[k]) * self._row_groups,) + local_batch[k].shape[1:])
            for k in self.batch_keys if k in local_batch}  # eval batches have no source

  def train_step(self, state, batch, rng):
    with sharding.context(self.mesh, self.rules):
      return self._train(state, batch, rng, self._teacher_params())

  def _teacher_params(self):
    return self.teacher.params if self.teacher is not None else None

  def evaluate(self, params, batches) -> dict:
    """eval_loss (mean per target token) over `batches` and eval_tokens (how many); with a
    sentence head also eval_sentence_loss and eval_sentence_accuracy (means over the pairs).
    No target token at all (no validation data) gives {}: a loss of nothing is no figure."""
    sums = {}
    with sharding.context(self.mesh, self.rules):
      for b in batches:
        for k, v in self._eval(params, self.put_batch(b)).items():
          sums[k] = sums.get(k, 0.0) + float(v)
    if not sums.get("weight"):
      return {}
    out = {"eval_loss": sums["loss"] / sums["weight"], "eval_tokens": sums["weight"]}
    if "moe_batches" in sums:  # means over the batches (moe_sums)
      out.update({"eval_" + k: v / sums["moe_batches"] for k, v in sums.items()
                  if k.startswith("moe_") and k != "moe_batches"})
    if "sentence_pairs" in sums:
      pairs = max(sums["sentence_pairs"], 1.0)
      out.update(eval_sentence_loss=sums["sentence_nll"] / pairs,
                 eval_sentence_accuracy=sums["sentence_correct"] / pairs)
    return out

  def abstract_batch(self) -> dict:
    """A training batch's keys, shapes and dtypes, sharded as put_batch shards them (a
    mixture's source index too: its rows' longest feature's length, mixture.tag)."""
    spec = objectives.batch_spec(self.objective, self.config.train.batch_size)
    if self.mixture_size:
      rows = self.config.train.batch_size
      spec[mixture.SOURCE_KEY] = ((rows, max(s[1] for s, _ in spec.values())), jnp.int32)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
            for k, (shape, dtype) in spec.items()}

  def lower_eval_step(self):
    """The evaluation step lowered as lower_train_step (a validation batch has no source)."""
    batch = {k: v for k, v in self.abstract_batch().items() if k != mixture.SOURCE_KEY}
    with sharding.context(self.mesh, self.rules):
      return self._eval.lower(self.abstract_state.params, batch)

  def lower_train_step(self):
    """The train step lowered for this mesh with abstract inputs (for AOT analysis, and
    training/fit.py, whose compile the first step then reuses: the same inputs)."""
    batch = self.abstract_batch()
    rng = jax.eval_shape(lambda: jax.random.key(0))  # abstract: the devices may be compile-only
    with sharding.context(self.mesh, self.rules):
      teacher = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                             self._teacher_params())
      return self._train.lower(self.abstract_state, batch, rng, teacher)
