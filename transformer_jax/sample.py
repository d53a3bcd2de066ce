"""Generate text from a workdir's latest checkpoint with a KV cache:
`python -m transformer_jax.sample --workdir=DIR --prompt="..." [--max_new_tokens=64
--temperature=0.8 --top_k=0 --top_p=1.0 --seed=0]`.

A decoder continues the prompt; an encoder-decoder reads the prompt as its source (for a span
corruption model, put sentinels like <extra_id_0> where text is missing) and writes the target;
an encoder (BERT) fills in masks: `--fill_mask="x = [MASK] + 1"`. `--beam_size=K` searches K
beams with GNMT's length penalty (alpha 0.6) instead of sampling (encoder-decoders)."""

import sys

from transformer_jax import cli
from transformer_jax.config import ConfigError
from transformer_jax.config import paths


def prompt_ids(config, tok, prompt: str, max_new_tokens: int, flag="--max_new_tokens") -> list:
  """A decoder prompt's ids as training framed them, checked to fit learned positions with
  `max_new_tokens` more (`flag`: what sets it, for the error)."""
  ids = ([tok.bos_id] if config.data.add_bos else []) + tok.encode(prompt)
  if not ids:  # an empty prompt starts a document: bos, else the eos that ended the last one
    ids = [tok.bos_id if tok.bos_id >= 0 else tok.eos_id]
  # (the last new token is never fed back: T + N - 1 positions are read)
  _check_length(config, len(ids) + max_new_tokens - 1, f"prompt ({len(ids)} tokens) + "
                f"{flag}={max_new_tokens}")
  return ids


def _check_length(config, n: int, what: str) -> None:
  """ConfigError when `n` tokens pass learned positions (their rows would read no position)."""
  limit = config.model.max_len if config.model.position == "learned" else None
  if limit is not None and n > limit:
    raise ConfigError(f"{what} exceeds model.max_len={limit}")


def sample_text(config, params, prompt: str, *, max_new_tokens=64, temperature=0.8, top_k=0,
                top_p=1.0, seed=0, beam_size=0) -> str:
  from transformer_jax.data import objectives  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tokenization as tok_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.inference import sampling  # pylint: disable=g-import-not-at-top
  from transformer_jax.models.families import build_model  # pylint: disable=g-import-not-at-top
  tok = tok_lib.load(config.data.tokenizer)
  model = build_model(config)
  start = objectives.decoder_start(tok) if config.model.family == "encdec" else None
  # (an encoder-decoder's source and target each fit the model: sampling checks them)
  ids = prompt_ids(config, tok, prompt, max_new_tokens) if start is None else source(
      config, tok, prompt)
  if beam_size > 0:
    if start is None:
      raise ConfigError("--beam_size is for encoder-decoder workdirs")
    from transformer_jax.inference import beam  # pylint: disable=g-import-not-at-top
    out, _, _ = beam.beam_search(model, params, [ids], beam_size=beam_size,
                                 max_len=max_new_tokens, start_id=start, eos_id=tok.eos_id)
    return tok.decode([t for t in out[0] if t != tok.eos_id])
  out = sampling.generate(model, params, [ids], max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, seed=seed, eos_id=tok.eos_id, start_id=start,
                          prefix=start is None and objectives.flag(config.data, "PREFIX"))
  if start is not None:
    return tok.decode(out[0])
  return continuation(tok, tok.encode(prompt), out[0])


def continuation(tok, prompt: list[int], new: list[int]) -> str:
  """The text `new` adds after `prompt`: decoded together, as transformers' pipeline does (a
  Metaspace tokenizer drops the space a text's first word has, so "▁in" alone is "in")."""
  whole, before = tok.decode(prompt + new), tok.decode(prompt)
  return whole[len(before):] if whole.startswith(before) else tok.decode(new)


def source(config, tok, prompt: str) -> list[int]:
  """An encoder-decoder's source ids of `prompt` as training framed them (a UL2 prompt names its
  mode token itself)."""
  from transformer_jax.data import objectives  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tokenization as tok_lib  # pylint: disable=g-import-not-at-top
  ids = tok_lib.with_control_pieces(tok, prompt)
  return objectives.source_ids(config.data, tok, ids, head=False)


