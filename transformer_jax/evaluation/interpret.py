"""Looking inside a model on one text: attention maps, the logit lens and activation statistics
(the `inspect` command; plots in interpret_plots.py, linear probes in probe.py).

The model runs with two of the blocks' sown collections mutable (models/layers.py):
INTERMEDIATES, each block's output (the residual stream), and ATTENTION_PROBS, each attention's
probabilities, which the blocks then compute with the reference kernel (fp32, exactly 0 where the
mask forbids a key). Nothing is sown when the collections are not asked for, so the training path
is unchanged.

Layers are named as the residual stream passes them: "embed" (the embedding's output), then
block i's output as "i" (block i's parameters are `layer_i`, its train.log_activations metrics
`act_rms/layer_i`, its attention maps attention_layer_i.png). The logit lens decodes each
through the final norm (of a pre-norm stack) and the output head: its last layer's logits are
the model's. A decoder's lens ranks the next token; an encoder's (MLM head) the input token
itself. A prefix LM (data.objective=prefix_lm) reads the text as its prefix, both ways, as
scoring and sampling read a prompt, and --target after it causally; its lens ranks the next
token where a position cannot see it (the prefix's last token on).
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import ConfigError
from transformer_jax.data import objectives
from transformer_jax.data import tokenization
from transformer_jax.evaluation import harness
from transformer_jax.evaluation import interpret_plots as plots
from transformer_jax.models import families
from transformer_jax.models import layers
from transformer_jax.models import stack
from transformer_jax.parallel import sharding

TOP_K = 5


@dataclasses.dataclass
class Inputs:
  """One text as the model reads it: the ids the lens side reads (the decoder's; an encoder's
  own) and, for an encoder-decoder, the encoder's source ids."""
  ids: list
  source_ids: list | None = None
  prefix: int = 0  # a prefix LM's: how many of `ids` it reads both ways


def encode(config, tokenizer, text: str, *, cut: bool = True) -> list:
  """A text's ids as training framed them (a decoder's or encoder's: bos first with
  data.add_bos; an encoder-decoder's source: objectives.source_ids), cut to the model's length
  (with not `cut`: all of them, framed); a one-line error when nothing is left. Control pieces
  written in it ([MASK], <extra_id_0>) are read as sample reads them: their ids."""
  ids = tokenization.with_control_pieces(tokenizer, text)
  prefix = tokenizer.bos_id if tokenizer.bos_id >= 0 else tokenizer.eos_id
  max_len = int(config.model.max_len) if cut else 0
  if config.model.family == "encdec":  # a long text loses its end, the framing none of its ids
    ids = objectives.source_ids(config.data, tokenizer, ids, max_len=max_len, cut_start=False)
  elif config.data.add_bos and prefix >= 0:
    ids = [prefix] + ids
  if not ids:
    raise ConfigError(f"the text {text[:40]!r} has no tokens: give some text")
  return ids[:max_len] if cut else ids


def framed_lengths(config, tokenizer, text: str, target: str = "") -> dict:
  """How many ids text_inputs' sides hold before model.max_len cuts them, framing included:
  {"source": ..., "target": ...} of an encoder-decoder (the decoder's start token counted with
  its target), {"text": ...} of any other family (a prefix LM's with its target after it; a
  decoder or encoder reads no target)."""
  ids = len(encode(config, tokenizer, text, cut=False))
  rest = len(tokenization.with_control_pieces(tokenizer, target)) if target else 0
  if config.model.family == "encdec":
    return {"source": ids, "target": 1 + rest}
  return {"text": ids + (rest if objectives.flag(config.data, "PREFIX") else 0)}


