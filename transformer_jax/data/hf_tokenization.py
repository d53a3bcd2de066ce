"""Hugging Face tokenizers (a `tokenizer.json`, e.g. GPT-2's byte-level BPE or Llama's), read
with the `tokenizers` library, behind the same interface as our SentencePiece `Tokenizer`
(data/tokenization.py), so the pipeline, the objectives and sampling take either.

`data.tokenizer` names the tokenizer.json or the directory holding it (an imported checkpoint's).
Text is encoded without the tokenizer's own special tokens (what transformers' fast tokenizer
gives with add_special_tokens=False, split_special_tokens=True): a special token's name written
in a document ("<|endoftext|>", "<extra_id_0>") is text, never that control id, as with
SentencePiece; the pipeline adds bos/eos where data.add_bos/add_eos say.
bos, eos, pad and unk are those of tokenizer_config.json (or of an older layout's
special_tokens_map.json) beside the file, as transformers reads them, else the special token
its post-processor puts before the text (bos) or after it (eos: BERT's [CLS] and [SEP]), else
the usual names among its special tokens; -1 where there is none. No id is assumed to be
padding: packed rows mark padding with segment id 0 and weight 0, whatever token id fills it.
An encoder-decoder's decoder start is the decoder_start_token_id of a generation_config.json
beside the file (what `convert import` writes into its copy of a T5 checkpoint's tokenizer),
else bos, else pad (objectives.decoder_start).
`from_sentencepiece` writes our SentencePiece model as such a tokenizer (convert export).
"""

import json

import tokenizers

from transformer_jax.config import paths

FILE = "tokenizer.json"
# beside FILE: the decoder_start_token_id of the checkpoint the tokenizer came with
GENERATION = "generation_config.json"
_NAMES = {"bos": ("<|begin_of_text|>", "<s>", "<bos>", "<|endoftext|>"),
          "eos": ("<|end_of_text|>", "</s>", "<eos>", "<|endoftext|>"),
          "pad": ("<pad>", "[PAD]", "<|pad|>"), "unk": ("<unk>", "[UNK]", "<|unk|>")}
# The keys of tokenizer_config.json that the ids depend on (HFTokenizer reads no other, but for
# decode's clean_up_tokenization_spaces)
SPECIAL_KEYS = frozenset(f"{role}_token" for role in _NAMES)
# transformers' clean_up_tokenization: decode's last step where tokenizer_config.json says
# clean_up_tokenization_spaces (BERT's does), for any model but BPE (whose spaces it would take)
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def path_of(path: str) -> str:
  """The tokenizer.json of `path` (the file, or a directory holding one)."""
  return paths.join(path, FILE) if paths.isdir(path) else path  # local or gs://


def is_hf(path: str) -> bool:
  """Whether `path` is a Hugging Face tokenizer (a .json file, or a directory with FILE)."""
  return path.endswith(".json") or paths.isfile(paths.join(path, FILE))


