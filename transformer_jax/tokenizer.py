"""Trains the tokenizer a config's `data.tokenizer` points at: SentencePiece, or byte-level BPE.

  python -m transformer_jax.tokenizer --corpus=stdlib --vocab_size=8192 \\
      --out=runs/tokenizers/stdlib_8192.model

writes a SentencePiece BPE model (data/tokenization.py); an --out named tokenizer.json (e.g.
--out=runs/tokenizers/bpe_8192/tokenizer.json) a byte-level BPE of Hugging Face's `tokenizers`
library instead (GPT-2's pre-tokenizer and decoder; <pad> <s> </s> first), with the
tokenizer_config.json that transformers' AutoTokenizer reads beside it.

--corpus is "stdlib", a glob of files (quote it) or tfds:NAME (a TFDS catalog dataset's train
split, prepared under --data_dir; with --config, its data.data_dir); --format is text (a
document per file), lines (a document per line) or jsonl (a document per line, text in
--text_field), or a pair format (tsv, jsonl_pairs with --source_field/--target_field,
functions) whose sources and targets are read as documents. --special adds
the control pieces other pretraining objectives need (e.g. --special=mask,sentinels:100,ul2 for
data.objective = mlm, span, denoise or ul2; see data/tokenization.py). Prints the
model path, its vocabulary size and the average characters per token on a sample of the
corpus. Bad input prints one line and exits with status 2.

  python -m transformer_jax.tokenizer --config=configs/t5.py:tiny [--config.KEY=VALUE ...]
      [--if_missing]

trains the tokenizer a training config names (data.tokenizer, from its data.corpus, with
model.vocab_size pieces and the control pieces its data.objective needs); --if_missing does
nothing when that file exists (what launch/local.sh runs before training). An existing --out is
refused without --overwrite: the runs trained with it need it as it is. --workdir=DIR in
place of --config reads the config DIR/config.json saved (a sweep plan's run, a run to resume).
"""

import os
import sys
import time

from transformer_jax import cli
from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import hf_tokenization
from transformer_jax.data import mixture
from transformer_jax.data import tokenization as tokenizer_lib

_SAMPLE_EVERY = 10  # Measure characters/token on every 10th document ...
_SAMPLE_CHARS = 1_000_000  # ... up to this many characters.


FLAGS = {  # name -> default (its type is the flag's); "" / 0 = not given
    "if_missing": False,  # skip when the output exists
    "overwrite": False,  # replace an existing output (else refused: runs may depend on it)
    "corpus": "",  # "stdlib", a glob of files or tfds:NAME
    "format": "text",  # text | lines | jsonl | tsv | jsonl_pairs | functions
    "text_field": "text",  # the JSONL field holding the text
    "source_field": "source", "target_field": "target",  # jsonl_pairs / TFDS pair fields
    "data_dir": "",  # where a tfds: corpus is prepared ("" = TFDS's default)
    "vocab_size": 0,  # pieces, specials included
    "out": "",  # the .model file to write (DIR/tokenizer.json: a byte-level BPE)
    "special": "",  # extra pieces: comma-separated mask, sentinels[:N], ul2
    "max_chars": 5_000_000,  # characters sampled to train
    "workdir": "",  # without --config: the config saved in WORKDIR/config.json
}


def chars_per_token(tok: tokenizer_lib.Tokenizer, docs) -> float:
  """Average characters per token over every _SAMPLE_EVERY-th document (bounded)."""
  chars = tokens = 0
  for i, (_, text) in enumerate(docs):
    if i % _SAMPLE_EVERY:
      continue
    chars += len(text)
    tokens += len(tok.encode(text))
    if chars >= _SAMPLE_CHARS:
      break
  return chars / max(tokens, 1)


# What a training config sets (from_config); given beside --config they would be ignored.
FROM_CONFIG = ("corpus", "format", "text_field", "source_field", "target_field", "data_dir",
               "vocab_size", "out")


def from_config(spec: str, overrides, flags: dict) -> dict:
  """`flags` with corpus, format, fields, vocab_size, out and special from a training config
  (--config, or the one saved in --workdir)."""
  from transformer_jax.data import objectives  # pylint: disable=g-import-not-at-top
  c = _training_config(spec, overrides, flags)
  d = c.data
  mixed = [(src.probability, _corpus_flags(src.config.data)) for src in mixture.sources(c)]
  return dict(flags, mixture=mixed, corpus=d.corpus, format=d.format, text_field=d.text_field,
              source_field=d.source_field, target_field=d.target_field, data_dir=d.data_dir,
              vocab_size=c.model.vocab_size, out=d.tokenizer,
              special=flags["special"] or objectives.special_for(d))


