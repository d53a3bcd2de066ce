"""A SentencePiece BPE tokenizer for code and prose: training and loading (and, for an output
named tokenizer.json, a byte-level BPE of the `tokenizers` library: hf_tokenization.py).

The model keeps text exactly: identity normalization, no dummy prefix, no whitespace
collapsing, so `decode(encode(x)) == x` for any string, tabs, runs of spaces and blank lines
included, but for U+2581 ("▁"): SentencePiece's own mark for a space, it decodes as " ". Runs
of spaces (indentation) may become single pieces and pieces may contain newlines; characters
outside the learned alphabet fall back to their UTF-8 bytes, so nothing is ever <unk>. Special ids: pad=0, unk=1, bos=2, eos=3.

Pretraining objectives other than causal LM need extra pieces, added at training time with
`special` (`--special=` on the command line, a comma-separated list of groups):

  mask           [MASK]                              (mlm, denoise)
  sentinels[:N]  <extra_id_0> .. <extra_id_{N-1}>    (span, ul2; N = 100 as in T5 by default)
  ul2            [R] [S] [X], the UL2 mode tokens     (ul2)

They are SentencePiece *control* symbols, not user-defined ones: encoding never produces them, so
the text "[X]" or "[MASK]" in a corpus stays ordinary text (code is full of `a[X]`); they get the
ids right after eos (4, 5, ...) and decode to nothing.

BPE rather than unigram: on the stdlib corpus it trains ~8x faster (about 1 s for 4 MB) and
compresses slightly better (about 2.5% fewer tokens at 8192 pieces).

A `.model` file is a SentencePiece protobuf: loading it runs no code.
"""

import collections
import heapq
import io
import itertools
import os
import posixpath
import random
import re
import shlex
import tempfile
from collections.abc import Iterable, Iterator

import sentencepiece as spm

from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import hf_tokenization

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPE = "bpe"
_NUM_BYTE_PIECES = 256
_MIN_CHARACTER_COVERAGE = 0.98  # SentencePiece rejects less.
_DEFAULT_CHARACTER_COVERAGE = 0.9995
_SENTENCE_CHARS = 1000  # Training "sentences" are runs of whole lines about this long ...
_MAX_SENTENCE_CHARS = 4000  # ... and never longer than this (<= 16000 UTF-8 bytes).
MASK_PIECE = "[MASK]"
MODE_PIECES = ("[R]", "[S]", "[X]")  # UL2's regular, sequential and extreme denoisers.
DEFAULT_SENTINELS = 100


def sentinel_piece(i: int) -> str:
  return f"<extra_id_{i}>"


def special_pieces(spec: str) -> list[str]:
  """The control pieces of a `--special` list, e.g. "mask,sentinels:100,ul2" ("" = none)."""
  pieces = []
  for group in filter(None, (g.strip() for g in spec.split(","))):
    name, _, count = group.partition(":")
    if name == "sentinels" and (not count or count.isdigit() and int(count) > 0):
      pieces += [sentinel_piece(i) for i in range(int(count or DEFAULT_SENTINELS))]
    elif name in ("mask", "ul2") and not count:
      pieces += [MASK_PIECE] if name == "mask" else list(MODE_PIECES)
    else:
      raise ConfigError(f"--special: unknown group {group!r}; use mask, sentinels[:N], ul2")
  return list(dict.fromkeys(pieces))


_CONTROL = r"\[MASK\]|<mask>|<extra_id_\d+>|\[[RSX]\]"


def with_control_pieces(tok, text: str) -> list[int]:
  """Ids of `text` where the control pieces ([MASK], <extra_id_N>, [R]/[S]/[X]) written in it
  become their ids, as a prompt means them (encoding plain text never produces them): [MASK]
  is the tokenizer's mask whatever its piece (RoBERTa's <mask>, which is read too). Text after
  the start is encoded as a later section of one input (HFTokenizer.encode_after)."""
  ids, at = [], 0
  for part in re.split(f"({_CONTROL})", text):
    if part:
      piece = -1 if not re.fullmatch(_CONTROL, part) else (
          tok.mask_id if part == "[MASK]" else tok.piece_id(part))
      ids += [piece] if piece >= 0 else (
          getattr(tok, "encode_after", tok.encode)(part) if at else tok.encode(part))
    at += len(part)
  return ids


