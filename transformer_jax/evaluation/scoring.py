"""A model as a text scorer: log-likelihoods of (context, continuation) pairs, rolling
log-likelihoods of documents, and greedy generation (lm-eval's three requests), batched and jitted.

Requests are sorted by length and scored `batch_size` rows at a time, each batch padded to a
bucket length (powers of two from 16 up to the model's length), so a task compiles a few shapes.
Padding tokens get segment id 0 and the real tokens of a row segment 1 with positions 0..n-1, so
(as in packed training) a row's score does not depend on its padding side or its batch mates.
With a mesh the batch is sharded over its batch axes and the model traced under its rules, like
the train step: parameters stay sharded as they were restored.
"""

import contextlib
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import ConfigError
from transformer_jax.data import objectives
from transformer_jax.inference import sampling
from transformer_jax.models import families
from transformer_jax.parallel import distributed
from transformer_jax.parallel import sharding

MIN_BUCKET = 16


def bucket(n: int, limit: int, multiple: int = 1) -> int:
  """The padded length of a batch whose longest row is n: a power of two >= 16, <= limit,
  rounded up to a `multiple` (sharding.length_multiple: a sequence-sharded batch's; the
  padding past limit is position 0, read by no row)."""
  return sharding.round_up(min(max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()), limit), multiple)


@functools.partial(jax.jit, static_argnames="model")
def _row_scores(model, params, inputs, at_BK, targets_BK, weights_BK, prefix_BT=None):
  """Per row: sum of the weighted targets' log-probabilities, and whether each weighted target
  is the argmax (greedy decoding would write the continuation). Only the K scored positions
  `at_BK` of the final hidden states go through the output head: [B, K, V] logits, not
  [B, T, V]. `prefix_BT`: a prefix LM's prefix (the contexts)."""
  extra = {} if prefix_BT is None else {"prefix_BT": prefix_BT}
  x_BTD = model.apply({"params": params}, *inputs, hidden=True, **extra)
  x_BKD = jnp.take_along_axis(x_BTD, at_BK[..., None], axis=1)
  logits_BKV = model.apply({"params": params}, x_BKD, method="logits").astype(jnp.float32)
  log_p_BKV = jax.nn.log_softmax(logits_BKV)
  token_BK = jnp.take_along_axis(log_p_BKV, targets_BK[..., None], axis=-1)[..., 0]
  hit_BK = (jnp.argmax(logits_BKV, axis=-1) == targets_BK) | (weights_BK == 0)
  return jnp.sum(token_BK * weights_BK, axis=-1), jnp.all(hit_BK, axis=-1)