def _training_config(spec: str, overrides, flags: dict):
  """The config of --config (or --workdir's saved one); flags it sets are refused beside it."""
  given = [f"--{k}" for k in FROM_CONFIG if flags[k] != FLAGS[k]]
  if given:
    raise ConfigError(f"{', '.join(given)} come(s) from --config (data.* and model.vocab_size); "
                      f"set them as --config.KEY=VALUE instead")
  return cli.load_config(spec, overrides, flags["workdir"])


def _corpus_flags(d) -> dict:
  """tfds_text.documents' keywords from data.* keys (or this command's flags)."""
  return dict(corpus=d["corpus"], fmt=d["format"], text_field=d["text_field"],
              source_field=d["source_field"], target_field=d["target_field"],
              data_dir=d["data_dir"])


def run(args: dict) -> None:
  """Trains, writes and reports."""
  missing = [f"--{k}" for k in ("corpus", "vocab_size", "out") if not args[k]]
  if missing:
    raise ConfigError(f"{', '.join(missing)} required (or --config=FILE.py[:ARG])")
  if args["vocab_size"] <= 0:
    raise ConfigError(f"--vocab_size={args['vocab_size']} must be positive")
  out = args["out"]
  if (paths.isdir(out) or out.endswith(("/", os.sep))
      or out.endswith(".json") and not tokenizer_lib.is_byte_level_out(out)):
    raise ConfigError(f"--out={out} is a directory or a .json name other than tokenizer.json; "
                      f"this command writes a SentencePiece model file (e.g. "
                      f"--out=runs/tokenizers/tokenizer.model) or a byte-level BPE "
                      f"(--out=runs/tokenizers/bpe/tokenizer.json)")
  if paths.exists(out) and not args.get("overwrite"):
    raise ConfigError(f"--out={out} already exists (the runs trained with it need it as it "
                      f"is): choose another --out, or --overwrite to replace it")
  cli.output_folder("out", paths.dirname(paths.abspath(out)))  # (a traceback at the end)
  sources = args.get("mixture") or [(1.0, _corpus_flags(args))]
  for _, corpus_flags in sources:  # (--config's, or this command's flags)
    corpus_lib.check_format(corpus_flags["fmt"], "data.format" if args.get("mixture") else
                            "--format")
  control = tokenizer_lib.special_pieces(args['special'])  # before reading the corpus
  if tokenizer_lib.is_byte_level_out(out) and (
      too_small := hf_tokenization.byte_level_vocab_error(args["vocab_size"], control)):
    raise ConfigError(too_small)

  from transformer_jax.data import tfds_text  # pylint: disable=g-import-not-at-top

  def docs(corpus_flags=sources[0][1]):
    return tfds_text.documents(**corpus_flags)

  start = time.time()
  texts = [(text for _, text in docs(flags)) for _, flags in sources]
  tokenizer_lib.train(texts if len(sources) > 1 else texts[0], args['vocab_size'], out,
                      max_chars=args['max_chars'], special=args['special'],
                      shares=[share for share, _ in sources] if len(sources) > 1 else None)
  seconds = time.time() - start
  tok = tokenizer_lib.load(out)
  print(f"wrote {out}")
  print(f"vocab_size {tok.vocab_size}")
  if tok.vocab_size < args["vocab_size"]:
    print(f"note: asked for {args['vocab_size']} pieces, made {tok.vocab_size}: the corpus has no "
          f"more distinct pieces to learn (training stops there). A model needs "
          f"model.vocab_size >= {tok.vocab_size}; more text gives more pieces")
  print(f"chars/token {chars_per_token(tok, docs()):.3f}")
  print(f"trained in {seconds:.1f}s")


def main(argv=None) -> int:
  """Returns the exit status: 0, or 2 after one `error: ...` line."""
  try:
    spec, overrides, flags = cli.parse(sys.argv[1:] if argv is None else argv, FLAGS)
    if spec and flags["workdir"]:
      raise ConfigError("give --config or --workdir (its saved config.json), not both")
    if overrides and not (spec or flags["workdir"]):
      raise ConfigError(f"--config.{overrides[0]} needs --config=FILE.py[:ARG] or --workdir")
    if flags["if_missing"] and (spec or flags["workdir"]):  # (launch/local.sh's, before every
      out = _training_config(spec, overrides, flags).data.tokenizer  # train: before the data
      if out and paths.exists(out):  # modules' imports, jax's among them, ~2 s)
        return 0
    args = from_config(spec, overrides, flags) if spec or flags["workdir"] else flags
    if args["if_missing"] and args["out"] and paths.exists(args["out"]):  # (gs:// too)
      return 0
    run(args)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