SENTENCEPIECE_PATH = "runs/tokenizers/tokenizer.model"  # where advice puts a new model


def create_command(out_path: str, corpus: str = "stdlib", vocab_size: int = 8192,
                   fmt: str = "text", text_field: str = "text", special: str = "",
                   source_field: str = "source", target_field: str = "target",
                   data_dir: str = "") -> str:
  """The shell command that trains the tokenizer `out_path` should hold: the corpus flags that
  differ from the CLI's defaults and matter for this corpus and format."""
  catalog = corpus.startswith("tfds:")
  flags = [("corpus", corpus)]
  if fmt != "text":
    flags.append(("format", fmt))
  if (fmt == "jsonl" or catalog) and text_field != "text":
    flags.append(("text_field", text_field))
  if fmt == "jsonl_pairs" or catalog:
    flags += [(k, v) for k, v, default in (("source_field", source_field, "source"),
                                           ("target_field", target_field, "target")) if v != default]
  if catalog and data_dir:
    flags.append(("data_dir", data_dir))
  flags.append(("vocab_size", vocab_size))
  if special:
    flags.append(("special", special))
  flags.append(("out", out_path))
  args = " ".join(f"--{name}={shlex.quote(str(value))}" for name, value in flags)
  return f"python -m transformer_jax.tokenizer {args}"


def _sentences(texts: Iterable[str]) -> Iterator[str]:
  """Cuts documents into pieces of whole lines, newlines kept, of about _SENTENCE_CHARS; a
  piece never runs from one document into the next (glued, "abc" + "def" would teach "abcdef")."""
  for text in texts:
    buf, size = [], 0
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
  """A uniform sample of sentences holding at most `max_chars` characters (all of them if they
  fit): each sentence draws a random key and the sample is the run of smallest keys that fits,
  kept in a heap as the text streams by (characters counted, not sentences: long lines would
  have taken up to 4x the budget, and a mixture's shares would have followed line lengths)."""
  return _sample(_sentences(texts), max_chars, seed)[0]


def sample_mixture(texts: list[Iterable[str]], shares: list[float], max_chars: int,
                   seed: int = 0) -> list[str]:
  """Each source's share of `max_chars`, sampled from it alone (sample_sentences). A source
  with fewer characters than its share is repeated up to it, whole copies then a sample of one
  more, as training's mixture reads it more epochs: the shares hold whatever the sizes."""
  sentences = []
  for i, (text, share) in enumerate(zip(texts, shares)):
    budget = max(1, int(max_chars * share))
    got, whole = _sample(_sentences(text), budget, seed + i)
    have = sum(map(len, got))
    if whole and 0 < have < budget:
      copies, rest = divmod(budget, have)
      got = got * copies + _sample(iter(got), rest, seed + i)[0]
    sentences += got
  return sentences


def _sample(sentences: Iterable[str], max_chars: int, seed: int) -> tuple[list[str], bool]:
  """sample_sentences' sample of `sentences`, and whether it holds all of them."""
  rng = random.Random(seed)
  heap, total, cutoff = [], 0, float("inf")  # max-heap by key (negated); keys >= cutoff lost
  for i, sentence in enumerate(sentences):
    key = rng.random()
    if key >= cutoff:
      continue
    heapq.heappush(heap, (-key, i, sentence))
    total += len(sentence)
    while total > max_chars and len(heap) > 1:
      neg, _, dropped = heapq.heappop(heap)
      total -= len(dropped)
      cutoff = min(cutoff, -neg)
  return [sentence for _, _, sentence in sorted(heap, key=lambda e: e[1])], cutoff == float("inf")


