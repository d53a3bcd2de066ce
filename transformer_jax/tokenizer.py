"""Trains the SentencePiece tokenizer a config's `data.tokenizer` points at.

  python -m transformer_jax.tokenizer --corpus=stdlib --vocab_size=8192 \\
      --out=runs/tokenizers/stdlib_8192.model

--corpus is "stdlib" or a glob of files (quote it); --format is text (a document per file),
lines (a document per line) or jsonl (a document per line, text in --text_field). Prints the
model path, its vocabulary size and the average characters per token on a sample of the
corpus. Bad input prints one line and exits with status 2.
"""

import argparse
import sys
import time

from transformer_jax.config import ConfigError
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import tokenizer as tokenizer_lib

_SAMPLE_EVERY = 10  # Measure characters/token on every 10th document ...
_SAMPLE_CHARS = 1_000_000  # ... up to this many characters.


class _Parser(argparse.ArgumentParser):
  """Argument errors as one line and exit status 2."""

  def error(self, message):
    raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m transformer_jax.tokenizer", description=__doc__.split("\n")[0])
  p.add_argument("--corpus", required=True, help='"stdlib" or a glob of files')
  p.add_argument("--format", default="text", help="text | lines | jsonl")
  p.add_argument("--text_field", default="text", help="JSONL field holding the text")
  p.add_argument("--vocab_size", type=int, required=True, help="pieces, specials included")
  p.add_argument("--out", required=True, help="the .model file to write")
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


def run(args: argparse.Namespace) -> None:
  """Trains, writes and reports."""
  if args.vocab_size <= 0:
    raise ConfigError(f"--vocab_size={args.vocab_size} must be positive")
  corpus_lib.check_format(args.format)

  def docs():
    return corpus_lib.iter_documents(args.corpus, args.format, args.text_field)

  start = time.time()
  texts = (text for _, text in docs())
  tokenizer_lib.train(texts, args.vocab_size, args.out, max_chars=args.max_chars)
  seconds = time.time() - start
  tok = tokenizer_lib.load(args.out)
  print(f"wrote {args.out}")
  print(f"vocab_size {tok.vocab_size}")
  print(f"chars/token {chars_per_token(tok, docs()):.3f}")
  print(f"trained in {seconds:.1f}s")


def main(argv=None) -> int:
  try:
    run(_parser().parse_args(argv))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