def text_inputs(config, tokenizer, text: str, target: str = "") -> Inputs:
  """The model's inputs for `text`: an encoder-decoder reads it as its source and its decoder
  reads the start token + `target`; a prefix LM reads it as its prefix and `target` after it."""
  if config.model.family != "encdec":
    if not objectives.flag(config.data, "PREFIX"):
      if target:
        raise ConfigError("--target is for encoder-decoder and prefix LM workdirs (a decoder "
                          "reads --text alone)")
      return Inputs(encode(config, tokenizer, text))
    ids = encode(config, tokenizer, text)
    rest = tokenization.with_control_pieces(tokenizer, target) if target else []
    return Inputs((ids + rest)[:int(config.model.max_len)], prefix=len(ids))
  decoder = [objectives.decoder_start(tokenizer)] + tokenization.with_control_pieces(tokenizer,
                                                                                     target)
  return Inputs(decoder[:int(config.model.max_len)], encode(config, tokenizer, text))


def row_arrays(rows: list, length: int, batch: int):
  """[batch, length] int32 (tokens, segment ids, positions) of rows (lists of ids) padded on the
  right with segment 0 (attention never crosses into or out of the padding); rows past len(rows)
  repeat the first row."""
  rows = rows + [rows[0]] * (batch - len(rows))
  tokens, segments, positions = (np.zeros((batch, length), np.int32) for _ in range(3))
  for i, row in enumerate(rows):
    n = len(row)
    tokens[i, :n], segments[i, :n], positions[i, :n] = row, 1, np.arange(n)
  return tokens, segments, positions


def _embed(module, tokens_BT, positions_BT):
  return module.embed.embed(tokens_BT, positions_BT)


@functools.partial(jax.jit, static_argnames=("model", "probs", "encoder_only"))
def forward(model, params, inputs, *, probs: bool = True, encoder_only: bool = False,
            prefix_BT=None):
  """(output, embedded [B, T, D] of the lens side, sown collections) of one batch: `inputs` in
  the model's INPUTS order. With `probs` the attention probabilities are captured too;
  `encoder_only` runs only an encoder-decoder's encoder (its output is then the encoding);
  `prefix_BT`: a prefix LM's prefix (1 where it reads both ways)."""
  mutable = [layers.INTERMEDIATES] + [layers.ATTENTION_PROBS] * probs
  variables = {"params": params}
  if encoder_only:
    tokens, segments, positions = inputs[0], inputs[2], inputs[3]
    out, sown = model.apply(variables, tokens, segments, positions, method="encode",
                            mutable=mutable)
  else:
    extra = {} if prefix_BT is None else {"prefix_BT": prefix_BT}
    out, sown = model.apply(variables, *inputs, mutable=mutable, **extra)
    tokens, positions = _lens_side(model, inputs)
  return out, model.apply(variables, tokens, positions, method=_embed), sown


def _lens_side(model, inputs):
  """The (tokens, positions) whose residual stream the lens reads: an encoder-decoder's
  decoder's, any other family's own."""
  names = type(model).INPUTS
  if "decoder_inputs" in names:
    return inputs[names.index("decoder_inputs")], inputs[names.index("decoder_positions")]
  return inputs[0], inputs[names.index("positions")]


def model_inputs(model, inputs: Inputs, batch: int = 1, multiple: int = 1):
  """The model's INPUTS (numpy) for one text, `batch` rows (repeats of it), padded to a length
  `multiple` (a sequence-sharded batch's: sharding.length_multiple)."""
  tokens, segments, positions = row_arrays(
      [inputs.ids], sharding.round_up(len(inputs.ids), multiple), batch)
  if inputs.source_ids is None:
    return tokens, segments, positions
  src, src_seg, src_pos = row_arrays(
      [inputs.source_ids], sharding.round_up(len(inputs.source_ids), multiple), batch)
  by_name = {"encoder_inputs": src, "decoder_inputs": tokens, "encoder_segment_ids": src_seg,
             "encoder_positions": src_pos, "decoder_segment_ids": segments,
             "decoder_positions": positions}
  return tuple(by_name[k] for k in type(model).INPUTS)


def residual_stream(embedded, sown, where: str = "") -> list:
  """[embedded] + each block's output of stack `where` ("" a decoder's or an encoder's,
  "encoder" / "decoder" an encoder-decoder's): the residual stream, layer by layer."""
  found = stack.sown_layers(sown[layers.INTERMEDIATES])
  return [embedded] + list(found[(where, "residual")])