def _character_coverage(sentences: list[str], vocab_size: int, num_special: int = 0) -> float:
  """The default coverage, lowered (not below 0.98) so the alphabet fits a small vocab."""
  counts = collections.Counter()
  for s in sentences:
    counts.update(s)
  freqs = sorted(counts.values(), reverse=True)
  total = sum(freqs)
  room = vocab_size - 4 - num_special - _NUM_BYTE_PIECES  # Left after specials and bytes.
  cumulative = list(itertools.accumulate(freqs))
  if room < 2 or room >= len(freqs) or cumulative[room - 1] / total >= 0.9995:
    return _DEFAULT_CHARACTER_COVERAGE
  # SentencePiece keeps taking the next most frequent character while the coverage so far
  # is below the target: a target between the coverage of room-1 and room characters keeps
  # exactly `room` of them.
  target = (cumulative[room - 2] + cumulative[room - 1]) / 2 / total
  return max(_MIN_CHARACTER_COVERAGE, min(_DEFAULT_CHARACTER_COVERAGE, target))


def _write_atomically(path: str, data: bytes) -> None:
  if paths.is_remote(path):  # an object is written whole or not at all
    paths.path(path).write_bytes(data)
    return
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
          seed: int = 0, num_threads: int | None = None, special: str = "",
          shares=None) -> str:
  """Trains a BPE model on a sample of `texts` and writes it to `out_path` atomically.

  Args:
    texts: documents (any iterable; read once, keeping only a bounded reservoir sample); with
      `shares`, one such iterable per source of a mixture, sampled for its share of max_chars
      (sample_mixture: a source short of its share is repeated up to it).
    vocab_size: pieces in the model, specials and the 256 byte pieces included. A corpus too
      small to fill it gives a smaller vocabulary.
    out_path: the `.model` file to write, or DIR/tokenizer.json for a byte-level BPE of the
      `tokenizers` library (hf_tokenization.train_byte_level; tokenizer_config.json is written
      beside it); parent directories are created.
    max_chars: characters sampled for training.
    seed: seeds the sample.
    num_threads: trainer threads (default: all cores).
    special: extra control pieces for other objectives, e.g. "mask,sentinels:100,ul2" (see the
      module docstring); they count in vocab_size.

  Returns:
    out_path.
  """
  control = special_pieces(special)
  if shares is None:
    sentences = sample_sentences(texts, max_chars, seed)
  else:
    sentences = sample_mixture(texts, shares, max_chars, seed)
  if not sentences:
    raise ConfigError("tokenizer: the corpus has no text to train on")
  if not is_byte_level_out(out_path):
    model = _train_model(sentences, vocab_size, num_threads or os.cpu_count() or 1, control)
    _write_atomically(out_path, model)
    return out_path
  try:
    files = hf_tokenization.train_byte_level(sentences, vocab_size, control)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for name in ("tokenizer_config.json", hf_tokenization.FILE):  # the one loads look for last
    _write_atomically(paths.join(paths.dirname(out_path), name), files[name].encode("utf-8"))
  return out_path


def is_byte_level_out(out_path: str) -> bool:
  """Whether `train` writes `out_path` as a byte-level BPE tokenizer.json (its name is
  tokenizer.json: tokenizer_config.json goes beside it), not a SentencePiece model."""
  return posixpath.basename(os.fspath(out_path)) == hf_tokenization.FILE


