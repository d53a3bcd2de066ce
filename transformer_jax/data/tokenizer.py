"""A SentencePiece BPE tokenizer for code and prose: training and loading.

The model keeps text exactly: identity normalization, no dummy prefix, no whitespace
collapsing, so `decode(encode(x)) == x` for any string, tabs, runs of spaces and blank lines
included. Runs of spaces (indentation) may become single pieces and pieces may contain
newlines; characters outside the learned alphabet fall back to their UTF-8 bytes, so nothing
is ever <unk>. Special ids: pad=0, unk=1, bos=2, eos=3.

BPE rather than unigram: on the stdlib corpus it trains ~8x faster (about 1 s for 4 MB) and
compresses slightly better (about 2.5% fewer tokens at 8192 pieces).

A `.model` file is a SentencePiece protobuf: loading it runs no code.
"""

import collections
import io
import itertools
import os
import random
import re
import shlex
import tempfile
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from transformer_jax.config import ConfigError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPE = "bpe"
_NUM_BYTE_PIECES = 256
_MIN_CHARACTER_COVERAGE = 0.98  # SentencePiece rejects less.
_DEFAULT_CHARACTER_COVERAGE = 0.9995
_SENTENCE_CHARS = 1000  # Training "sentences" are runs of whole lines about this long ...
_MAX_SENTENCE_CHARS = 4000  # ... and never longer than this (<= 16000 UTF-8 bytes).


def create_command(out_path: str, corpus: str = "stdlib", vocab_size: int = 8192,
                   fmt: str = "text", text_field: str = "text") -> str:
  """The shell command that trains the tokenizer `out_path` should hold."""
  flags = [("corpus", corpus)]
  if fmt != "text":
    flags.append(("format", fmt))
  if fmt == "jsonl" and text_field != "text":
    flags.append(("text_field", text_field))
  flags += [("vocab_size", vocab_size), ("out", out_path)]
  args = " ".join(f"--{name}={shlex.quote(str(value))}" for name, value in flags)
  return f"python -m transformer_jax.tokenizer {args}"


def _sentences(texts: Iterable[str]) -> Iterator[str]:
  """Cuts documents into pieces of whole lines, newlines kept, of about _SENTENCE_CHARS."""
  buf, size = [], 0
  for text in texts:
    for line in text.splitlines(keepends=True):
      for start in range(0, len(line), _MAX_SENTENCE_CHARS):
        piece = line[start:start + _MAX_SENTENCE_CHARS]
        if size + len(piece) > _MAX_SENTENCE_CHARS:
          yield "".join(buf)
          buf, size = [], 0
        buf.append(piece)
        size += len(piece)
        if size >= _SENTENCE_CHARS:
          yield "".join(buf)
          buf, size = [], 0
  if buf:
    yield "".join(buf)