def attention_maps(sown) -> dict:
  """{name: [each layer's fp32 probabilities [B, H, T, S]]}: name "attention" (a decoder's or an
  encoder's self-attention), "encoder/attention", "decoder/attention",
  "decoder/cross_attention"; query head h = n * G + g (models/attention.py's layout)."""
  out = {}
  for (where, name), values in stack.sown_layers(sown[layers.ATTENTION_PROBS]).items():
    key = "/".join(p for p in (where, name.rpartition("/")[0]) if p)
    out[key] = [v.reshape(v.shape[0], -1, *v.shape[-2:]) for v in values]
  return out


def final_norm_params(params, where: str = ""):
  """The final norm's parameters of a pre-norm stack (None for post-norm)."""
  scope = params[where] if where else params
  return scope.get("final_norm")


@functools.partial(jax.jit, static_argnames=("model",))
def lens_logits(model, params, norm_params, x_BTD):
  """Logits [B, T, V] of a residual stream through the final norm (when `norm_params`) and the
  output head: the logit lens at one layer."""
  if norm_params is not None:
    x_BTD = layers.Norm(model.cfg).apply({"params": norm_params}, x_BTD)
  return model.apply({"params": params}, x_BTD, method="logits").astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("model", "k"))
def lens_summary(model, params, norm_params, x_TD, targets_T, k: int = TOP_K):
  """At each position: the top-k token ids and probabilities, and the target's rank (1 = the top
  prediction) and probability, of the logit lens at one layer."""
  logits_TV = lens_logits(model, params, norm_params, x_TD[None])[0]
  probs_TV = jax.nn.softmax(logits_TV, axis=-1)
  top_p, top_ids = jax.lax.top_k(probs_TV, min(k, probs_TV.shape[-1]))
  target_logit_T = jnp.take_along_axis(logits_TV, targets_T[:, None], axis=-1)
  rank_T = 1 + jnp.sum(logits_TV > target_logit_T, axis=-1)
  target_p = jnp.take_along_axis(probs_TV, targets_T[:, None], axis=-1)[:, 0]
  return top_ids, top_p, rank_T, target_p


def piece(pieces: list, i: int) -> str:
  """Token i's piece; ids past the tokenizer's vocabulary (the model's may be padded) as <i>."""
  return pieces[i] if 0 <= i < len(pieces) else f"<{i}>"


def layer_names(count: int) -> list:
  """The residual stream's layer names: "embed", then the blocks "0" .. str(count - 2)."""
  return ["embed"] + [str(i) for i in range(count - 1)]


def logit_lens(model, params, stream, ids: list, *, causal: bool, where: str = "",
               pieces=None, k: int = TOP_K, seen: int = 0) -> dict:
  """Per layer of `stream` (residual_stream's, row 0): the top-k tokens and the rank and
  probability of each position's target (a causal model's next token: the last position has
  none, rank 0; otherwise the input token itself). The first `seen` positions (a prefix LM's,
  which see their next token) are not scored either: rank 0."""
  norm = final_norm_params(params, where)
  targets = ids[1:] + [ids[-1]] if causal else list(ids)
  name = functools.partial(piece, pieces) if pieces is not None else str
  rows = []
  for label, x_BTD in zip(layer_names(len(stream)), stream):
    top_ids, top_p, rank, target_p = jax.device_get(lens_summary(
        model, params, norm, x_BTD[0], jnp.asarray(targets, jnp.int32), k=k))
    rank, target_p = rank.tolist(), target_p.tolist()
    if causal:
      rank[-1], target_p[-1] = 0, 0.0
    rank[:seen], target_p[:seen] = [0] * seen, [0.0] * seen
    rows.append({"layer": label, "top": [[name(int(i)) for i in row] for row in top_ids],
                 "top_p": np.round(top_p, 4).tolist(), "rank": rank,
                 "target_p": [round(p, 4) for p in target_p]})
  scored = len(ids) - 1 if causal else len(ids)
  return {"targets": "next token" if causal else "input token",
          "tokens": [name(i) for i in ids], "target_tokens": [name(i) for i in targets][:scored],
          "layers": rows}