class HFTokenizer:
  """A loaded tokenizer.json (+ the special tokens of tokenizer_config.json beside it)."""

  def __init__(self, data: str, config: dict | None = None, decoder_start: int = -1):
    self._data, self._config = data, dict(config or {})
    self.decoder_start_id = decoder_start  # -1: none named (bos, else pad)
    self._tok = _backend(data)
    self._after = None  # encode_after's, made when first asked for
    # the highest id + 1 (a vocabulary with gaps in its ids has fewer tokens than that)
    self._size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    spec = json.loads(data)
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    self._special_ids = frozenset(specials.values())
    self._ids = {role: self._special(role, specials, spec.get("post_processor"))
                 for role in _NAMES}
    self._skip = frozenset(i for i in (self.pad_id, self.bos_id, self.eos_id) if i >= 0)
    self._clean_up = (self._config.get("clean_up_tokenization_spaces") is True
                      and spec.get("model", {}).get("type") != "BPE")

  def __reduce__(self):  # pickles as its text (grain worker processes)
    return HFTokenizer, (self._data, self._config, self.decoder_start_id)

  def _special(self, role: str, specials: dict, post_processor) -> int:
    named = self._config.get(f"{role}_token")
    if isinstance(named, dict):
      named = named.get("content")
    if named:
      return self.piece_id(named)
    if f"{role}_token" in self._config:  # "bos_token": null says there is none (Qwen2's)
      return -1
    if role in ("bos", "eos") and isinstance(post_processor, dict):
      # TemplateProcessing: bos is the special token before the text ("<s> $A", BERT's
      # "[CLS] $A [SEP]"), eos the one after it ("$A </s>", T5's; BERT's [SEP])
      parts = post_processor.get("single", [])
      text = next((k for k, part in enumerate(parts) if "Sequence" in part), len(parts))
      side = parts[:text] if role == "bos" else parts[text + 1:]
      found = [part["SpecialToken"]["id"] for part in side if "SpecialToken" in part]
      if found:
        return self.piece_id(found[0])
    return next((specials[n] for n in _NAMES[role] if n in specials), -1)

  @property
  def vocab_size(self) -> int:
    return self._size

  @property
  def pad_id(self) -> int:
    return self._ids["pad"]

  @property
  def unk_id(self) -> int:
    return self._ids["unk"]

  @property
  def bos_id(self) -> int:
    return self._ids["bos"]

  @property
  def eos_id(self) -> int:
    return self._ids["eos"]

  def piece_id(self, piece: str) -> int:
    i = self._tok.token_to_id(piece)
    return -1 if i is None else i

  @property
  def mask_id(self) -> int:
    return max(self.piece_id("[MASK]"), self.piece_id("<mask>"))

  @property
  def sentinel_ids(self) -> list[int]:
    ids = []
    while (i := self.piece_id(f"<extra_id_{len(ids)}>")) >= 0:
      ids.append(i)
    return ids

  @property
  def mode_ids(self) -> list[int]:
    return [self.piece_id(p) for p in ("[R]", "[S]", "[X]")]

  def pieces(self) -> list[str]:
    """Each id's text as it reads after other text (its bytes decoded; a partial UTF-8 piece
    shows U+FFFD): a word-initial piece starts with its space. Alone, an id decodes without it
    wherever the decoder strips a text's leading space (Llama's and T5's Metaspace) or joins
    words with spaces (BERT's WordPiece), and no piece would start a word."""
    ref, alone = self.encode("a")[:1], lambda i: self._tok.decode([i], skip_special_tokens=False)
    head = self._tok.decode(ref, skip_special_tokens=False)
    after = self._tok.decode_batch([ref + [i] for i in range(self.vocab_size)],
                                   skip_special_tokens=False)
    return [a[len(head):] if a.startswith(head) else alone(i) for i, a in enumerate(after)]

  def is_normal(self, i: int) -> bool:
    """Ordinary text: not a special token, the unknown token, nor an id with no token (a
    gap), as SentencePiece's `is_normal` leaves out control, unknown and unused pieces."""
    return (i not in self._special_ids and i != self.unk_id
            and self._tok.id_to_token(i) is not None)

  def adds_bos(self) -> bool:
    """Whether the tokenizer puts its bos first when it adds special tokens (transformers'
    default, and what the checkpoint's documents began with): Llama's and BERT's templates do,
    GPT-2's byte-level post-processor adds nothing."""
    special = self._tok.encode("a", add_special_tokens=True).ids
    return self.bos_id >= 0 and special[:1] == [self.bos_id] != self.encode("a")[:1]

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_after(self, text: str) -> list[int]:
    """`text`'s ids as a section that follows other text in one input (after a control piece
    of a prompt): a Metaspace pre-tokenizer that puts its "▁" before the input's first section
    only (prepend_scheme "first": Llama-2's and Mistral's, legacy off) puts none here, as
    transformers encodes the whole prompt."""
    if self._after is None:
      spec = json.loads(self._data)
      self._after = _backend(json.dumps(spec)) if _no_first_prepend(
          spec.get("pre_tokenizer")) else self._tok
    return self._after.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    """Text of `ids`, special tokens ([MASK], sentinels, ...) and ids outside the vocabulary
    dropped, as SentencePiece drops its control pieces (and transformers' text generation and
    lm-eval decode with skip_special_tokens), spaces cleaned up as transformers does ("don ' t"
    -> "don't" for BERT's WordPiece: _CLEAN_UP)."""
    n = self.vocab_size
    kept = [i for i in map(int, ids) if 0 <= i < n and i not in self._skip]
    text = self._tok.decode(kept, skip_special_tokens=True)
    for spaced, joined in _CLEAN_UP if self._clean_up else ():
      text = text.replace(spaced, joined)
    return text


