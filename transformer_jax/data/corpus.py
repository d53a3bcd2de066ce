"""Document sources: this Python's standard library, or files matched by a glob.

A corpus is named by a string: "stdlib" (the running interpreter's standard-library `.py`
sources, tests excluded) or a file glob (`**` matches any depth), local or in a bucket
(`gs://BUCKET/PATH/**/*.jsonl`, listed and read through fsspec; there as here, `*` and `**` skip
names that begin with '.' unless the pattern's part does too). ("tfds:NAME" corpora, datasets
of the TFDS catalog, are read by tfds_text.py.) Its files are read in one of these formats:

  text:  one document per file.
  lines: one document per non-empty line.
  jsonl: one document per non-empty line, a JSON object whose `text_field` holds the text.

and, for sequence-to-sequence training (data.objective=seq2seq), as (source, target) pairs:

  tsv:         one pair per non-empty line, `source<TAB>target`; in both, the escapes \\n, \\t
               and \\\\ stand for a newline, a tab and a backslash.
  jsonl_pairs: one pair per non-empty line, a JSON object with `source_field` and
               `target_field` strings.
  functions:   Python sources: every function or method with a docstring and a body after it
               gives (its `def` line(s) and docstring, the rest of its body), both dedented.
               Files that do not parse are skipped.

Documents come out as `(doc_id, text)` pairs in a deterministic order. A doc id is the file's
path relative to the corpus root (the stdlib directory, or the glob's fixed leading
directories), with `:LINE` appended for the line formats, so ids do not depend on where the
corpus is checked out. A document longer than MAX_DOCUMENT_CHARS is read as consecutive pieces of
at most that many characters (cut after a newline, else a space, where one is near the limit),
ids `ID#0`, `ID#1`, ...: each piece is a document from then on, so preparation, tokenizer
training and training stay within a bounded memory for any document size (text and lines are
read in blocks; a JSONL line is parsed whole); only the train/validation split goes by the whole
document (`document_of`), so that no document is on both sides. Pairs come out as
`(pair_id, source, target)` (`iter_pairs`); read as documents (to train a tokenizer), a pair is
two documents, `ID:source` and `ID:target`.
"""

import ast
import codecs
import dataclasses
import fnmatch
import glob
import io
import json
import os
import posixpath
import re
import sysconfig
import textwrap
import warnings
from collections.abc import Iterator

from absl import logging

from transformer_jax.config import ConfigError
from transformer_jax.config import paths as paths_lib

STDLIB = "stdlib"
DOC_FORMATS = ("text", "lines", "jsonl")
PAIR_FORMATS = ("tsv", "jsonl_pairs", "functions")
FORMATS = DOC_FORMATS + PAIR_FORMATS
TFDS_PREFIX = "tfds:"  # "tfds:NAME[/CONFIG][:VERSION]": a dataset of the TFDS catalog
_TSV_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}

# Directory names that hold test suites inside the standard library (test/, tests/,
# idlelib/idle_test, lib2to3/tests, ...). Whole subtrees under them are skipped.
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# Like git: a NUL byte in the first 8 KiB marks a file as binary.
_BINARY_PROBE_BYTES = 8192
# Longer documents are cut into pieces (see the module docstring): about 250k tokens each, far
# above any training row, so only book-sized and larger documents are cut.
MAX_DOCUMENT_CHARS = 1 << 20
PIECE = re.compile(r"#\d+$")  # the id suffix of a piece of a long document (_pieces)
_READ_BYTES = 1 << 20  # Text and lines files are read in blocks of this size.
# In a folder while `clean` moves its output there (data/clean/output.py): its shards are then a
# mix of the new run's and an earlier one's, or a part, and a corpus with files there is refused.
UNFINISHED = "clean.unfinished"


@dataclasses.dataclass
class SkipCounts:
  """What `iter_documents` left out."""
  binary_files: int = 0
  empty_docs: int = 0
  invalid_utf8_docs: int = 0  # kept, with each invalid byte sequence replaced by U+FFFD
  unparsable_files: int = 0  # functions: Python files that do not parse


@dataclasses.dataclass(frozen=True)
class CorpusFile:
  """One file of a corpus: where it is, the name its doc ids start with, and its size in bytes."""
  path: str
  name: str
  size: int = -1


def check_format(fmt: str, key: str = "data.format") -> None:
  """Raises ConfigError unless `fmt` (the value of `key`) is a known document format."""
  if fmt not in FORMATS:
    raise ConfigError(f"{key}={fmt!r} is unknown; expected one of {', '.join(FORMATS)}")


