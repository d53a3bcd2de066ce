"""Reading a corpus: files, lines and JSONL, long documents in pieces, bad bytes, and the
samples a tokenizer is trained on."""

import collections
import os
import random

import numpy as np

from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import tfds_text
from transformer_jax.data import tokenization as tokenizer_lib


def test_stdlib_files_exclude_tests_and_site_packages():
  files = corpus_lib.stdlib_files()
  assert len(files) > 300 and files == sorted(files)
  assert all(f.endswith(".py") for f in files)
  for f in files:
    assert "site-packages" not in f
    assert not {"test", "tests", "idle_test"} & set(f.split(os.sep))


def test_a_lone_surrogate_escape_reads_as_invalid_utf8_and_a_byte_order_mark_as_nothing(tmp_path):
  """Half a surrogate pair ("\\ud83d", no UTF-8 encoder takes it) reads as U+FFFD; a file's
  leading BOM is no text (a JSONL file's first line did not parse)."""
  for fmt, data, want in (("jsonl", b'{"text": "x"}\n', ["x"]), ("lines", b"x\r\ny", ["x", "y"]),
                          ("text", b"x y", ["x y"])):
    (tmp_path / f"b.{fmt}").write_bytes(b"\xef\xbb\xbf" + data)
    assert [t for _, t in corpus_lib.iter_documents(str(tmp_path / f"b.{fmt}"), fmt)] == want
  (tmp_path / "s.jsonl").write_text('{"text": "a \\ud83d b"}\n{"text": "c \\ud83d\\ude00"}\n')
  skipped = corpus_lib.SkipCounts()
  docs = list(corpus_lib.iter_documents(str(tmp_path / "s.jsonl"), "jsonl", skipped=skipped))
  assert [t for _, t in docs] == ["a \ufffd b", "c \U0001f600"] and skipped.invalid_utf8_docs == 1


def test_long_documents_are_read_as_exact_pieces(tmp_path, monkeypatch):
  """Documents longer than MAX_DOCUMENT_CHARS come out as pieces that join back to the document
  (line endings split across read blocks, characters split across blocks, any sizes)."""
  rng = random.Random(0)
  alphabet = ["a", "b", " ", "\n", "é", "日本", "\r\n", "\r", "x" * 7, "🙂"]
  path = tmp_path / "f.txt"
  for trial in range(100):
    monkeypatch.setattr(corpus_lib, "MAX_DOCUMENT_CHARS", rng.choice([4, 10, 37, 100]))
    monkeypatch.setattr(corpus_lib, "_READ_BYTES", rng.choice([1, 3, 8, 50]))
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 400)))
    path.write_text(text, newline="")
    lines = text.encode().split(b"\n")
    lines = lines[:-1] if text.endswith("\n") else lines
    for fmt, expected in (("text", [("f.txt", text)]),
                          ("lines", [(f"f.txt:{n}", line.rstrip(b"\r").decode())
                                     for n, line in enumerate(lines, 1)])):
      docs = list(corpus_lib._file_docs(corpus_lib.CorpusFile(str(path), "f.txt"), fmt, "text"))
      assert all(len(t) <= corpus_lib.MAX_DOCUMENT_CHARS for _, t in docs), trial
      joined = collections.defaultdict(str)
      for doc_id, piece in docs:
        joined[doc_id.partition("#")[0]] += piece
      ids = [i for i, _ in docs]
      split = [i for i in ids if "#" in i]
      assert len(set(ids)) == len(ids) and all(i.split("#")[0] + "#0" in ids for i in split)
      assert list(joined.items()) == expected, (trial, fmt)


def test_files_named_like_pieces_stay_documents_of_their_own(tmp_path, monkeypatch):
  """`notes#1` and `notes#2` are two files, not two pieces of `notes`: their ids get a "#", so
  document_of (the split, the cleaner's piece rules) keeps them apart, also when they are long."""
  monkeypatch.setattr(corpus_lib, "MAX_DOCUMENT_CHARS", 20)
  for name, text in (("notes#1", "short"), ("notes#2", "a b c d e f g h i j k l m n o p")):
    (tmp_path / name).write_text(text)
  docs = list(corpus_lib.iter_documents(str(tmp_path / "notes*"), "text"))
  assert [d for d, _ in docs] == ["notes#1#", "notes#2##0", "notes#2##1"]
  assert [corpus_lib.document_of(d) for d, _ in docs] == ["notes#1#", "notes#2#", "notes#2#"]


def test_one_huge_document_reads_in_bounded_memory(tmp_path):
  """A 24 MB single-line file: reading it as text or lines, and sampling it to train a tokenizer,
  never holds much more than a piece (it used to hold the whole line, decoded, several times)."""
  import tracemalloc
  line = ("word " * 200 + "é") * 1000
  with open(tmp_path / "big.txt", "w") as f:
    for _ in range(24):
      f.write(line)
  bound = 10 * corpus_lib.MAX_DOCUMENT_CHARS  # The file's size is 24 of them.
  for fmt in ("text", "lines"):
    tracemalloc.start()
    try:
      texts = (t for _, t in corpus_lib.iter_documents(str(tmp_path / "*.txt"), fmt))
      assert sum(map(len, tokenizer_lib.sample_sentences(texts, 100_000))) > 90_000
      peak = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
    assert peak < bound, (fmt, peak)
  assert sum(len(t) for _, t in corpus_lib.iter_documents(str(tmp_path / "*.txt"))) == 24 * len(line)


