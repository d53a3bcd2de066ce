"""mlm: BERT's masked LM, encoder-only. Each ordinary token is selected with probability
data.mlm_rate; a selected token becomes [MASK] (80%), a random ordinary token (10%) or stays (10%).
Specials (pad, bos, eos, control pieces) are never selected nor drawn. The targets are the original
tokens everywhere and weights are 1 only where selected.

With data.sentence_pair (nsp or sop) each chunk (seq_len - 3 tokens) is cut at a random sentence
end (vocab.py's rule; else at a random token) into A and B and becomes [bos] A [eos] B [eos]
(bos/eos as BERT's [CLS]/[SEP]) with token types 0 for [CLS] A [SEP] and 1 after, masked as above.
sop (ALBERT): A and B swap places with probability 1/2 (label 1). nsp (BERT): with probability 1/2,
B is replaced by as many tokens of another document's chunk near it in the (shuffled) stream,
from one of its sentence starts where they fit (label 1: the pair is as long as a true one);
at eval (the stream in order, where the next chunk is often the same document's) by that of the
chunk EVAL_PARTNER_DISTANCE chunks on, within windows of twice that.
The batch then also has types, sentence_labels and sentence_weights (float32): the pair's label
and weight 1 at its [CLS] position, 0 elsewhere; the model's sentence head is trained on them."""

import dataclasses

import grain
import numpy as np

from transformer_jax.data.objectives import common
from transformer_jax.data.objectives import vocab as vocab_lib
from transformer_jax.data.objectives.vocab import Vocab

NAME = "mlm"
FAMILIES = ("encoder",)
PAIR_KEYS = ("types", "sentence_labels", "sentence_weights")


SENTENCE_PAIRS = True  # takes data.sentence_pair


def check(d):
  common.fraction("mlm_rate", d.mlm_rate)


def rows_changed(d) -> str:
  return ("9e75a62 (2026-12-05 15:44 UTC: an nsp negative's B is as long as the true B)"
          if d.sentence_pair == "nsp" else "")


def resolve(s: common.Spec) -> common.Spec:
  if s.sentence_pair:  # Room for [CLS] A [SEP] B [SEP].
    return dataclasses.replace(s, target_len=0, chunk_len=s.seq_len - 3)
  return dataclasses.replace(s, target_len=0)


def missing_tokens(s, tok) -> list:
  missing = ["[MASK]"] if tok.mask_id < 0 else []
  if s.sentence_pair and (tok.bos_id < 0 or tok.eos_id < 0):
    missing.append("a bos and an eos ([CLS] A [SEP] B [SEP])")
  return missing


def mlm(tokens_l: np.ndarray, rng: np.random.Generator, vocab: Vocab, rate: float) -> dict:
  """BERT's masking of one chunk: {"inputs", "targets" (= tokens), "weights" (1 = selected)}."""
  tokens_l = np.asarray(tokens_l, dtype=np.int32)
  selected_l = vocab.normal[tokens_l] & (rng.random(tokens_l.shape) < rate)
  action_l = rng.random(tokens_l.shape)  # < 0.8: [MASK]; < 0.9: a random token; else kept.
  inputs_l = np.where(selected_l & (action_l < 0.8), vocab.mask_id, tokens_l).astype(np.int32)
  random_l = selected_l & (action_l >= 0.8) & (action_l < 0.9)
  inputs_l[random_l] = rng.choice(vocab.normal_ids, size=int(random_l.sum()))
  return {"inputs": inputs_l, "targets": tokens_l, "weights": selected_l.astype(np.float32)}


def sentence_pair(tokens_l: np.ndarray, next_l: np.ndarray | None, rng: np.random.Generator,
                  vocab: Vocab, s: common.Spec) -> dict:
  """One mlm example with a sentence pair (the module docstring); `next_l`: the next chunk in
  the stream (nsp's random B), None for the last one."""
  a_l, b_l = vocab_lib.split_sentences(tokens_l, rng, vocab)
  label = int(rng.random() < 0.5)
  if label and s.sentence_pair == "sop":
    a_l, b_l = b_l, a_l
  elif label and next_l is not None and len(next_l) > 1:
    b_l = _random_b(next_l, len(b_l), rng, vocab)
  else:
    label = 0  # nsp without a next chunk: keep the true B.
  cls, sep = [vocab.bos_id], [vocab.eos_id]
  tokens_l = np.concatenate([cls, a_l, sep, b_l, sep]).astype(np.int32)
  example = mlm(tokens_l, rng, vocab, s.mlm_rate)
  example["types"] = (np.arange(len(tokens_l)) > len(a_l) + 1).astype(np.int32)
  example["sentence_labels"] = np.zeros(len(tokens_l), np.int32)
  example["sentence_labels"][0] = label
  example["sentence_weights"] = (np.arange(len(tokens_l)) == 0).astype(np.float32)
  return example