def stdlib_root() -> str:
  """The directory of the running interpreter's standard library."""
  return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
  """Sorted paths of the standard library's `.py` sources, without site-packages or tests."""
  root = stdlib_root()
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    rel_parts = os.path.relpath(dirpath, root).split(os.sep)
    if "site-packages" in rel_parts or _TEST_DIRS.intersection(rel_parts):
      dirnames[:] = []
      continue
    dirnames.sort()
    paths.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
  return sorted(paths)


def _glob_root(pattern: str, sep: str = os.sep) -> str:
  """The leading directories of `pattern` that contain no glob magic."""
  parts = pattern.split(sep)
  fixed = []
  for part in parts[:-1]:
    if glob.has_magic(part):
      break
    fixed.append(part)
  if not fixed:
    return "."
  return sep.join(fixed) or sep


def _bucket_files(corpus: str) -> tuple[str, list[tuple[str, int]]]:
  """The root and the (URL, size) of each file of a gs:// glob, matched as Python's glob matches
  local files (fsspec's glob also takes hidden names for `*` and `**`)."""
  root = _glob_root(corpus.rstrip("/"), "/")
  wanted = corpus[len(root):].strip("/").split("/")
  try:
    fs = paths_lib.filesystem(corpus)
    found = fs.glob(corpus, detail=True)
  except Exception as e:  # pylint: disable=broad-except  # (the storage client's own errors)
    raise ConfigError(f"data.corpus={corpus!r} cannot be listed: {paths_lib.why(e, corpus)}")
  urls = {fs.unstrip_protocol(name): info for name, info in found.items()}
  return root, sorted((url, info["size"]) for url, info in urls.items() if info["type"] == "file"
                      and _glob_matches(url[len(root):].strip("/").split("/"), wanted))


def _glob_matches(parts: list, wanted: list) -> bool:
  """Whether a path's parts match a glob's parts as Python's glob matches them: `**` any number
  of parts (none hidden), any other part one, and a name that begins with '.' only a part that
  does too."""
  if not wanted:
    return not parts
  w, rest = wanted[0], wanted[1:]
  if w == "**":
    return any(_glob_matches(parts[i:], rest) for i in range(len(parts) + 1)
               if not any(p.startswith(".") for p in parts[:i]))
  return (bool(parts) and (w.startswith(".") or not parts[0].startswith("."))
          and fnmatch.fnmatchcase(parts[0], w) and _glob_matches(parts[1:], rest))


def corpus_files(corpus: str) -> list[CorpusFile]:
  """The files of `corpus`, sorted; ConfigError if a glob matches no files."""
  if not corpus:
    raise ConfigError("data.corpus is empty; use 'stdlib' or a glob of files")
  if corpus == STDLIB:
    root, found = stdlib_root(), [(p, os.path.getsize(p)) for p in stdlib_files()]
  elif paths_lib.is_remote(corpus):
    root, found = _bucket_files(corpus)
  else:
    pattern = os.path.expanduser(corpus)
    root = _glob_root(pattern)
    found = [(p, os.path.getsize(p))  # (a path matched two ways by two `**` comes twice)
             for p in sorted(set(glob.glob(pattern, recursive=True))) if os.path.isfile(p)]
  if not found:
    folder = not paths_lib.is_remote(corpus) and os.path.isdir(os.path.expanduser(corpus))
    raise ConfigError(f"data.corpus={corpus!r} matches no files" + (
        f" (a folder: give a glob of its files, e.g. '{corpus.rstrip('/')}/**/*.txt')"
        if folder else ""))
  _check_finished(corpus, [p for p, _ in found])
  rel = posixpath.relpath if paths_lib.is_remote(root) else os.path.relpath
  return [CorpusFile(path=p, name=rel(p, root), size=size) for p, size in found]


def _check_finished(corpus: str, files: list[str]) -> None:
  """ConfigError if a folder of the corpus's files holds UNFINISHED: a clean run stopped while
  moving its output there (killed, or a full disk), so those shards are not the cleaned corpus."""
  exists = paths_lib.exists if paths_lib.is_remote(corpus) else os.path.exists
  for folder in sorted({paths_lib.dirname(p) for p in files}):
    if exists(paths_lib.join(folder, UNFINISHED)):
      raise ConfigError(f"data.corpus={corpus!r}: {folder or '.'} is an unfinished clean run (it "
                        f"holds {UNFINISHED}; its shards are not the whole output): re-run clean")


