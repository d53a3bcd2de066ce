"""Passkey retrieval (Mohtashami & Jaggi 2023): can a decoder find a number hidden in long text?

A prompt is filler text ("The grass is green. The sky is blue. ...") about `length` tokens long,
with "The pass key is 71432. Remember it. 71432 is the pass key." put at a chosen depth (0 = the
start, 1 = just before the question), ending in "What is the pass key? The pass key is". The key
counts as retrieved when the model, fed the prompt and the key (teacher forcing), predicts every
token of the key: exactly what greedy decoding would write. `evaluate` reports the accuracy at
each (length, depth); keys and filler offsets are seeded.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import ConfigError
from transformer_jax.models import families

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


def example(tokenizer, length: int, depth: float, key: int) -> tuple[list[int], list[int]]:
  """(prompt ids, key ids) of one passkey prompt of about `length` tokens (at least the needle
  and the question), the needle `depth` (in [0, 1]) of the way through the filler."""
  if not 0 <= depth <= 1:  # 3.0 acted as 1.0, and -0.5 sliced from the end
    raise ValueError(f"passkey depth {depth!r} is not in [0, 1]")
  filler = tokenizer.encode(FILLER)
  needle = tokenizer.encode(NEEDLE.format(key=key))
  question = tokenizer.encode(QUESTION)
  # bos first, as training framed documents (eos where the tokenizer has no bos, as scoring)
  start = next(([i] for i in (tokenizer.bos_id, tokenizer.eos_id) if i >= 0), [])
  room = max(length - len(needle) - len(question) - len(start), 0)
  text = (filler * (room // len(filler) + 1))[:room]
  cut = int(round(depth * room))
  prompt = start + text[:cut] + needle + text[cut:] + question
  return prompt, tokenizer.encode(f" {key}")


def retrieved(logits_fn, prompts: list[list[int]], keys: list[list[int]]) -> np.ndarray:
  """bool [N]: whether `logits_fn(ids [B, T], segment_ids [B, T])` -> [B, T, V] predicts every
  key token after its prompt (rows right-padded with segment 0)."""
  rows = [p + k for p, k in zip(prompts, keys)]
  t = max(map(len, rows))
  ids = np.zeros((len(rows), t), np.int32)
  seg = np.zeros((len(rows), t), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)], seg[i, :len(row)] = row, 1
  predicted = np.asarray(jnp.argmax(logits_fn(jnp.asarray(ids), jnp.asarray(seg)), axis=-1))
  return np.array([all(predicted[i, len(p) - 1 + j] == tok for j, tok in enumerate(k))
                   for i, (p, k) in enumerate(zip(prompts, keys))])


def evaluate(model, params, tokenizer, lengths=(256, 1024), depths=(0.0, 0.5, 1.0),
             trials: int = 4, seed: int = 0) -> dict:
  """{"length=L,depth=D": accuracy over `trials` keys} and "mean", for a DecoderLM (an MoE
  without drops, as scoring runs it)."""
  model = families.for_inference(model)
  apply = jax.jit(functools.partial(model.apply, {"params": params}))
  logits_fn = lambda ids, seg: apply(ids, seg)  # pylint: disable=unnecessary-lambda-assignment
  rng = np.random.default_rng(seed)
  out = {}
  for length in lengths:
    for depth in depths:
      pairs = [example(tokenizer, length, depth, int(rng.integers(10_000, 100_000)))
               for _ in range(trials)]
      longest = max(len(p) + len(k) - 1 for p, k in pairs)
      if model.cfg.position == "learned" and longest > model.cfg.max_len:  # NaN past the table
        raise ConfigError(f"passkey length={length} reads {longest} tokens, past the "
                          f"{model.cfg.max_len} learned positions of the model")
      hits = retrieved(logits_fn, [p for p, _ in pairs], [k for _, k in pairs])
      out[f"length={length},depth={depth}"] = float(hits.mean())
  out["mean"] = float(np.mean(list(out.values())))
  return out