def fill_mask(config, params, text: str) -> str:
  """An encoder's most likely token at every [MASK] of `text`, written into it."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tokenization as tok_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.models.families import build_model  # pylint: disable=g-import-not-at-top
  tok = tok_lib.load(config.data.tokenizer)
  ids = ([tok.bos_id] if config.data.add_bos else []) + tok_lib.with_control_pieces(tok, text)
  masks = [i for i, t in enumerate(ids) if t == tok.mask_id]
  if not masks:
    raise ConfigError("--fill_mask text has no [MASK]")
  _check_length(config, len(ids), f"--fill_mask text ({len(ids)} tokens)")
  logits = build_model(config).apply({"params": params}, jnp.asarray([ids], jnp.int32))[0]
  for i in masks:
    ids[i] = int(jnp.argmax(logits[i]))
  return tok.decode(ids[1:] if config.data.add_bos else ids)


FLAGS = {"workdir": "", "prompt": "", "max_new_tokens": 64, "temperature": 0.8, "top_k": 0,
         "top_p": 1.0, "seed": 0, "fill_mask": "", "beam_size": 0}


def _note_unread(f) -> None:
  """A note naming the sampling flags that greedy decoding, beam search or fill-mask ignore
  (they take the most likely tokens), as transformers warns."""
  mode = ("--fill_mask" if f["fill_mask"] else "--beam_size" if f["beam_size"]
          else "--temperature=0" if f["temperature"] == 0 else "")
  keys = ("temperature", "top_k", "top_p", "seed") + (
      ("beam_size", "max_new_tokens") if f["fill_mask"] else ())  # (it fills the [MASK]s alone)
  unread = [f"--{k}" for k in keys
            if mode and f[k] != FLAGS[k] and not (k == "temperature" and f[k] == 0)]
  if unread:
    print(f"note: {', '.join(unread)} do(es) nothing with {mode}: it takes the most likely "
          f"tokens", file=sys.stderr)


def main(argv):
  spec, overrides, f = cli.parse(argv, FLAGS)
  if spec or overrides:
    raise ConfigError("sample reads the workdir's config.json; it takes no --config or "
                      "--config.KEY")
  saved = paths.join(f["workdir"], "config.json")  # local or gs://
  with paths.storage_errors(f["workdir"], f"--workdir={f['workdir']} cannot be read",
                            ConfigError):
    found = bool(f["workdir"]) and paths.isfile(saved)
  if not found:
    raise ConfigError(f"--workdir must be a training workdir with config.json (got {f['workdir']!r})")
  cli.check_flags(f, (("max_new_tokens", f["max_new_tokens"] >= 1, ">= 1"),
                      ("temperature", 0 <= f["temperature"] < float("inf"), "finite and >= 0"),
                      ("top_p", 0 < f["top_p"] <= 1, "in (0, 1]"),
                      ("top_k", f["top_k"] >= 0, ">= 0"), ("beam_size", f["beam_size"] >= 0,
                                                           ">= 0")))
  _note_unread(f)
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  if not 0 <= f["seed"] < config_lib.SEEDS:
    raise ConfigError(f"--seed must be {config_lib.SEEDS_RANGE}, got {f['seed']}")
  from transformer_jax.models import families  # pylint: disable=g-import-not-at-top
  from transformer_jax.quant import store  # pylint: disable=g-import-not-at-top
  from transformer_jax.models.families import build_model  # pylint: disable=g-import-not-at-top
  config = config_lib.any_platform(config_lib.from_json_file(saved))
  from transformer_jax.training import resume  # pylint: disable=g-import-not-at-top
  resume.check_tokenizer(f["workdir"], config.data.tokenizer)
  if (config.model.family == "encoder") != bool(f["fill_mask"]) or (
      f["fill_mask"] and f["prompt"]):
    raise ConfigError("an encoder (BERT) workdir takes --fill_mask=TEXT (with [MASK]s), other "
                      "families --prompt=TEXT")
  if f["beam_size"] and config.model.family != "encdec":  # (before the restore, and before a
    # length check that the default --max_new_tokens may fail first)
    raise ConfigError("--beam_size is for encoder-decoder workdirs")
  model = build_model(config)
  abstract = families.abstract_params(model)
  # A training workdir's latest checkpoint, or a quantized workdir's (dequantized)
  step, params = store.restore_params(f["workdir"], config.checkpoint, model, abstract)
  if params is None:
    raise ConfigError(f"no checkpoint in {f['workdir']}/checkpoints")
  if f["fill_mask"]:
    print(f"[step {step}] {fill_mask(config, params, f['fill_mask'])}")
    return
  text = sample_text(config, params, f["prompt"], max_new_tokens=f["max_new_tokens"],
                     temperature=f["temperature"], top_k=f["top_k"], top_p=f["top_p"],
                     seed=f["seed"], beam_size=f["beam_size"])
  # a decoder's text goes on from the prompt; an encoder-decoder's is another text (its output)
  between = " => " if config.model.family == "encdec" else ""
  print(f"[step {step}] {f['prompt']}{between}{text}")


if __name__ == "__main__":
  cli.entry(main)