def _looks_binary(head: bytes) -> bool:
  return b"\0" in head[:_BINARY_PROBE_BYTES]


_REPLACED = [0]  # invalid byte sequences (or lone surrogates) replaced by U+FFFD so far


def _count_replaced(error: UnicodeError):
  """The "replace" error handler that also counts (a U+FFFD written in the text is no invalid
  UTF-8: the SkipCounts count replacements, not the character)."""
  _REPLACED[0] += 1
  return "\ufffd", error.end


codecs.register_error("tjax_replace", _count_replaced)


def _decode(data: bytes) -> str:
  return data.decode("utf-8", errors="tjax_replace")


def _open(path: str):
  """The file in binary mode, past a leading UTF-8 byte-order mark (not text: kept, it began
  the first document with U+FEFF, and a JSONL file's first line did not parse)."""
  if paths_lib.is_remote(path):  # (fsspec's own readline takes no size)
    f = io.BufferedReader(paths_lib.filesystem(path).open(path, "rb"), _READ_BYTES)
  else:
    f = open(path, "rb")  # pylint: disable=consider-using-with
  if f.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
    f.seek(0)
  return f


def _text_docs(file: CorpusFile) -> Iterator[tuple[str, str]]:
  with _open(file.path) as f:
    yield from _pieces(file.name, _decoded(iter(lambda: f.read(_READ_BYTES), b"")))


def _decoded(blocks: Iterator[bytes]) -> Iterator[str]:
  """UTF-8 text of consecutive byte blocks (a character may span two); invalid bytes -> U+FFFD."""
  decoder = codecs.getincrementaldecoder("utf-8")(errors="tjax_replace")
  for block in blocks:
    yield decoder.decode(block)
  yield decoder.decode(b"", final=True)


def document_of(doc_id: str) -> str:
  """The id of the whole document that `doc_id` (perhaps a piece `ID#k`) belongs to."""
  return PIECE.sub("", doc_id)


def _pieces(doc_id: str, blocks: Iterator[str]) -> Iterator[tuple[str, str]]:
  """(id, text) of a document given as consecutive text blocks: itself, or pieces `ID#k` of at
  most MAX_DOCUMENT_CHARS when it is longer. Holds at most one block and one piece. An id that
  itself ends like a piece's (a file named `notes#2`) gets a "#" appended, so `document_of`
  never takes two files for pieces of one document."""
  doc_id += "#" * bool(PIECE.search(doc_id))
  buf, k = "", 0
  for block in blocks:
    buf += block
    start = 0
    while len(buf) - start > MAX_DOCUMENT_CHARS:
      cut = _cut(buf, start)
      yield f"{doc_id}#{k}", buf[start:cut]
      start, k = cut, k + 1
    buf = buf[start:]
  yield (f"{doc_id}#{k}" if k else doc_id), buf