def sample_sentences(texts: Iterable[str], max_chars: int, seed: int = 0) -> list[str]:
  """A uniform sample (reservoir sampling) of about `max_chars` characters of sentences."""
  capacity = max(1, max_chars // _SENTENCE_CHARS)
  rng = random.Random(seed)
  reservoir = []
  for i, sentence in enumerate(_sentences(texts)):
    if i < capacity:
      reservoir.append(sentence)
    else:
      j = rng.randrange(i + 1)
      if j < capacity:
        reservoir[j] = sentence
  return reservoir


def _character_coverage(sentences: list[str], vocab_size: int) -> float:
  """The default coverage, lowered (not below 0.98) so the alphabet fits a small vocab."""
  counts = collections.Counter()
  for s in sentences:
    counts.update(s)
  freqs = sorted(counts.values(), reverse=True)
  total = sum(freqs)
  room = vocab_size - 4 - _NUM_BYTE_PIECES  # Pieces left after the specials and bytes.
  cumulative = list(itertools.accumulate(freqs))
  if room < 2 or room >= len(freqs) or cumulative[room - 1] / total >= 0.9995:
    return _DEFAULT_CHARACTER_COVERAGE
  # SentencePiece keeps taking the next most frequent character while the coverage so far
  # is below the target: a target between the coverage of room-1 and room characters keeps
  # exactly `room` of them.
  target = (cumulative[room - 2] + cumulative[room - 1]) / 2 / total
  return max(_MIN_CHARACTER_COVERAGE, min(_DEFAULT_CHARACTER_COVERAGE, target))


def _write_atomically(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".model")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it private.
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def train(texts: Iterable[str], vocab_size: int, out_path: str, *, max_chars: int = 5_000_000,
          seed: int = 0, num_threads: int | None = None) -> str:
  """Trains a BPE model on a sample of `texts` and writes it to `out_path` atomically.

  Args:
    texts: documents (any iterable; read once, keeping only a bounded reservoir sample).
    vocab_size: pieces in the model, specials and the 256 byte pieces included. A corpus too
      small to fill it gives a smaller vocabulary.
    out_path: the `.model` file to write; parent directories are created.
    max_chars: characters sampled for training.
    seed: seeds the sample.
    num_threads: trainer threads (default: all cores).

  Returns:
    out_path.
  """
  sentences = sample_sentences(texts, max_chars, seed)
  if not sentences:
    raise ConfigError("tokenizer: the corpus has no text to train on")
  model = _train_model(sentences, vocab_size, num_threads or os.cpu_count() or 1)
  _write_atomically(out_path, model)
  return out_path


def _train_model(sentences: list[str], vocab_size: int, num_threads: int) -> bytes:
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=writer,
        model_type=MODEL_TYPE,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=_character_coverage(sentences, vocab_size),
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=False,
        max_sentence_length=4 * _MAX_SENTENCE_CHARS,
        max_sentencepiece_length=16,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        num_threads=num_threads,
        minloglevel=2,
    )
  except RuntimeError as e:
    raise ConfigError(_training_error(e, vocab_size)) from None
  return writer.getvalue()


def _training_error(error: RuntimeError, vocab_size: int) -> str:
  """SentencePiece's failure as one line about --vocab_size."""
  message = re.sub(r"^.*\]\s*", "", _last_line(error))  # Drop "INTERNAL: file.cc(638) [cond]".
  needed = re.search(r"required_chars\. \d+ vs (\d+)", message)
  if needed:
    return (f"--vocab_size={vocab_size} is too small for this corpus: its characters and the "
            f"{_NUM_BYTE_PIECES} byte pieces need at least {needed.group(1)}")
  return f"tokenizer training failed with --vocab_size={vocab_size}: {message}"


def _last_line(error: Exception) -> str:
  return str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)


class Tokenizer:
  """A loaded SentencePiece model."""

  def __init__(self, model_proto: bytes):
    self._proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._skip = frozenset({PAD_ID, BOS_ID, EOS_ID})

  def __reduce__(self):  # Pickles as the model bytes (for worker processes).
    return Tokenizer, (self._proto,)

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no bos/eos added)."""
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad/bos/eos and ids outside the vocabulary are dropped."""
    n = self.vocab_size
    kept = [i for i in map(int, ids) if 0 <= i < n and i not in self._skip]
    return self._sp.decode(kept)


def load(path: str, *, corpus: str = "stdlib", vocab_size: int = 8192, fmt: str = "text",
         text_field: str = "text") -> Tokenizer:
  """Loads `path`; a missing or unreadable file raises ConfigError with the command to make it.

  The keyword arguments only fill in that command.
  """
  if not path or not os.path.isfile(path):
    command = create_command(path or "runs/tokenizers/tokenizer.model", corpus, vocab_size, fmt,
                             text_field)
    raise ConfigError(f"data.tokenizer={path!r} does not exist; create it with: {command}")
  with open(path, "rb") as f:
    proto = f.read()
  try:
    return Tokenizer(proto)
  except (RuntimeError, OSError) as e:
    raise ConfigError(f"data.tokenizer={path!r} is not a SentencePiece model ({_last_line(e)})") \
        from None