class TextModel:
  """A decoder or encoder-decoder, its parameters and tokenizer, scoring text."""

  def __init__(self, config, params, tokenizer, *, batch_size: int = 8, mesh=None, rules=(),
               padding: str = "right", model=None):
    """`model` (default: the config's) may be given, e.g. one imported by convert.hf.from_hf;
    the config then supplies model.family, model.max_len and data's add_bos/add_eos."""
    if config.model.family not in ("decoder", "encdec"):
      raise ConfigError(f"evaluation scores decoders and encoder-decoders, not model.family="
                        f"{config.model.family}")
    self.config, self.params, self.tokenizer = config, params, tokenizer
    self.model = families.for_inference(model if model is not None
                                        else families.build_model(config))
    self.is_seq2seq = config.model.family == "encdec"
    # a prefix LM reads a context as its prefix, both ways, as it was trained
    self.prefix_lm = not self.is_seq2seq and objectives.flag(config.data, "PREFIX")
    self.max_len = int(config.model.max_len)
    self.batch_size, self.padding = batch_size, padding
    self._noted_room = False  # generate's note that max_len cut max_new_tokens (said once)
    self.mesh, self.rules = mesh, rules
    self._batch_sharding = sharding.batch_sharding(mesh, rules) if mesh is not None else None
    self.multiple = sharding.length_multiple(mesh, rules) if mesh is not None else 1
    self.add_bos = bool(config.data.add_bos)
    self.prefix_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id
    # T5's span corruption taught the model to fill masked spans: a continuation is asked for
    # as the first span, the source ending with <extra_id_0> (before its eos) and the target led
    # by it (given, not scored), as every span was framed in training
    as_span = self.is_seq2seq and objectives.flag(config.data, "CONTINUATION_AS_SPAN")
    self.target_head = list(tokenizer.sentinel_ids[:1]) if as_span else []
    # BART's denoise rebuilt its whole source (targets: the original chunk): the decoder is
    # given the context, as its source's text, before the continuation; with infilling the
    # source ends with a [MASK] (text was taken from there)
    self.rebuilds_source = self.is_seq2seq and objectives.flag(config.data, "REBUILDS_SOURCE")
    self.source_tail = (objectives.get(config.data.objective).source_tail(config.data, tokenizer)
                        if self.rebuilds_source else self.target_head)
    # a document objective's targets are running text (span, UL2, BART's infilling: a word
    # keeps its space): a context and continuation are split as one text, as a decoder's are; a
    # (source, target) pair's target is a text of its own
    self.continues_source = self.is_seq2seq and not objectives.flag(config.data, "PAIRS")

  # ---- text -> ids
  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text)

  def context_ids(self, ids: list[int]) -> list[int]:
    """A decoder's context as training framed it (bos first), never empty."""
    if self.add_bos or not ids:
      return [self.prefix_id] + ids
    return ids

  def source_ids(self, text, head: list[int] = ()) -> list[int]:
    """An encoder-decoder's source as training framed it (bos/eos around pairs' sources, UL2's
    mode token first), with the ids `head` (target_head) after the text (or its ids); a text
    too long for the model loses its start, the framing none of its tokens."""
    ids = self.encode(text) if isinstance(text, str) else list(text)
    return objectives.source_ids(self.config.data, self.tokenizer, ids + list(head),
                                 max_len=self.max_len)

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval splits them: the context's trailing spaces
    move to the continuation, the pair is encoded whole and the continuation is what follows
    the context's own encoding (also where a token of the whole spans the boundary: the
    continuation then starts after as many of its tokens as the context has); none left, the
    continuation's own."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = self.encode(context + continuation), self.encode(context)
    return ctx, whole[len(ctx):] or self.encode(continuation)

  def request(self, ctx: list[int], room: int) -> tuple[list[int], list[int]]:
    """A document-trained encoder-decoder's (source, decoder head) for context ids `ctx`: the
    source as training framed it, ending with source_tail; the head (given to the decoder after
    its start token) is target_head, or where the objective rebuilds its source, the source less
    its tail, the context losing its start so that `room` decoder positions follow the head."""
    if not self.rebuilds_source:
      return self.source_ids(ctx, self.source_tail), list(self.target_head)
    tail = self.source_tail
    src = objectives.source_ids(self.config.data, self.tokenizer, ctx + tail,
                                max_len=max(self.max_len - room, 1) + len(tail))
    return src, src[:len(src) - len(tail)]

  # ---- requests
  def loglikelihood(self, pairs) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) of each (context, continuation) string pair."""
    ids = []
    for context, continuation in pairs:
      if self.continues_source:  # the context is the source, the continuation the target
        ctx, cont = self.encode_pair(context, continuation)
        ids.append((*self.request(ctx, len(cont)), cont))
      elif self.is_seq2seq:
        ids.append((self.source_ids(context), self.encode(continuation.lstrip())))
      else:
        ctx, cont = self.encode_pair(context, continuation)
        ids.append((self.context_ids(ctx), cont))
    return self.ids_loglikelihood(ids)

  def loglikelihood_rolling(self, texts, with_counts: bool = False):
    """Each text's log-likelihood from its first token on (after the prefix token), in windows
    of the model's length; with `with_counts` (log-likelihood, tokens scored) pairs."""
    if self.is_seq2seq:
      raise ConfigError("rolling log-likelihood (perplexity tasks) needs a decoder")
    pairs, owners = [], []
    for i, text in enumerate(texts):
      for pair in self.rolling_windows(self.encode(text)):
        pairs.append(pair)
        owners.append(i)
    out = [[0.0, 0] for _ in texts]
    for i, (ctx, cont), (ll, _) in zip(owners, pairs, self.ids_loglikelihood(pairs)):
      out[i][0] += ll
      out[i][1] += len(cont)
    return [tuple(o) if with_counts else o[0] for o in out]

  def rolling_windows(self, ids: list[int]) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) id pairs that predict every token of `ids` once: continuations
    of the model's length, each window filled with as much preceding context as fits."""
    full, n, length = [self.prefix_id] + ids, len(ids), self.max_len
    windows = []
    for a in range(0, n, length):
      b = min(a + length, n)
      start = max(0, b - length)
      windows.append((full[start:a + 1], full[a + 1:b + 1]))
    return windows

  def ids_loglikelihood(self, pairs) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of (context ids, continuation ids) pairs, batched by length; an
    encoder-decoder's may be (source, decoder head, continuation) triples (request())."""
    if not pairs:
      return []
    rows = self.rows(pairs)
    order = sorted(range(len(rows)), key=lambda i: -sum(map(len, rows[i])))
    out = [None] * len(rows)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      batch = self._seq2seq_batch if self.is_seq2seq else self._decoder_batch
      inputs, scored = batch([rows[i] for i in chunk])
      prefix = self._prefix([rows[i] for i in chunk], inputs[0].shape[1])
      with self._context():
        ll, greedy = _row_scores(self.model, self.params, tuple(map(self._put, inputs)),
                                 *map(self._put, scored), prefix_BT=prefix)
      ll, greedy = distributed.fetch(ll), distributed.fetch(greedy)  # (rows across hosts)
      for j, i in enumerate(chunk):
        out[i] = (float(ll[j]), bool(greedy[j]))
    return out

  def rows(self, pairs) -> list[tuple[list[int], ...]]:
    """The (context, continuation) ids the model reads for each pair, an encoder-decoder's
    (source, decoder head, continuation), or a one-line error for one it cannot score."""
    empty = next((i for i, pair in enumerate(pairs) if not pair[-1]), None)
    if empty is not None:  # log p 0: above every real continuation
      raise _refused(empty, "a continuation with no tokens cannot be scored (an empty answer, or "
                     "for an encoder-decoder one of spaces only, which its target drops)")
    if self.is_seq2seq:
      pairs = [(p[0], self.target_head, p[1]) if len(p) == 2 else p for p in pairs]
    rows = []
    for i, pair in enumerate(pairs):
      try:
        rows.append(self._truncate(*pair))
      except ConfigError as e:
        raise _refused(i, str(e)) from None
    return rows

  def generate(self, prompts, *, until=(), max_new_tokens: int = 32, **sample) -> list[str]:
    """Continuations of prompt strings, cut at the first of `until` (and at eos): greedy, or
    drawn with `sample` (generate_ids' temperature, top_k, top_p, seed). A `max_new_tokens`
    that model.max_len cannot hold after a prompt (kept to at most half of it) is cut for that
    prompt, with a note: each prompt's answer is the one it gets alone (where positions past
    max_len can be read, a bucket's rows are generated together and each cut to its room; else
    a program each room)."""
    tok = self.tokenizer
    # (a prompt's trailing space moves into what is generated, as a context's does when scored:
    # training never put a lone space before a sentinel or eos)
    strip = str.rstrip if self.continues_source else str
    if self.is_seq2seq:  # (the decoder is given its start token and head: forced, not generated)
      reserve = len(self.request([], 0)[1]) + self.rebuilds_source  # the decoder head's framing
      n = max(min(max_new_tokens, self.max_len - 1 - reserve), 1)
      budgets = [n] * len(prompts)
      requests = [self.request(self.encode(strip(p)), n + 1)
                  if self.continues_source else (self.source_ids(p), []) for p in prompts]
    else:  # a decoder's prompt keeps up to half the model: an answer longer than the model
      # leaves room for (lm-eval's default max_gen_toks is 256) read the last token of its
      # prompt alone
      contexts = [self.context_ids(self.encode(p)) for p in prompts]
      budgets = [max(min(max_new_tokens, self.max_len - min(len(c), self.max_len // 2)), 1)
                 for c in contexts]
      requests = [(c[-(self.max_len - n):], None) for c, n in zip(contexts, budgets)]
    if min(budgets, default=max_new_tokens) < max_new_tokens and not self._noted_room:
      self._noted_room = True
      print(f"note: generating at most {min(budgets)} tokens, not {max_new_tokens}: "
            f"model.max_len={self.max_len} holds the prompt too", file=sys.stderr)
    rows, groups = [None] * len(prompts), {}
    free = not self.is_seq2seq and sampling.reads_past_max_len(self.model.cfg, self.prefix_lm)
    for i, n in enumerate(budgets):  # (one program a bucket: as many new tokens as the most
      # any prompt gets, each row then cut to its own, where positions past max_len can be read;
      # else a program a budget)
      groups.setdefault(max(budgets) if free else n, []).append(i)
    for n, members in sorted(groups.items()):
      for i, row in zip(members, self.generate_ids([requests[i] for i in members], n, **sample)):
        rows[i] = _cut_ids(row[:budgets[i]], self._stop_ids(until))
    return [_cut(tok.decode(self._span_text(row) if self.target_head else row), until)
            for row in rows]

  def _stop_ids(self, until) -> set[int]:
    """The special tokens `until` names (lm-eval's "<|im_end|>"): decoding drops them from the
    text, so generation stops at their ids."""
    tok = self.tokenizer
    if not hasattr(tok, "piece_id"):
      return set()
    ids = {tok.piece_id(u) for u in until if u}
    return {i for i in ids if i >= 0 and not tok.is_normal(i)}

  def generate_ids(self, requests, max_new_tokens: int, *, temperature: float = 0.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
    """New ids (cut at eos) of (prompt ids, decoder head) requests: a decoder's prompt (head
    None), or an encoder-decoder's source and the ids its decoder is given after its start
    token. Greedy, or with temperature > 0 drawn as sampling.generate draws them, the call's
    n-th batch from seed + n: a request given twice gets two independent draws (lm-eval's
    `repeats`), and the same call with the same seed the same ones."""
    start = objectives.decoder_start(self.tokenizer) if self.is_seq2seq else None
    # a decoder's prompts are left-padded to their bucket, an encoder-decoder's sources right-
    # padded (one program per bucket, as scoring's); else sampling.generate takes equal lengths
    padded = start is not None or sampling.can_pad(self.model.cfg, self.prefix_lm)
    out, groups, draw = [None] * len(requests), {}, seed
    for i, (row, head) in sorted(enumerate(requests), key=lambda r: len(r[1][0])):
      width = bucket(len(row), self.max_len) if padded else len(row)
      groups.setdefault((width, len(head or ())), []).append(i)
    for (width, _), members in groups.items():
      for at in range(0, len(members), self.batch_size):
        chunk = members[at:at + self.batch_size]
        heads = None if start is None else [[start] + requests[i][1] for i in chunk]
        prompts = [requests[i][0] for i in chunk]
        if padded:  # (a short batch filled with copies to a power of two: few shapes a bucket)
          fill = min(self.batch_size, 1 << (len(prompts) - 1).bit_length()) - len(prompts)
          prompts += prompts[:1] * fill
          heads = heads and heads + heads[:1] * fill
        with self._context():
          new = sampling.generate(self.model, self.params, prompts, max_new_tokens,
                                  temperature=temperature, top_k=top_k, top_p=top_p, seed=draw,
                                  eos_id=self.tokenizer.eos_id, start_id=start,
                                  prefix=self.prefix_lm, decoder_ids=heads,
                                  pad_to=width if padded else 0)
        draw += 1
        for i, row in zip(chunk, new):
          out[i] = row
    return out

  def _span_text(self, row: list[int]) -> list[int]:
    """A span-corruption model's generated first span (after the <extra_id_0> it was given):
    cut before the next sentinel."""
    return _cut_ids(row, set(self.tokenizer.sentinel_ids))

  # ---- batches
  def _truncate(self, ctx, *cont):
    """Left-truncated so that the model reads at most max_len tokens; a continuation (target)
    longer than the model is refused, as lm-eval refuses it (scoring only its end was another
    sum, after the wrong token). `cont`: the continuation, or an encoder-decoder's (decoder
    head, continuation)."""
    head, cont = cont if len(cont) == 2 else ([], cont[0])
    if len(head) + len(cont) > self.max_len:
      given = f" after the {len(head)} its decoder is given first" if head else ""
      raise ConfigError(f"a continuation of {len(cont)} tokens{given} is longer than the "
                        f"model's {self.max_len} (model.max_len): shorten the task's answers or "
                        "targets")
    if self.is_seq2seq:
      return ctx[-self.max_len:], head, cont
    keep = self.max_len + 1
    if len(ctx) + len(cont) > keep:
      cont = cont[-keep + 1:]
      ctx = ctx[-(keep - len(cont)):]
    return ctx, cont

  def _offset(self, n: int, t: int) -> int:
    """Where a row of n tokens starts in a batch row of t (left padding: at the end)."""
    return t - n if self.padding == "left" else 0

  def _place(self, values, t: int):
    """[B, t] int32 arrays (values, segment ids, positions) of rows padded on self.padding."""
    b = self.batch_size
    arr, seg, pos = (np.zeros((b, t), np.int32) for _ in range(3))
    for i, row in enumerate(values):
      n, at = len(row), self._offset(len(row), t)
      arr[i, at:at + n], seg[i, at:at + n], pos[i, at:at + n] = row, 1, np.arange(n)
    return arr, seg, pos

  def _scored(self, rows, t: int):
    """[B, K] (positions, targets, weights) of each row's continuation tokens: `rows` are
    (first scored position within the row, row length, continuation ids)."""
    k = min(bucket(max(len(x) for _, _, x in rows), self.max_len, self.multiple), t)
    b = self.batch_size
    at_BK, targets_BK = np.zeros((b, k), np.int32), np.zeros((b, k), np.int32)
    weights_BK = np.zeros((b, k), np.float32)
    for i, (first, n, cont) in enumerate(rows):
      start = self._offset(n, t) + first
      at_BK[i, :len(cont)] = np.arange(start, start + len(cont))
      targets_BK[i, :len(cont)], weights_BK[i, :len(cont)] = cont, 1.0
    return at_BK, targets_BK, weights_BK

  def _decoder_batch(self, rows):
    """The inputs are context + continuation less its last token; the target at position
    len(context) - 1 + j is continuation token j."""
    t = bucket(max(len(c) + len(x) - 1 for c, x in rows), self.max_len, self.multiple)
    inputs = self._place([(c + x)[:-1] for c, x in rows], t)
    return inputs, self._scored([(len(c) - 1, len(c) + len(x) - 1, x) for c, x in rows], t)

  def _prefix(self, rows, t: int):
    """A prefix LM's [B, t] prefix of decoder rows (1 on each context's tokens); else None."""
    if not self.prefix_lm:
      return None
    prefix = np.zeros((self.batch_size, t), np.int32)
    for i, (ctx, cont) in enumerate(rows):
      at = self._offset(len(ctx) + len(cont) - 1, t)
      prefix[i, at:at + len(ctx)] = 1
    return self._put(prefix)

  def _seq2seq_batch(self, rows):
    """(source, head, continuation) rows: the encoder reads the source; the decoder reads start
    + head + continuation[:-1]."""
    s = bucket(max(len(c) for c, _, _ in rows), self.max_len, self.multiple)
    t = bucket(max(len(h) + len(x) for _, h, x in rows), self.max_len, self.multiple)
    enc, enc_seg, enc_pos = self._place([c for c, _, _ in rows], s)
    start = objectives.decoder_start(self.tokenizer)
    dec, dec_seg, dec_pos = self._place([[start] + h + x[:-1] for _, h, x in rows], t)
    return ((enc, dec, enc_seg, enc_pos, dec_seg, dec_pos),
            self._scored([(len(h), len(h) + len(x), x) for _, h, x in rows], t))

  def _put(self, array):
    if self._batch_sharding is None:
      return jnp.asarray(array)
    return jax.device_put(array, self._batch_sharding)

  def _context(self):
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding.context(self.mesh, self.rules)


class Lengths(TextModel):
  """Runs no model: every request is tokenized and checked as scoring checks it (a task a run's
  evaluations could not score is refused before it trains), each scored 0 and generating ""."""

  def __init__(self, config, tokenizer):
    super().__init__(config, None, tokenizer)

  def ids_loglikelihood(self, pairs) -> list[tuple[float, bool]]:
    return [(0.0, False)] * len(self.rows(pairs)) if pairs else []

  def generate(self, prompts, *, until=(), max_new_tokens: int = 32) -> list[str]:
    return [""] * len(prompts)


def _refused(request: int, message: str) -> ConfigError:
  """The ConfigError for a request that cannot be scored; its `request` (the pair's index in the
  call) lets a task name the example it came from."""
  error = ConfigError(message)
  error.request = request
  return error


def _cut_ids(row: list[int], stops) -> list[int]:
  return next((row[:k] for k, t in enumerate(row) if t in stops), row)


def _cut(text: str, until) -> str:
  ends = [text.find(u) for u in until if u and u in text]
  return text[:min(ends)] if ends else text