def _cut(text: str, start: int) -> int:
  """Where the piece of `text` beginning at `start` ends: after the last newline (else space) in
  the second half of the longest piece, else at its full length."""
  end = start + MAX_DOCUMENT_CHARS
  for sep in ("\n", " "):
    i = text.rfind(sep, end - MAX_DOCUMENT_CHARS // 2, end)
    if i >= 0:
      return i + 1
  return end


def _numbered_lines(path: str) -> Iterator[tuple[int, str]]:
  """(1-based line number, line without its line ending) for each line of a file."""
  with _open(path) as f:
    for lineno, raw in enumerate(f, start=1):
      yield lineno, _decode(raw.rstrip(b"\r\n"))


def _line_docs(file: CorpusFile) -> Iterator[tuple[str, str]]:
  """Each line as a document (pieces of a long one), read in blocks: never a whole long line."""
  with _open(file.path) as f:
    for lineno, first in enumerate(iter(lambda: f.readline(_READ_BYTES), b""), start=1):
      yield from _pieces(f"{file.name}:{lineno}", _decoded(_line_blocks(f, first)))


def _line_blocks(f, block: bytes) -> Iterator[bytes]:
  """The byte blocks of the line that `block` starts, its line ending dropped."""
  while not block.endswith(b"\n"):
    following = f.readline(_READ_BYTES)
    if not following:
      break
    kept = block.rstrip(b"\r")  # A "\r" may end the line, with its "\n" in the next block.
    yield kept
    block = block[len(kept):] + following
  yield block.rstrip(b"\r\n")


def json_lines(path: str, label: str = "") -> Iterator[tuple[int, str, dict]]:
  """(line number, `path:LINE`, object) for each non-empty line of a JSONL file. A line that is
  not a JSON object is a one-line ConfigError naming `label` (e.g. "data.corpus: "), the file
  and the line."""
  for lineno, line in _numbered_lines(path):
    if not line.strip():
      continue
    where = f"{path}:{lineno}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{label}{where} is not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
      raise ConfigError(f"{label}{where} is not a JSON object")
    yield lineno, where, record


def _json_records(file: CorpusFile) -> Iterator[tuple[str, str, dict]]:
  """(`NAME:LINE`, `path:LINE`, object) for each non-empty line of a JSONL corpus file."""
  for lineno, where, record in json_lines(file.path, "data.corpus: "):
    yield f"{file.name}:{lineno}", where, record


def _field(record: dict, key: str, field: str, where: str) -> str:
  """record[field] as a string; ConfigError naming data.KEY and the line otherwise."""
  if field not in record:
    raise ConfigError(f"data.{key}={field!r} is missing at {where}")
  text = record[field]
  if not isinstance(text, str):
    raise ConfigError(f"data.{key}={field!r} at {where} is not a string")
  return valid_text(text)


def valid_text(text: str) -> str:
  """`text` with each lone surrogate (a JSON escape like "\ud83d", valid JSON but no Unicode
  text: the tokenizers refuse it) replaced by U+FFFD, as invalid UTF-8 is."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "tjax_replace")
  return text


def _jsonl_docs(file: CorpusFile, text_field: str) -> Iterator[tuple[str, str]]:
  for doc_id, where, record in _json_records(file):
    yield from _pieces(doc_id, iter([_field(record, "text_field", text_field, where)]))


def _file_docs(file: CorpusFile, fmt: str, text_field: str) -> Iterator[tuple[str, str]]:
  if fmt == "text":
    return _text_docs(file)
  if fmt == "lines":
    return _line_docs(file)
  return _jsonl_docs(file, text_field)


# ---------------------------------------------------------------------------------- pairs


def _unescape(text: str, where: str) -> str:
  out, i = [], 0
  while i < len(text):
    c = text[i]
    if c == "\\":
      nxt = text[i + 1:i + 2]
      if nxt not in _TSV_ESCAPES:
        raise ConfigError(f"data.corpus: {where} has an unknown escape \\{nxt} (use \\n, \\t "
                          f"or \\\\)")
      out.append(_TSV_ESCAPES[nxt])
      i += 2
    else:
      out.append(c)
      i += 1
  return "".join(out)


def _tsv_pairs(file: CorpusFile) -> Iterator[tuple[str, str, str]]:
  for lineno, line in _numbered_lines(file.path):
    if not line.strip():
      continue
    where = f"{file.path}:{lineno}"
    fields = line.split("\t")
    if len(fields) != 2:
      raise ConfigError(f"data.corpus: {where} has {len(fields) - 1} tabs; data.format=tsv "
                        f"expects source<TAB>target (escape tabs inside a text as \\t)")
    yield f"{file.name}:{lineno}", _unescape(fields[0], where), _unescape(fields[1], where)


def _jsonl_pairs(file: CorpusFile, source_field: str,
                 target_field: str) -> Iterator[tuple[str, str, str]]:
  for pair_id, where, record in _json_records(file):
    yield (pair_id, _field(record, "source_field", source_field, where),
           _field(record, "target_field", target_field, where))


def _has_docstring(node: ast.AST) -> bool:
  first = node.body[0]
  return (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
          and isinstance(first.value.value, str))


def function_pairs(name: str, text: str) -> Iterator[tuple[str, str, str]] | None:
  """(`NAME:LINE:function`, def line(s) + docstring, the rest of the body) for every function
  of Python source `text` with a docstring and more after it, but those inside such a function
  (its target holds them: a nested pair was an example of its own, held out or not apart from
  the one that holds it); None if `text` does not parse."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # e.g. SyntaxWarning: invalid escape sequence
      tree = ast.parse(text)
  except (SyntaxError, ValueError):
    return None
  lines = text.splitlines(keepends=True)
  nodes, stack = [], [(tree, False)]  # (a node, whether a pair's function holds it)
  while stack:  # (no recursion: a deep expression would pass Python's limit)
    node, inside = stack.pop()
    pair = (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.body) > 1
            and _has_docstring(node))
    if pair and not inside:
      nodes.append(node)
    stack.extend((child, inside or pair) for child in ast.iter_child_nodes(node))
  nodes.sort(key=lambda n: n.lineno)

  def piece(start, stop):  # 1-based lines [start, stop], dedented
    return textwrap.dedent("".join(lines[start - 1:stop]))

  return ((f"{name}:{n.lineno}:{n.name}", piece(n.lineno, n.body[0].end_lineno),
           piece(n.body[1].lineno, n.end_lineno)) for n in nodes)