def _backend(data: str) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer.from_str(data)
  tok.encode_special_tokens = True  # a special token's name in the text is text
  # A file saved with truncation or padding on would cut every document to its max_length and
  # pad encode_batch's rows (transformers turns both off on each call unless asked).
  tok.no_truncation()
  tok.no_padding()
  return tok


def _no_first_prepend(pre) -> bool:
  """Turns a Metaspace's prepend_scheme "first" (in `pre`, a tokenizer.json pre_tokenizer, or
  a Sequence of them) to "never", in place; whether there was one."""
  if not isinstance(pre, dict):
    return False
  if pre.get("type") == "Sequence":
    return any([_no_first_prepend(p) for p in pre.get("pretokenizers", [])])
  if pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first":
    pre["prepend_scheme"] = "never"
    return True
  return False


def config_beside(path: str) -> dict:
  """tokenizer_config.json beside the tokenizer.json of `path` ({} if none), with the tokens of
  a special_tokens_map.json there over its own where it has no added_tokens_decoder (the older
  layout, in which transformers reads the map, and the map wins)."""
  folder = paths.dirname(path_of(path))
  config_file, map_file = (paths.join(folder, name) for name in (
      "tokenizer_config.json", "special_tokens_map.json"))
  config = json.loads(paths.read_text(config_file)) if paths.isfile(config_file) else {}
  if "added_tokens_decoder" not in config and paths.isfile(map_file):
    config.update({k: v for k, v in json.loads(paths.read_text(map_file)).items()
                   if k.endswith("_token")})
  return config


def decoder_start_beside(path: str) -> int:
  """The decoder_start_token_id of the GENERATION file beside the tokenizer.json of `path`, or
  -1."""
  file = paths.join(paths.dirname(path_of(path)), GENERATION)
  start = json.loads(paths.read_text(file)).get("decoder_start_token_id") if paths.isfile(
      file) else None
  return start if isinstance(start, int) and start >= 0 else -1


def load(path: str) -> HFTokenizer:
  """The tokenizer at `path` (tokenizer.json or its directory), with config_beside's special
  tokens and decoder_start_beside's start."""
  return HFTokenizer(paths.read_text(path_of(path)), config_beside(path),
                     decoder_start_beside(path))


def for_export(data: str, config: dict, before: list[int], after: list[int]) -> tuple[str, dict]:
  """(tokenizer.json, tokenizer_config.json dict) as an export writes them from `data` and
  `config`: a tokenizer without a post-processor (ours, train_byte_level's) gets one that puts
  the ids `before` and `after` the text when it adds special tokens, as training framed it (bos
  first with data.add_bos; an encoder-decoder's source eos too: T5's "<s> $A </s>"; GPT-2's,
  Llama's, BERT's, T5's own keep theirs). One with a mask or sentinels reads their names in a
  text as those tokens (split_special_tokens off, as transformers' own BERT and T5 tokenizers
  do: its fill-mask pipeline needs that, and `sample` reads a prompt's [MASK] and <extra_id_N>
  so); the names of the others then read as their tokens too."""
  config, ours = dict(config), HFTokenizer(data, config)
  if config.get("split_special_tokens") and (ours.mask_id >= 0 or ours.sentinel_ids):
    config["split_special_tokens"] = False
  if json.loads(data).get("post_processor") is not None or not before + after:
    return data, config
  tok = tokenizers.Tokenizer.from_str(data)
  pieces = lambda ids: [tok.id_to_token(i) for i in ids]
  single = [*pieces(before), "$A", *pieces(after)]
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single=" ".join(single), pair=" ".join(single + ["$B", *pieces(after)]),
      special_tokens=[(tok.id_to_token(i), i) for i in dict.fromkeys(before + after)])
  return tok.to_str(), config