def activation_stats(stream, maps: dict, *, prefix: str = "", encoder=()) -> dict:
  """Per layer of the residual stream (row 0): RMS and max |x| over the positions (first those
  of `encoder`, an encoder-decoder's encoder's block outputs, as "encoder/0", ...); per attention
  layer and head: the mean entropy (nats) of the queries' attention distributions."""
  labels = [f"encoder/{i}" for i in range(len(encoder))]
  labels += [prefix + name for name in layer_names(len(stream))]
  layers_out = []
  for label, x in zip(labels, list(encoder) + list(stream)):
    x = np.asarray(x[0], np.float32)
    layers_out.append({"layer": label, "rms": float(np.sqrt(np.mean(np.square(x)))),
                       "max_abs": float(np.max(np.abs(x)))})
  entropy = {}
  for name, per_layer in maps.items():
    entropy[name] = [np.round(head_entropy(np.asarray(p[0])), 4).tolist() for p in per_layer]
  return {"layers": layers_out, "attention_entropy": entropy}


def head_entropy(probs_HTS):
  """Each head's mean over queries of -sum p log p (0 log 0 = 0), nats [H]."""
  p = np.asarray(probs_HTS, np.float64)
  plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  return -plogp.sum(-1).mean(-1)


def run(trainer, params, tokenizer, text: str, *, target: str = "", top_k: int = TOP_K) -> dict:
  """Everything `inspect` reports on one text: tokens, attention maps (numpy [H, T, S] per
  layer), logit lens and activation statistics."""
  config, model = trainer.config, families.for_inference(trainer.model)  # as scoring runs it
  family = config.model.family
  inputs = text_inputs(config, tokenizer, text, target)
  rows = harness.batch_rows(trainer, 1)
  arrays = [jax.device_put(a, trainer.batch_sharding) for a in model_inputs(
      model, inputs, rows, sharding.length_multiple(trainer.mesh, trainer.rules))]
  prefix = None
  if objectives.flag(config.data, "PREFIX"):  # (a prefix LM takes one, even an empty one)
    prefix = np.zeros(arrays[0].shape, np.int32)
    prefix[:, :inputs.prefix] = 1
    prefix = jax.device_put(prefix, trainer.batch_sharding)
  with sharding.context(trainer.mesh, trainer.rules):
    _, embedded, sown = forward(model, params, tuple(arrays), prefix_BT=prefix)
  where = "decoder" if family == "encdec" else ""
  n = len(inputs.ids)  # (less any padding a sequence-sharded batch needed)
  s = n if inputs.source_ids is None else len(inputs.source_ids)
  stream = [np.asarray(x[:1, :n], np.float32) for x in residual_stream(embedded, sown, where)]
  maps = {k: [np.asarray(p[0][:, :s if k.startswith("encoder") else n,
                               :s if k in ("encoder/attention", "decoder/cross_attention") else n])
              for p in v] for k, v in attention_maps(sown).items()}
  pieces = tokenizer.pieces()
  with sharding.context(trainer.mesh, trainer.rules):
    lens = logit_lens(model, params, [jnp.asarray(x) for x in stream], inputs.ids,
                      causal=family != "encoder", where=where, pieces=pieces, k=top_k,
                      seen=max(inputs.prefix - 1, 0))
  encoder = ([np.asarray(x[:1, :s]) for x in stack.sown_layers(sown[layers.INTERMEDIATES])[
      ("encoder", "residual")]] if family == "encdec" else [])
  stats = activation_stats(stream, {k: [p[None] for p in v] for k, v in maps.items()},
                           prefix="decoder/" if encoder else "", encoder=encoder)
  labels = {"tokens": [piece(pieces, i) for i in inputs.ids]}
  if inputs.source_ids is not None:
    labels["source_tokens"] = [piece(pieces, i) for i in inputs.source_ids]
  return {"family": family, **labels, "attention": maps, "logit_lens": lens, "stats": stats}