def _function_pairs(file: CorpusFile, counts: SkipCounts) -> Iterator[tuple[str, str, str]]:
  with _open(file.path) as f:
    text = _decode(f.read())
  pairs = function_pairs(file.name, text)
  if pairs is None:
    counts.unparsable_files += 1
    return iter(())
  return pairs


def _file_pairs(file, fmt, source_field, target_field, counts):
  if fmt == "tsv":
    return _tsv_pairs(file)
  if fmt == "jsonl_pairs":
    return _jsonl_pairs(file, source_field, target_field)
  return _function_pairs(file, counts)


def _is_binary_file(path: str) -> bool:
  with _open(path) as f:
    return _looks_binary(f.read(_BINARY_PROBE_BYTES))


def iter_pairs(
    corpus: str,
    fmt: str,
    source_field: str = "source",
    target_field: str = "target",
    skipped: SkipCounts | None = None,
) -> Iterator[tuple[str, str, str]]:
  """Yields `(pair_id, source, target)` for every pair of `corpus` whose source and target are
  both non-empty, in a fixed order (`fmt`: one of PAIR_FORMATS; see the module docstring)."""
  if fmt not in PAIR_FORMATS:
    raise ConfigError(f"data.format={fmt!r} holds documents, not pairs; data.objective=seq2seq "
                      f"needs one of {', '.join(PAIR_FORMATS)}")
  files = corpus_files(corpus)
  counts = skipped if skipped is not None else SkipCounts()
  return _pairs(files, fmt, source_field, target_field, counts)


def _pairs(files, fmt, source_field, target_field, counts):
  return _kept(files, counts, lambda f: _file_pairs(f, fmt, source_field, target_field, counts))


def _kept(files, counts: SkipCounts, read) -> Iterator[tuple]:
  """The `(id, text, ...)` items `read(file)` gives for each non-binary file, those with an empty
  text left out; `counts` counts what was skipped (and texts with invalid UTF-8: replacements
  made while an item was read; a long document's piece may take its neighbour's)."""
  for file in files:
    if _is_binary_file(file.path):
      counts.binary_files += 1
      continue
    seen = _REPLACED[0]
    for item in read(file):
      replaced, seen = _REPLACED[0] > seen, _REPLACED[0]
      if all(text.strip() for text in item[1:]):
        counts.invalid_utf8_docs += replaced and any("\ufffd" in text for text in item[1:])
        yield item
      else:
        counts.empty_docs += 1


def iter_documents(
    corpus: str,
    fmt: str = "text",
    text_field: str = "text",
    skipped: SkipCounts | None = None,
    source_field: str = "source",
    target_field: str = "target",
) -> Iterator[tuple[str, str]]:
  """Yields `(doc_id, text)` for every non-empty document of `corpus`, in a fixed order.

  Args:
    corpus: "stdlib" or a glob (`**` recurses); "tfds:NAME" is tfds_text.documents'.
    fmt: a document format, or a pair format whose sources and targets become documents.
    text_field: the JSONL field holding the text.
    skipped: if given, counts the binary files and empty documents left out.
    source_field, target_field: the fields of a pair (jsonl_pairs).

  Raises:
    ConfigError: unknown format, a glob matching no files, or bad JSONL.
  """
  check_format(fmt)
  if fmt in PAIR_FORMATS:
    pairs = iter_pairs(corpus, fmt, source_field, target_field, skipped)
    return ((f"{i}:{side}", text) for i, *texts in pairs
            for side, text in zip(("source", "target"), texts))
  files = corpus_files(corpus)  # Raises before the first document, not lazily at the end.
  counts = skipped if skipped is not None else SkipCounts()
  return _documents(files, fmt, text_field, counts, corpus)


def _documents(files, fmt, text_field, counts, corpus) -> Iterator[tuple[str, str]]:
  yield from _kept(files, counts, lambda f: _file_docs(f, fmt, text_field))
  if counts.binary_files:
    logging.info("corpus %s: skipped %d binary files", corpus, counts.binary_files)