def _train_model(sentences: list[str], vocab_size: int, num_threads: int,
                 control: list[str]) -> bytes:
  writer = io.BytesIO()
  extra = {"control_symbols": control} if control else {}
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=writer,
        model_type=MODEL_TYPE,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=_character_coverage(sentences, vocab_size, len(control)),
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
        **extra,
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
    sp = self._sp  # the model's own pad/bos/eos (another's, e.g. Llama's, are not ours)
    self._skip = frozenset(i for i in (sp.pad_id(), sp.bos_id(), sp.eos_id()) if i >= 0)

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

  def piece_id(self, piece: str) -> int:
    """The id of `piece`, or -1 if the model has no such piece."""
    i = self._sp.piece_to_id(piece)
    return i if self._sp.id_to_piece(i) == piece else -1

  @property
  def mask_id(self) -> int:
    return self.piece_id(MASK_PIECE)

  @property
  def sentinel_ids(self) -> list[int]:
    """The ids of <extra_id_0>, <extra_id_1>, ... (as many as the model has, in order)."""
    ids = []
    while (i := self.piece_id(sentinel_piece(len(ids)))) >= 0:
      ids.append(i)
    return ids

  @property
  def mode_ids(self) -> list[int]:
    """The ids of [R], [S], [X] (-1 where missing)."""
    return [self.piece_id(p) for p in MODE_PIECES]

  def pieces(self) -> list[str]:
    """Every piece, by id."""
    return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

  def is_normal(self, i: int) -> bool:
    """Whether id `i` is ordinary text (not a control, unknown or unused piece)."""
    sp = self._sp
    return not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no bos/eos added)."""
    return self._sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self._sp.encode(texts, num_threads=os.cpu_count())

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad/bos/eos and ids outside the vocabulary are dropped."""
    n = self.vocab_size
    kept = [i for i in map(int, ids) if 0 <= i < n and i not in self._skip]
    return self._sp.decode(kept)


def tokenizer_file(path: str) -> str:
  """The file holding the tokenizer of `path` (a Hugging Face tokenizer's directory: its
  tokenizer.json)."""
  return hf_tokenization.path_of(path) if hf_tokenization.is_hf(path) else path


def parse(data: bytes, path: str):
  """The tokenizer whose file content is `data`, read as the kind `path` names."""
  if hf_tokenization.is_hf(path):
    return hf_tokenization.HFTokenizer(data.decode("utf-8"), hf_tokenization.config_beside(path))
  return Tokenizer(data)


def load(path: str, **command):
  """Loads `path`: a SentencePiece .model, or a Hugging Face tokenizer.json (or a directory with
  one: data/hf_tokenization.py). A missing or unreadable file raises ConfigError with the
  command to make one. The keyword arguments only fill in that command (`create_command`'s).
  """
  if path and hf_tokenization.is_hf(path) and paths.isfile(tokenizer_file(path)):
    try:
      return hf_tokenization.load(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ConfigError(f"data.tokenizer={path!r} is not a Hugging Face tokenizer.json "
                        f"({_last_line(e)})") from None
  if path and is_byte_level_out(path):
    raise ConfigError(f"data.tokenizer={path!r} does not exist; train a byte-level BPE there "
                      f"with: {create_command(path, **command)} (or `python -m "
                      f"transformer_jax.convert import` copies a checkpoint's)")
  if path and (path.endswith(".json") or paths.isdir(path)):  # a tokenizer.json is no model
    command = create_command(SENTENCEPIECE_PATH, **command)
    raise ConfigError(f"data.tokenizer={path!r} holds no Hugging Face {hf_tokenization.FILE} "
                      f"(`python -m transformer_jax.convert import` copies a checkpoint's); or "
                      f"set data.tokenizer={SENTENCEPIECE_PATH} and make that with: {command}")
  if not path or not paths.isfile(path):  # a local file or a gs:// object
    command = create_command(path or SENTENCEPIECE_PATH, **command)
    raise ConfigError(f"data.tokenizer={path!r} does not exist; create it with: {command}")
  proto = paths.path(path).read_bytes()
  if not proto:  # SentencePiece would take it as a model without pieces
    raise ConfigError(f"data.tokenizer={path!r} is not a SentencePiece model (the file is empty)")
  try:
    tok = Tokenizer(proto)
  except (RuntimeError, OSError) as e:
    raise ConfigError(f"data.tokenizer={path!r} is not a SentencePiece model ({_last_line(e)})") \
        from None
  if not tok.vocab_size:
    raise ConfigError(f"data.tokenizer={path!r} is not a SentencePiece model (it has no pieces)")
  return tok