def test_the_tokenizer_sample_keeps_documents_apart_and_its_character_budget():
  """Training sentences never join two documents (lines/JSONL documents end without a
  newline); the sample holds at most max_chars characters whatever the line lengths (long lines
  took up to 4x the budget), uniformly: every sentence when they fit, and a mixture's sources in
  their shares of the characters."""
  docs = [f"doc{i} " + "word " * 30 for i in range(400)]  # no trailing newline
  sample = tokenizer_lib.sample_sentences(docs, 10**9)
  assert sorted(sample) == sorted(docs)
  long_lines = ["x" * 3999 + "\n"] * 500  # one 4000-character sentence each
  for budget in (10_000, 100_000):
    for texts in (long_lines, ["short line\n" * 80] * 200):
      got = sum(map(len, tokenizer_lib.sample_sentences(texts, budget)))
      assert budget - 4000 < got <= budget, (budget, got)  # within a sentence of it
  picked = tokenizer_lib.sample_sentences([f"{i}\n" * 100 for i in range(1000)], 20_000, seed=1)
  firsts = [int(p.split()[0]) for p in picked]
  assert 300 < np.mean(firsts) < 700  # not the corpus's start or end


def test_a_mixtures_sources_keep_their_shares_of_the_sample_whatever_their_sizes():
  """A source with fewer characters than its share of max_chars is repeated up to it (whole
  copies, then a sample of one more), as training reads it more epochs; a big one is sampled;
  a source that fills its share exactly is taken once."""
  big = [f"big{i} " + "word " * 20 + "\n" for i in range(2000)]  # ~210k characters
  small = [f"small{i} tiny\n" for i in range(30)]  # ~400 characters
  size = sum(map(len, small))
  for max_chars, shares in ((100_000, (0.5, 0.5)), (1_000_000, (0.9, 0.1)),
                            (20_000, (0.25, 0.75)), (2 * size, (0.5, 0.5))):
    got = tokenizer_lib.sample_mixture([big, small], list(shares), max_chars, seed=3)
    chars = {k: sum(len(s) for s in got if s.startswith(k)) for k in ("big", "small")}
    for k, share in zip(("big", "small"), shares):
      assert max_chars * share - 110 < chars[k] <= max_chars * share, (max_chars, k, chars)
    repeats = collections.Counter(s for s in got if s.startswith("small"))
    copies = int(max_chars * shares[1]) // size
    assert set(repeats.values()) <= {copies, copies + 1}, repeats  # every sentence, evenly
    assert len(repeats) == len(small)
  assert tokenizer_lib.sample_mixture([small, small], [0.5, 0.5], 2 * size) == small * 2


def test_tokenized_corpus_encodes_bounded_batches():
  source = [{"text": "x" * n} for n in (10, 3 << 20, 3 << 20, 5, 5 << 20, 1, 2)]
  batches = list(tfds_text._batches(source, "text"))
  assert [(first, len(records)) for first, records in batches] == [(0, 3), (3, 2), (5, 2)]
  source = [{"text": "x"}] * 600
  assert [len(r) for _, r in tfds_text._batches(source, "text")] == [256, 256, 88]


def test_a_glob_matches_as_pythons_glob_in_a_bucket_too(tmp_path):
  """`_glob_matches` (which filters fsspec's gs:// listing) against Python's glob on a local tree
  with hidden names at several depths, for patterns with `*`, `**`, `?`, `[]` and '.'-parts; and
  a file that two `**` match two ways is read once (Python's glob lists it twice)."""
  import glob  # pylint: disable=g-import-not-at-top
  names = ["a.txt", ".h.txt", "d/b.txt", "d/.x.txt", ".cfg/z.txt", ".cfg/.y.txt", "d/e/c.txt",
           "d/.e/f.txt", "x/sub/b.txt", "x/sub/deeper/sub/c.txt", "s1/t.md", "s2/.u/t.md"]
  for name in names:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(f"text of {name}\n")
  every = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
  matches = corpus_lib._glob_matches  # pylint: disable=protected-access
  patterns = ["*.txt", "**/*.txt", "**", ".*", ".*/*.txt", "*/.*", "**/.*", "d/**/*.txt",
              "?/*.txt", "[ds]*/**/*", "**/sub/**/*.txt", ".cfg/*", "*/*/*.md", "**/t.md"]
  for pattern in patterns:
    want = sorted({os.path.relpath(p, tmp_path) for p in glob.glob(f"{tmp_path}/{pattern}",
                                                                   recursive=True)
                   if os.path.isfile(p)})
    got = [n for n in every if matches(n.split("/"), pattern.split("/"))]
    assert got == want, pattern
  docs = [d for d, _ in corpus_lib.iter_documents(f"{tmp_path}/**/sub/**/*.txt")]
  assert docs == ["x/sub/b.txt", "x/sub/deeper/sub/c.txt"]