BYTE_LEVEL_SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 of a trained byte-level BPE


def byte_level_vocab_error(vocab_size: int, control: list) -> str:
  """Why `vocab_size` cannot hold a byte-level BPE's bytes and special tokens, or ""."""
  need = len(BYTE_LEVEL_SPECIALS) + len(control) + 256
  return (f"--vocab_size={vocab_size} is too small for a byte-level BPE: its 256 bytes and "
          f"{need - 256} special tokens need at least {need}") if vocab_size < need else ""


def train_byte_level(sentences, vocab_size: int, control: list) -> dict[str, str]:
  """{file name: text}: a byte-level BPE tokenizer.json (GPT-2's pre-tokenizer, regex and
  decoder: every string round-trips and nothing is unknown) trained with the `tokenizers`
  library on `sentences`, and its tokenizer_config.json. Ids: <pad> 0, <s> 1 (bos), </s> 2
  (eos), the `control` pieces (special tokens: their names in a text stay text, as
  SentencePiece's control symbols), the 256 bytes, then the merges; `vocab_size` counts them
  all."""
  pre = tokenizers.pre_tokenizers
  specials = [*BYTE_LEVEL_SPECIALS, *control]
  if too_small := byte_level_vocab_error(vocab_size, control):
    raise ValueError(too_small)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  tok.train_from_iterator(sentences, tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre.ByteLevel.alphabet(),
      show_progress=False))
  config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": None}
  if "[MASK]" in control:
    config["mask_token"] = "[MASK]"
  config.update(tokenizer_class="PreTrainedTokenizerFast", split_special_tokens=True,
                clean_up_tokenization_spaces=False)
  return {FILE: tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=1)}


def from_sentencepiece(model_proto: bytes, max_len: int, before: list[int],
                       after: list[int]) -> dict[str, str]:
  """{file name: text}: a tokenizer.json and tokenizer_config.json that transformers'
  AutoTokenizer (and `load`) read as the SentencePiece BPE model `model_proto` (ours: identity
  normalization, no dummy prefix, byte fallback): a space is U+2581, the merges come in the
  merged pieces' score order (ties as transformers' converter orders them), control pieces are
  special tokens, and encoding with special tokens puts the ids `before` and `after` the text,
  as training framed it (for_export, which also says how a special token's name in a text
  reads). Encoding plain text without them gives SentencePiece's ids (tests/test_convert.py)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor(model_proto=model_proto)
  vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
  special = [i for i in vocab.values() if sp.is_control(i) or sp.is_unknown(i)]
  normal = {p: i for p, i in vocab.items() if i not in special and not sp.is_byte(i)}
  merges = sorted(((p[:k], p[k:], i) for p, i in normal.items() for k in range(1, len(p))
                   if p[:k] in normal and p[k:] in normal),
                  key=lambda m: (m[2], len(m[0]), len(m[1]), vocab[m[0]], vocab[m[1]]))
  models, decoders = tokenizers.models, tokenizers.decoders
  tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[m[:2] for m in merges],
                                        unk_token=sp.id_to_piece(sp.unk_id()),
                                        byte_fallback=True))
  tok.normalizer = tokenizers.normalizers.Replace(" ", "\u2581")
  tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  tok.add_special_tokens([tokenizers.AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                          for i in special])
  roles = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
  config = {f"{role}_token": sp.id_to_piece(i) for role, i in roles.items() if i >= 0}
  if "[MASK]" in vocab:
    config["mask_token"] = "[MASK]"
  # a control piece's name in the text is text, as SentencePiece and training read it (but
  # for_export's mask and sentinels), and decoding keeps spaces before punctuation
  config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=max_len,
                split_special_tokens=True, clean_up_tokenization_spaces=False)
  data, config = for_export(tok.to_str(), config, before, after)
  return {FILE: data, "tokenizer_config.json": json.dumps(config, indent=1)}