def _random_b(other_l: np.ndarray, need: int, rng: np.random.Generator,
              vocab: Vocab) -> np.ndarray:
  """A negative pair's B: `need` tokens (the true B's length, so that a pair's length says
  nothing of its label) of another chunk's body, from a random sentence start that leaves that
  many, else ending at the body's end (all of a shorter body)."""
  body_l = other_l[slice(*vocab_lib.body(other_l, vocab))]
  starts = vocab_lib.sentence_starts(body_l, vocab)
  fits = starts[starts <= len(body_l) - need]
  start = int(rng.choice(fits)) if len(fits) else max(len(body_l) - need, 0)
  return body_l[start:start + need]


def corrupt(tokens_l, rng, vocab: Vocab, s: common.Spec) -> dict:
  return mlm(tokens_l, rng, vocab, s.mlm_rate)


EVAL_PARTNER_DISTANCE = 64  # chunks between an eval chunk and its nsp partner
TRAIN_WINDOW = 16  # shuffled chunks among which training's nsp partners are found


def document_ids(s) -> bool:
  return s.sentence_pair == "nsp"  # a negative's B comes from another document


class SentencePairs(grain.transforms.RandomMap):
  """A window of chunks -> their sentence-pair examples: chunk i's nsp partner is the first of
  chunks i + n/2, i + n/2 + 1, ... (mod n) of the window's n from another document (as BERT's
  random B), else chunk i + n/2."""

  def __init__(self, s: common.Spec, vocab: Vocab):
    self._spec, self._vocab = s, vocab

  def random_map(self, elements, rng: np.random.Generator):
    chunks = [e[common.CHUNK] for e in elements]
    docs = [e.get(common.DOCUMENT) for e in elements]
    n = len(chunks)

    def partner(i):
      if n < 2:
        return None
      order = [(i + n // 2 + k) % n for k in range(n)]
      return chunks[next((j for j in order if docs[j] is None or docs[j] != docs[i]),
                         order[0])]
    return [sentence_pair(c, partner(i), rng, self._vocab, self._spec)
            for i, c in enumerate(chunks)]


def examples(ds, s, vocab, seed, shuffle):
  """Masked chunks; with sentence pairs, pairs made after the shuffle, within TRAIN_WINDOW
  chunks (nsp pairs each chunk with a random other, of another document), or at eval (no
  shuffle) of 2 * EVAL_PARTNER_DISTANCE chunks of the stream in order (a chunk with one far from
  it, of another document)."""
  if not s.sentence_pair:
    ds = ds.random_map(common.Corrupt(corrupt, s, vocab), seed=seed)
    return shuffle(ds) if shuffle else ds
  window = TRAIN_WINDOW if shuffle else 2 * EVAL_PARTNER_DISTANCE
  ds = (shuffle(ds) if shuffle else ds).batch(window, batch_fn=list)
  ds = ds.random_map(SentencePairs(s, vocab), seed=seed)
  return grain.experimental.FlatMapIterDataset(ds, _Unbatch(window))


class _Unbatch(grain.experimental.FlatMapTransform):
  def __init__(self, window: int):
    self.max_fan_out = window

  def flat_map(self, element):
    return element


def length_struct(s) -> dict:
  return common.decoder_lengths(s, ("inputs", "targets", "weights") + PAIR_KEYS * bool(
      s.sentence_pair))


def from_packed(s, row: dict) -> dict:
  if s.sentence_pair:
    return common.decoder_row(row, ints=PAIR_KEYS[:2], floats=PAIR_KEYS[2:])
  return common.decoder_row(row)


def loss(s) -> common.Loss:
  if s.sentence_pair:
    return common.Loss(inputs=(("types", "types_BT"),), sentence=True)
  return common.Loss()