def write(result: dict, out: str) -> dict:
  """Writes DIR/attention/*.png, logit_lens.{json,md,png} and stats.{json,md}; returns the
  written paths by kind."""
  os.makedirs(out, exist_ok=True)
  files = {"attention": plots.attention_grids(result, os.path.join(out, "attention"))}
  lens, stats = result["logit_lens"], result["stats"]
  files["logit_lens"] = [_json(os.path.join(out, "logit_lens.json"), lens),
                         _text(os.path.join(out, "logit_lens.md"), lens_markdown(lens)),
                         plots.logit_lens(lens, os.path.join(out, "logit_lens.png"))]
  files["stats"] = [_json(os.path.join(out, "stats.json"), stats),
                    _text(os.path.join(out, "stats.md"), stats_markdown(stats))]
  return files


def _json(path: str, value) -> str:
  with open(path, "w") as f:
    json.dump(value, f, indent=1)
  return path


def _text(path: str, text: str) -> str:
  with open(path, "w") as f:
    f.write(text)
  return path


def _cell(piece: str) -> str:
  """A token as a markdown table cell: one line (a newline piece broke the table's rows)."""
  if not piece:
    return "` `"
  for raw, shown in (("|", "\\|"), ("`", "'"), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
    piece = piece.replace(raw, shown)
  return "`" + piece + "`"


def lens_markdown(lens: dict, max_positions: int = 24) -> str:
  """The logit lens as markdown: per layer the mean log rank of the scored targets (rank > 0),
  then the top-1 token per layer and position (the first `max_positions`), with the target's
  rank."""
  tokens, rows = lens["tokens"], lens["layers"]
  n = min(len(tokens), max_positions)
  scored = len(lens["target_tokens"])
  lines = [f"# Logit lens (target: the {lens['targets']})", "",
           "| layer | mean log2 rank | top-1 = target |", "|---|---|---|"]
  for row in rows:
    ranks = np.asarray([r for r in row["rank"][:scored] if r > 0], np.float64)
    figures = (f"{np.mean(np.log2(ranks)):.2f} | {np.mean(ranks == 1):.2f}" if ranks.size
               else "– | –")  # (no position scored: a prefix LM's text alone)
    lines.append(f"| {row['layer']} | {figures} |")
  lines += ["", "Top-1 token (target rank) per position:", "",
            "| layer | " + " | ".join(_cell(t) for t in tokens[:n]) + " |",
            "|---" * (n + 1) + "|"]
  for row in rows:
    cells = [f"{_cell(row['top'][t][0])} ({row['rank'][t]})" if row["rank"][t] > 0 else
             _cell(row["top"][t][0]) for t in range(n)]
    lines.append(f"| {row['layer']} | " + " | ".join(cells) + " |")
  if scored:
    lines += ["", "Targets: " + " ".join(_cell(t) for t in lens["target_tokens"][:n])]
  return "\n".join(lines) + "\n"


def stats_markdown(stats: dict) -> str:
  lines = ["# Activation statistics", "", "| layer | RMS | max abs |", "|---|---|---|"]
  lines += [f"| {r['layer']} | {r['rms']:.4g} | {r['max_abs']:.4g} |" for r in stats["layers"]]
  for name, per_layer in stats["attention_entropy"].items():
    heads = len(per_layer[0]) if per_layer else 0
    lines += ["", f"Attention entropy (nats), {name}:", "",
              "| layer | " + " | ".join(f"head {h}" for h in range(heads)) + " |",
              "|---" * (heads + 1) + "|"]
    lines += [f"| {i} | " + " | ".join(f"{e:.3f}" for e in row) + " |"
              for i, row in enumerate(per_layer)]
  return "\n".join(lines) + "\n"
