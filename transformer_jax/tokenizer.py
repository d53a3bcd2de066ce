"""Trains the SentencePiece tokenizer a config's `data.tokenizer` points at.

  python -m transformer_jax.tokenizer --corpus=stdlib --vocab_size=8192 \\
      --out=runs/tokenizers/stdlib_8192.model

--corpus is "stdlib", a glob of files (quote it) or tfds:NAME (a TFDS catalog dataset's train
split, prepared under --data_dir; with --config, its data.data_dir); --format is text (a
document per file), lines (a document per line) or jsonl (a document per line, text in
--text_field), or a pair format (tsv, jsonl_pairs with --source_field/--target_field,
functions) whose sources and targets are read as documents. --special adds
the control pieces other pretraining objectives need (e.g. --special=mask,sentinels:100,ul2 for
data.objective = mlm, span, denoise or ul2; see data/tokenizer.py). Prints the
model path, its vocabulary size and the average characters per token on a sample of the
corpus. Bad input prints one line and exits with status 2.

  python -m transformer_jax.tokenizer --config=configs/t5.py:tiny [--config.KEY=VALUE ...]
      [--if_missing]

trains the tokenizer a training config names (data.tokenizer, from its data.corpus, with
model.vocab_size pieces and the control pieces its data.objective needs); --if_missing does
nothing when that file exists (what launch/local.sh runs before training).
"""

import argparse
import os
import sys
import time

from transformer_jax.config import ConfigError
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import objectives
from transformer_jax.data import tfds_text
from transformer_jax.data import tokenizer as tokenizer_lib

_SAMPLE_EVERY = 10  # Measure characters/token on every 10th document ...
_SAMPLE_CHARS = 1_000_000  # ... up to this many characters.


class _Parser(argparse.ArgumentParser):
  """Argument errors as one line and exit status 2."""

  def error(self, message):
    raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m transformer_jax.tokenizer", description=__doc__.split("\n")[0])
  p.add_argument("--config", default="", help="a training config FILE.py[:ARG] to read "
                 "corpus, vocabulary size, output path and control pieces from")
  p.add_argument("--if_missing", action="store_true", help="skip when the output exists")
  p.add_argument("--corpus", help='"stdlib" or a glob of files')
  p.add_argument("--format", default="text",
                 help="text | lines | jsonl | tsv | jsonl_pairs | functions")
  p.add_argument("--text_field", default="text", help="JSONL field holding the text")
  p.add_argument("--source_field", default="source", help="jsonl_pairs/TFDS source field")
  p.add_argument("--target_field", default="target", help="jsonl_pairs/TFDS target field")
  p.add_argument("--data_dir", default="", help='where a tfds: corpus is prepared ("" = default)')
  p.add_argument("--vocab_size", type=int, help="pieces, specials included")
  p.add_argument("--out", help="the .model file to write")
  p.add_argument("--special", default="",
                 help="extra pieces: comma-separated mask, sentinels[:N], ul2 (default none)")
  p.add_argument("--max_chars", type=int, default=5_000_000, help="characters sampled to train")
  return p


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


SPECIAL_FOR_OBJECTIVES = "mask,sentinels:100,ul2"  # every non-clm objective's pieces, one file


def from_config(args: argparse.Namespace, overrides) -> argparse.Namespace:
  """Fills corpus, format, text_field, vocab_size, out and special from a training config."""
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load(args.config, overrides)
  d = c.data
  return argparse.Namespace(**dict(
      vars(args), corpus=d.corpus, format=d.format, text_field=d.text_field,
      source_field=d.source_field, target_field=d.target_field, data_dir=d.data_dir,
      vocab_size=c.model.vocab_size, out=d.tokenizer,
      special=args.special or (SPECIAL_FOR_OBJECTIVES
                               if objectives.flag(d, "CONTROL_PIECES", True) else "")))


def run(args: argparse.Namespace) -> None:
  """Trains, writes and reports."""
  missing = [f"--{k}" for k in ("corpus", "vocab_size", "out") if getattr(args, k) is None]
  if missing:
    raise ConfigError(f"{', '.join(missing)} required (or --config=FILE.py[:ARG])")
  if args.vocab_size <= 0:
    raise ConfigError(f"--vocab_size={args.vocab_size} must be positive")
  corpus_lib.check_format(args.format)
  tokenizer_lib.special_pieces(args.special)  # Bad groups fail before reading the corpus.

  def docs():
    return tfds_text.documents(args.corpus, args.format, args.text_field,
                               source_field=args.source_field, target_field=args.target_field,
                               data_dir=args.data_dir)

  start = time.time()
  texts = (text for _, text in docs())
  tokenizer_lib.train(texts, args.vocab_size, args.out, max_chars=args.max_chars,
                      special=args.special)
  seconds = time.time() - start
  tok = tokenizer_lib.load(args.out)
  print(f"wrote {args.out}")
  print(f"vocab_size {tok.vocab_size}")
  print(f"chars/token {chars_per_token(tok, docs()):.3f}")
  print(f"trained in {seconds:.1f}s")


def main(argv=None) -> int:
  try:
    args, rest = _parser().parse_known_args(argv)
    overrides = [a[len("--config."):] for a in rest if a.startswith("--config.")]
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown or (overrides and not args.config):
      raise ConfigError(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if args.config:
      args = from_config(args, overrides)
    if args.if_missing and args.out and os.path.exists(args.out):
      return 0
    run(args)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
