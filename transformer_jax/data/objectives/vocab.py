"""What the transforms know of a tokenizer (`Vocab`), and the sentence rule that BART's sentence
permutation and BERT's sentence pairs share: a sentence ends after a token whose piece contains a
newline (so code is split line by line), or ends in ".", "!" or "?" when the next piece starts
with a space; a leading bos and a trailing eos stay in place."""

import dataclasses

import numpy as np


def _piece_text(piece: str) -> str:
  """The text of a piece: "▁" is a space, "<0x0A>" the byte it names."""
  if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
    return chr(int(piece[3:5], 16))
  return piece.replace("\u2581", " ")


def decoder_start(tok) -> int:
  """An encoder-decoder's decoder start, the same in training, sampling, scoring and an export's
  decoder_start_token_id: the one an imported checkpoint names (its decoder_start_token_id,
  kept beside the import's copy of its tokenizer: hf_tokenization.GENERATION), else the
  tokenizer's bos, else its pad (T5's, whose tokenizer has no bos); -1 if it has neither."""
  named = getattr(tok, "decoder_start_id", -1)
  return named if named >= 0 else tok.bos_id if tok.bos_id >= 0 else tok.pad_id


@dataclasses.dataclass(frozen=True, eq=False)
class Vocab:
  """What the transforms need to know about a tokenizer (plain numpy; pickles small)."""
  start_id: int  # decoder start: decoder_start(tok)
  bos_id: int
  eos_id: int
  mask_id: int
  sentinel_ids: np.ndarray
  mode_ids: tuple
  normal: np.ndarray  # bool [vocab]: ordinary text pieces (maskable, random replacements)
  normal_ids: np.ndarray
  ends_line: np.ndarray  # bool [vocab]: the piece contains a newline
  ends_stop: np.ndarray  # bool [vocab]: the piece ends with . ! or ?
  starts_space: np.ndarray  # bool [vocab]: the piece starts with whitespace

  @classmethod
  def from_tokenizer(cls, tok) -> "Vocab":
    texts = [_piece_text(p) for p in tok.pieces()]
    normal = np.array([tok.is_normal(i) for i in range(tok.vocab_size)])
    flags = lambda f: normal & np.array([f(t) for t in texts], dtype=bool)
    return cls(start_id=decoder_start(tok), bos_id=tok.bos_id, eos_id=tok.eos_id, mask_id=tok.mask_id,
               sentinel_ids=np.asarray(tok.sentinel_ids, np.int32), mode_ids=tuple(tok.mode_ids),
               normal=normal, normal_ids=np.flatnonzero(normal).astype(np.int32),
               ends_line=flags(lambda t: "\n" in t),
               ends_stop=flags(lambda t: t[-1:] in (".", "!", "?")),
               starts_space=flags(lambda t: t[:1].isspace()))


def body(tokens_l: np.ndarray, vocab: Vocab) -> tuple[int, int]:
  """[head, tail): the chunk without a leading bos and a trailing eos."""
  head = int(len(tokens_l) > 0 and tokens_l[0] == vocab.bos_id)
  return head, len(tokens_l) - int(len(tokens_l) > head and tokens_l[-1] == vocab.eos_id)


def sentence_starts(body_l: np.ndarray, vocab: Vocab) -> np.ndarray:
  """Indices (> 0) where a new sentence of `body_l` starts (the module docstring's rule)."""
  ends_l = vocab.ends_line[body_l]
  ends_l[:-1] |= vocab.ends_stop[body_l[:-1]] & vocab.starts_space[body_l[1:]]
  return np.flatnonzero(ends_l[:-1]) + 1


def permute_sentences(tokens_l: np.ndarray, rng: np.random.Generator,
                      vocab: Vocab) -> np.ndarray:
  """The chunk with its sentences in random order (the module docstring's rule)."""
  tokens_l = np.asarray(tokens_l, dtype=np.int32)
  head, tail = body(tokens_l, vocab)
  body_l = tokens_l[head:tail]
  sentences = np.split(body_l, sentence_starts(body_l, vocab))
  order = rng.permutation(len(sentences))
  return np.concatenate([tokens_l[:head]] + [sentences[i] for i in order] + [tokens_l[tail:]])


def split_sentences(tokens_l: np.ndarray, rng: np.random.Generator,
                    vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
  """(A, B): the chunk's body cut at a random sentence start (else a random token)."""
  tokens_l = np.asarray(tokens_l, dtype=np.int32)
  body_l = tokens_l[slice(*body(tokens_l, vocab))]
  starts = sentence_starts(body_l, vocab)
  if len(starts):
    cut = int(rng.choice(starts))
  else:
    cut = int(rng.integers(1, len(body_l))) if len(body_l) >= 2 else len(body_l)
  return body_l[:cut], body_l[cut:]
