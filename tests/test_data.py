"""Tests of the data layer: corpus, tokenizer, TFDS builder and the grain pipeline."""

import collections
import json
import os
import random
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from transformer_jax import config as config_lib
from transformer_jax import tokenizer as tokenizer_cli
from transformer_jax.config import ConfigError
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import pipeline
from transformer_jax.data import tfds_text
from transformer_jax.data import tokenization as tokenizer_lib
from transformer_jax.training import data_position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TEXT_DOCS = 36
SEQ_LEN = 32
WORDS = ("def", "return", "self", "value", "import", "class", "the", "data", "for", "in",
         "if", "else", "x", "y", "=", "+", "(", ")", "0", "1", "é")

CODE = ("import os\n\n\nclass A:\n\tdef f(self, x):  \n\t\treturn x\n\n"
        "    # four spaces\n        eight = [1,  2,   3]\t# tab\n\n\n   \n")


def _base_config():
  return config_lib.base.get_config()


def _doc(rng: random.Random) -> str:
  lines = []
  for _ in range(rng.randint(2, 14)):
    indent = rng.choice(["", "    ", "        ", "\t", "\t\t"])
    lines.append(indent + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 7))))
    if rng.random() < 0.2:
      lines.append("")
  return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  """36 text docs in nested dirs (+ an empty and a binary file), a lines and a JSONL file."""
  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  for i in range(NUM_TEXT_DOCS):
    path = root / "code" / f"pkg{i % 3}" / f"m{i:02d}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_doc(rng))
  (root / "code" / "empty.py").write_text("  \n")
  (root / "code" / "blob.py").write_bytes(b"\x00\x01binary")
  (root / "docs.lines").write_text("first line\n\n  \nsecond\tline\nthird line\n")
  records = [{"text": "alpha beta"}, {"text": "gamma", "other": 1}, {"text": "delta"}]
  (root / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
  (root / "bad.jsonl").write_text('{"body": "no text field"}\n')
  return root


@pytest.fixture(scope="module")
def tokenizer_path(corpus_dir, tmp_path_factory):
  texts = [t for _, t in corpus_lib.iter_documents(f"{corpus_dir}/code/**/*.py")] + [CODE]
  out = tmp_path_factory.mktemp("tok") / "nested" / "tok.model"
  return tokenizer_lib.train(texts, 300, str(out))


@pytest.fixture(scope="module")
def config(corpus_dir, tokenizer_path, tmp_path_factory):
  c = _base_config()
  c.seed = 7
  c.data.corpus = f"{corpus_dir}/code/**/*.py"
  c.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  c.data.validation_fraction = 0.15
  c.data.tokenizer = tokenizer_path
  c.data.seq_len = SEQ_LEN
  c.train.batch_size = 4
  c.model.vocab_size = 512
  return c


def _with(config, **overrides):
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def _segments(batch):
  """Token sequences of every segment in a batch."""
  out = []
  for inputs, seg in zip(batch["inputs"], batch["segment_ids"]):
    out += [tuple(inputs[seg == s]) for s in np.unique(seg[seg > 0])]
  return out


def _chunks_by_doc(config, split):
  """{chunk tokens: doc id} for every chunk of every document of a split."""
  tok = tokenizer_lib.load(config.data.tokenizer)
  source = tfds_text.data_source(config.data, split)
  chunks = {}
  for i in range(len(source)):
    ids = [tok.bos_id] + tok.encode(source[i]["text"].decode()) + [tok.eos_id]
    for start in range(0, len(ids), SEQ_LEN):
      chunks.setdefault(tuple(ids[start:start + SEQ_LEN]), []).append(source[i]["id"])
  return chunks


# ------------------------------------------------------------------------------- corpus


def test_iter_documents_formats(corpus_dir):
  skipped = corpus_lib.SkipCounts()
  docs = list(corpus_lib.iter_documents(f"{corpus_dir}/code/**/*.py", skipped=skipped))
  assert len(docs) == NUM_TEXT_DOCS
  assert skipped.binary_files == 1 and skipped.empty_docs == 1
  assert docs[0][0] == os.path.join("pkg0", "m00.py")  # Relative to the glob's fixed root.
  lines = list(corpus_lib.iter_documents(f"{corpus_dir}/docs.lines", "lines"))
  assert lines == [("docs.lines:1", "first line"), ("docs.lines:4", "second\tline"),
                   ("docs.lines:5", "third line")]
  jsonl = list(corpus_lib.iter_documents(f"{corpus_dir}/docs.jsonl", "jsonl"))
  assert [t for _, t in jsonl] == ["alpha beta", "gamma", "delta"]


def test_iter_documents_errors(corpus_dir):
  with pytest.raises(ConfigError, match="matches no files"):
    corpus_lib.iter_documents(f"{corpus_dir}/nothing/*.txt")
  with pytest.raises(ConfigError, match="data.format"):
    corpus_lib.iter_documents(f"{corpus_dir}/docs.lines", "csv")
  with pytest.raises(ConfigError, match="'text' is missing at .*bad.jsonl:1"):
    list(corpus_lib.iter_documents(f"{corpus_dir}/bad.jsonl", "jsonl"))


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_code_exactly(tokenizer_path):
  tok = tokenizer_lib.load(tokenizer_path)
  assert tok.vocab_size <= 300
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  for text in (CODE, "  leading and trailing  ", "\n\n\t\t\n", "ünïcödé 中文 \x00\r\n"):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.unk_id not in ids  # Byte fallback: nothing is unknown.
  ids = tok.encode(CODE)
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id, tok.pad_id]) == CODE


def test_another_sentencepiece_models_specials_are_its_own():
  """A model with Llama's ids (unk 0, bos 1, eos 2, no pad): decoding drops its bos/eos, and
  keeps id 3, an ordinary piece there (our models' eos)."""
  import io  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([f"the quick brown fox jumps over the lazy dog {i}"
                              for i in range(200)]), model_writer=buf, vocab_size=60,
      model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  tok = tokenizer_lib.Tokenizer(buf.getvalue())
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (-1, 0, 1, 2)
  ids = tok.encode("he the quick fox")
  assert 3 in ids and tok.is_normal(3)
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "he the quick fox"


def test_tokenizer_missing_file_names_the_command(tmp_path):
  with pytest.raises(ConfigError) as e:
    tokenizer_lib.load(str(tmp_path / "missing.model"), corpus="stdlib", vocab_size=1024)
  assert "python -m transformer_jax.tokenizer --corpus=stdlib --vocab_size=1024 --out=" in str(e.value)


def test_tokenizer_cli(corpus_dir, tmp_path, capsys):
  out = tmp_path / "cli" / "t.model"
  assert tokenizer_cli.main([f"--corpus={corpus_dir}/code/**/*.py", "--vocab_size=300",
                             f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  assert str(out) in printed and "vocab_size" in printed and "chars/token" in printed
  before = out.read_bytes()  # a tokenizer that runs were trained with is never replaced unasked
  assert tokenizer_cli.main(["--corpus=stdlib", "--vocab_size=280", f"--out={out}"]) == 2
  assert capsys.readouterr().err == (f"error: --out={out} already exists (the runs trained with "
                                     f"it need it as it is): choose another --out, or "
                                     f"--overwrite to replace it\n")
  assert out.read_bytes() == before
  assert tokenizer_cli.main([f"--corpus={corpus_dir}/code/**/*.py", "--vocab_size=320",
                             f"--out={out}", "--overwrite"]) == 0
  assert out.read_bytes() != before and "vocab_size 320" in capsys.readouterr().out
  assert tokenizer_cli.main([f"--corpus={corpus_dir}/none/*", "--vocab_size=300",
                             f"--out={out}", "--overwrite"]) == 2
  assert tokenizer_cli.main(["--corpus=stdlib", "--vocab_size=x", f"--out={out}"]) == 2
  (tmp_path / "a_file").write_text("x")
  for bad in (tmp_path / "cli", tmp_path / "tok.json",  # a model file, or DIR/tokenizer.json
              tmp_path / "a_file" / "t.model"):  # (a traceback after training)
    assert tokenizer_cli.main(["--corpus=stdlib", "--vocab_size=300", f"--out={bad}"]) == 2
  errors = capsys.readouterr().err.strip().splitlines()
  assert len(errors) == 5 and all(e.startswith("error: ") for e in errors)
  assert "is a directory or a .json name" in errors[-2]
  assert errors[-1] == f"error: --out={tmp_path / 'a_file'} cannot be made a folder: " \
                       f"{tmp_path / 'a_file'} is a file"
  assert tokenizer_cli.main([f"--corpus={corpus_dir}/code/**/*.py", "--vocab_size=300",
                             f"--out={tmp_path}/new/"]) == 2  # (a traceback after training)
  assert "is a directory" in capsys.readouterr().err and not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------ TFDS builder


@pytest.mark.parametrize("pattern,fmt,num_docs", [
    ("code/**/*.py", "text", NUM_TEXT_DOCS),
    ("docs.lines", "lines", 3),
    ("docs.jsonl", "jsonl", 3),
])
def test_tfds_builder(corpus_dir, tmp_path, pattern, fmt, num_docs):
  data = _with(_base_config(), **{"data.corpus": f"{corpus_dir}/{pattern}", "data.format": fmt,
                                  "data.data_dir": str(tmp_path),
                                  "data.validation_fraction": 0.1}).data
  builder = tfds_text.prepare(data)
  assert builder.info.file_format.value == "array_record"
  train, val = (tfds_text.data_source(data, s) for s in ("train", "validation"))
  train_ids = {train[i]["id"] for i in range(len(train))}
  val_ids = {val[i]["id"] for i in range(len(val))}
  assert len(train) + len(val) == num_docs == len(train_ids | val_ids)
  assert not train_ids & val_ids and val_ids  # Disjoint, and validation is never empty.
  files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
  mtimes = [p.stat().st_mtime_ns for p in files]
  again = tfds_text.prepare(data)  # A no-op: nothing rewritten.
  assert again.is_prepared()
  assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == files
  assert [p.stat().st_mtime_ns for p in files] == mtimes
  assert "tensorflow" not in sys.modules


def test_a_document_falls_on_one_side_whatever_its_id():
  """The split hashes the text: the same documents read through two globs (a mixture's source
  and its upweighted subset: ids `wiki/a.txt:3` and `a.txt:3`) and exact copies are held out
  alike (a hash of the id held some out of one source and trained on them through the other)."""
  rng = random.Random(0)
  texts = [" ".join(rng.choice("abcdefgh") * rng.randint(1, 5) for _ in range(30))
           for _ in range(200)]
  sides = []
  for prefix in ("wiki/", ""):
    held, n, fallback = tfds_text.held_out_split(
        [(f"{prefix}a.txt:{i}", t) for i, t in enumerate(texts)], 0.3)
    assert n == 200 and not fallback
    sides.append(sorted(int(i.split(":")[1]) for i, _ in held))
  assert sides[0] == sides[1] and 30 < len(sides[0]) < 90
  copies = [(f"b.txt:{i}", texts[i]) for i in range(0, 200, 2)]
  held, _, _ = tfds_text.held_out_split([(f"a.txt:{i}", t) for i, t in enumerate(texts)]
                                        + copies, 0.3)
  assert sorted(int(i.split(":")[1]) for i, _ in held if i.startswith("b")) == [
      i for i in sides[0] if i % 2 == 0]


@pytest.mark.parametrize("fraction", [0.3, 1e-9, 1 - 1e-9])
def test_a_long_document_is_held_out_whole_or_not_at_all(tmp_path, monkeypatch, capsys,
                                                         fraction):
  """Pieces of a long document are one document for the split: all on one side (each piece
  hashed alone put 49 pieces of a book in train and 8 in validation), also where no hash is
  under the fraction (the smallest-hash book is held out) or every one is (the largest-hash
  book goes back): those fallbacks moved one piece of the book."""
  monkeypatch.setattr(corpus_lib, "MAX_DOCUMENT_CHARS", 200)
  rng = random.Random(0)
  (tmp_path / "c").mkdir()
  for i in range(6):
    (tmp_path / "c" / f"book{i}.txt").write_text("\n".join(
        " ".join(rng.choice(["of", "the", "alpha", "beta"]) for _ in range(10))
        for _ in range(60)))
  data = _with(_base_config(), **{"data.corpus": f"{tmp_path}/c/*.txt", "data.format": "text",
                                  "data.data_dir": str(tmp_path / "tfds"),
                                  "data.validation_fraction": fraction}).data
  sides = {s: [r["id"].decode() for r in tfds_text.data_source(data, s)]
           for s in ("train", "validation")}
  books = {s: collections.Counter(corpus_lib.document_of(i) for i in ids)
           for s, ids in sides.items()}
  assert set(books["train"]) | set(books["validation"]) == {f"book{i}.txt" for i in range(6)}
  assert not set(books["train"]) & set(books["validation"]) and books["validation"]
  assert min(books["train"].values()) > 5  # books of many pieces
  first = {r["id"].decode()[:-2]: r["text"].decode() for s in ("train", "validation")
           for r in tfds_text.data_source(data, s) if r["id"].decode().endswith("#0")}
  hashes = {b: tfds_text.content_hash(first[b]) for b in books["train"] | books["validation"]}
  if fraction < 0.01:
    assert list(books["validation"]) == [min(hashes, key=hashes.get)]
  assert ("the one of smallest hash is held out" in capsys.readouterr().out) == (fraction < 0.01)
  if fraction > 0.99:
    assert list(books["train"]) == [max(hashes, key=hashes.get)]


def test_tfds_one_document_has_empty_validation(corpus_dir, tmp_path):
  data = _with(_base_config(), **{"data.corpus": f"{corpus_dir}/code/pkg0/m00.py",
                                  "data.data_dir": str(tmp_path)}).data
  assert len(tfds_text.data_source(data, "train")) == 1
  assert len(tfds_text.data_source(data, "validation")) == 0


def test_tfds_configs_of_different_corpora_differ(corpus_dir):
  a = tfds_text.make_builder_config(f"{corpus_dir}/docs.lines", "lines", "text", 0.1)
  b = tfds_text.make_builder_config(f"{corpus_dir}/docs.jsonl", "lines", "text", 0.1)
  c = tfds_text.make_builder_config(f"{corpus_dir}/docs.lines", "lines", "text", 0.2)
  assert len({a.name, b.name, c.name}) == 3
  assert a.name == tfds_text.make_builder_config(f"{corpus_dir}/docs.lines", "lines", "text",
                                                 0.1).name


# ------------------------------------------------------------------------------- pipeline


def test_batches_shapes_and_causal_targets(config):
  batches = _take(pipeline.make_train_iterator(config), 3)
  for b in batches:
    expected = {"inputs": np.int32, "targets": np.int32, "weights": np.float32,
                "segment_ids": np.int32, "positions": np.int32}
    assert {k: v.dtype for k, v in b.items()} == expected
    assert all(v.shape == (4, SEQ_LEN) for v in b.values())
    inputs, targets, weights = b["inputs"], b["targets"], b["weights"]
    seg, pos = b["segment_ids"], b["positions"]
    same_next = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
    np.testing.assert_array_equal(weights[:, :-1], same_next)
    assert not weights[:, -1].any()
    np.testing.assert_array_equal(np.where(same_next, targets[:, :-1], 0),
                                  np.where(same_next, inputs[:, 1:], 0))
    pad = seg == 0
    assert not inputs[pad].any() and not pos[pad].any() and not weights[pad].any()
    for r in range(seg.shape[0]):
      for s in np.unique(seg[r][seg[r] > 0]):
        np.testing.assert_array_equal(pos[r][seg[r] == s], np.arange((seg[r] == s).sum()))
    assert weights.sum() > 0


def test_one_epoch_loses_no_token(config):
  """Every chunk of every training document is one segment, exactly once."""
  c = _with(config, **{"train.batch_size": 1})  # No partial batch to drop.
  segments = [s for b in pipeline.train_dataset(c, num_epochs=1) for s in _segments(b)]
  expected = collections.Counter({k: len(v) for k, v in _chunks_by_doc(c, "train").items()})
  assert collections.Counter(segments) == expected


def test_one_document_corpus(config, corpus_dir, tmp_path):
  c = _with(config, **{"data.corpus": f"{corpus_dir}/code/pkg1/m01.py",
                       "data.data_dir": str(tmp_path)})
  assert pipeline.eval_batches(c, 2) == []
  (batch,) = _take(pipeline.make_train_iterator(c), 1)
  assert batch["weights"].sum() > 0


def test_determinism(config):
  first = _take(pipeline.make_train_iterator(config), 3)
  _assert_same(first, _take(pipeline.make_train_iterator(config), 3))
  other = _take(pipeline.make_train_iterator(_with(config, seed=8)), 3)
  assert any((a["inputs"] != b["inputs"]).any() for a, b in zip(first, other))


def test_iterator_state_round_trip(config):
  it = pipeline.make_train_iterator(config)
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = pipeline.make_train_iterator(config)
  fresh.set_state(state)
  _assert_same(expected, _take(fresh, 3))


def test_iterator_orbax_checkpoint(config, tmp_path):
  it = pipeline.make_train_iterator(config)
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(2, args=ocp.args.Composite(data=data_position.data_save_args(it)))
    manager.wait_until_finished()
    expected = _take(it, 3)
    fresh = pipeline.make_train_iterator(config)
    manager.restore(2, args=ocp.args.Composite(data=data_position.DataRestore(fresh)))
  _assert_same(expected, _take(fresh, 3))


def test_shards_make_the_batches_independent_of_the_readers(config, tmp_path):
  """Two readers of half the rows each see exactly the rows one reader of all of them sees,
  and their saved positions restore into one reader (and a different shard count is refused)."""
  c = _with(config, **{"data.shards": 2})
  whole = pipeline.make_train_iterator(c)
  halves = [pipeline.make_train_iterator(c, (0, 2)), pipeline.make_train_iterator(c, (2, 4))]
  for _ in range(2):
    batch = next(whole)
    parts = [next(h) for h in halves]
    for k in batch:
      np.testing.assert_array_equal(batch[k], np.concatenate([p[k] for p in parts]))
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(2, args=ocp.args.Composite(data=data_position.DataSave(
        {k: v for h in halves for k, v in h.get_state().items()}, 2)))
    manager.wait_until_finished()
    expected = _take(whole, 2)
    fresh = pipeline.make_train_iterator(c)
    manager.restore(2, args=ocp.args.Composite(data=data_position.DataRestore(fresh)))
    _assert_same(expected, _take(fresh, 2))
    with pytest.raises(ConfigError, match="data.shards=2, this run uses 4: set --config.data.s"):
      manager.restore(2, args=ocp.args.Composite(data=data_position.DataRestore(
          pipeline.make_train_iterator(_with(config, **{"data.shards": 4})))))
    # 4 processes (data.shards=0: one each) cannot read 2 shards whole, so data.shards=2 is no
    # advice there (the pipeline refuses it): the process counts that can resume are named
    quarter = pipeline.make_train_iterator(_with(config, **{"data.shards": 0}), (0, 1))
    with pytest.raises(ConfigError, match=r"data.shards=2, this run uses 4, and its 4 processes "
                                          r"cannot read 2 shards whole: resume on 1 or 2 proc"):
      manager.restore(2, args=ocp.args.Composite(data=data_position.DataRestore(quarter)))
    # a file missing beside others of the same count is damage (Checkpoints sets the checkpoint
    # aside), not advice to set the data.shards the run has: every resume stopped there
    os.remove(tmp_path / "ckpt" / "2" / "data" / "shard-1-of-2.json")
    with pytest.raises(FileNotFoundError, match="shard-1-of-2.json is missing"):
      manager.restore(2, args=ocp.args.Composite(data=data_position.DataRestore(
          pipeline.make_train_iterator(c))))
    # ... for every process, also one that reads shard 0 alone (the others hung in set-aside),
    # and so is a damaged file of another process's shard
    assert pipeline.make_train_iterator(c, (0, 2)).shards == [0]
    with pytest.raises(FileNotFoundError, match="shard-1-of-2.json is missing"):
      manager.restore(2, args=ocp.args.Composite(data=data_position.DataRestore(
          pipeline.make_train_iterator(c, (0, 2)))))
    (tmp_path / "ckpt" / "2" / "data" / "shard-1-of-2.json").write_text('{"order_se')
    with pytest.raises(ValueError):  # (json's)
      manager.restore(2, args=ocp.args.Composite(data=data_position.DataRestore(
          pipeline.make_train_iterator(c, (0, 2)))))
  with pytest.raises(ConfigError, match="not a whole number of shards"):
    pipeline.make_train_iterator(c, (0, 1))


def test_processes_get_disjoint_documents(config):
  c = _with(config, **{"train.batch_size": 2})
  chunk_docs = _chunks_by_doc(c, "train")
  seen = []
  for index in range(2):
    batches = pipeline.train_dataset(c, index, 2, num_epochs=1)
    seen.append({d for b in batches for s in _segments(b) for d in chunk_docs[s]})
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  assert all(b["inputs"].shape == (1, SEQ_LEN) for b in pipeline.train_dataset(c, 1, 2, 1))


def test_worker_processes_give_the_same_batches(config, tmp_path):
  with pytest.raises(ConfigError, match=r"^data.num_workers=1000 is more than this host's \d+ "):
    pipeline.validate(_with(config, **{"data.num_workers": 1000}))  # (a process each)
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match=r"^data.data_dir=\S+/file is a file"):
    pipeline.validate(_with(config, **{"data.data_dir": str(tmp_path / "file")}))
  with_worker = pipeline.make_train_iterator(_with(config, **{"data.num_workers": 1}))
  try:
    _assert_same(_take(pipeline.make_train_iterator(config), 2), _take(with_worker, 2))
  finally:
    with_worker.close()


def test_resume_with_another_worker_count_is_refused(config, tmp_path):
  """grain accepts a position saved by another number of workers and fails steps later (or
  reads from the wrong place): the restore names data.num_workers instead."""
  two = pipeline.make_train_iterator(_with(config, **{"data.num_workers": 2}))
  try:
    _take(two, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
      manager.save(2, args=ocp.args.Composite(data=data_position.data_save_args(two)))
      manager.wait_until_finished()
      expected = _take(two, 2)
      for workers in (0, 1):
        other = pipeline.make_train_iterator(_with(config, **{"data.num_workers": workers}))
        try:
          with pytest.raises(ConfigError, match=f"saved with data.num_workers=2, this run uses "
                                                f"{workers}: set --config.data.num_workers=2"):
            manager.restore(2, args=ocp.args.Composite(data=data_position.DataRestore(other)))
        finally:
          other.close()
      same = pipeline.make_train_iterator(_with(config, **{"data.num_workers": 2}))
      try:
        manager.restore(2, args=ocp.args.Composite(data=data_position.DataRestore(same)))
        _assert_same(expected, _take(same, 2))
      finally:
        same.close()
  finally:
    two.close()


def test_eval_batches(config):
  batches = pipeline.eval_batches(config, 3)
  assert 1 <= len(batches) <= 3
  _assert_same(batches, pipeline.eval_batches(config, 3))
  assert all(b["inputs"].shape == (4, SEQ_LEN) for b in batches)
  segments = [s for b in batches for s in _segments(b)]
  assert collections.Counter(segments) <= collections.Counter(
      {k: len(v) for k, v in _chunks_by_doc(config, "validation").items()})
  big = _with(config, **{"train.batch_size": 64})  # More rows than validation has: padded.
  (batch,) = pipeline.eval_batches(big, 5)
  assert batch["inputs"].shape == (64, SEQ_LEN)
  assert not batch["weights"][-1].any() and batch["weights"].sum() > 0
  halves = [pipeline.eval_batches(big, 5, (32 * i, 32 * (i + 1))) for i in range(2)]
  assert [len(h) for h in halves] == [1, 1]
  np.testing.assert_array_equal(
      np.concatenate([h[0]["inputs"] for h in halves]), batch["inputs"])


def test_validate_accepts_good_config(config):
  pipeline.validate(config)
  pipeline.validate(config, process_count=2)


@pytest.mark.parametrize("overrides,match", [
    ({"data.tokenizer": "/nonexistent/tok.model"},
     r"python -m transformer_jax.tokenizer --corpus=.* --vocab_size=512 "
     r"--out=/nonexistent/tok.model"),
    ({"model.vocab_size": 100}, r"model.vocab_size=100 .*\(\d+\)"),
    ({"data.corpus": "/nonexistent/**/*.txt"}, "matches no files"),
    ({"data.seq_len": 1}, "data.seq_len"),
    ({"train.batch_size": 3}, "train.batch_size=3"),
])
def test_validate_errors(config, overrides, match):
  with pytest.raises(ConfigError, match=match):
    pipeline.validate(_with(config, **overrides), process_count=2)


def test_bad_documents_are_counted_and_never_crash_training_data(tokenizer_path, tmp_path, capsys):
  """Empty documents, invalid UTF-8, a binary file and a 2 MB document: preparation prints what it
  skipped or repaired, and the pipeline packs every batch (the huge document in seq_len chunks)."""
  root = tmp_path / "bad"
  root.mkdir()
  (root / "empty.txt").write_text("")
  (root / "blank.txt").write_text("  \n\n")
  (root / "latin1.txt").write_bytes("caf\xe9 = 1\n".encode("latin-1") * 20)
  (root / "blob.txt").write_bytes(b"\x00\x01\x02" * 1000)
  (root / "huge.txt").write_text("def f(x):\n    return x + 1\n" * 80_000)  # 2.2 MB
  for i in range(5):
    (root / f"ok{i}.txt").write_text(CODE)
  c = _base_config()
  c.data.update(corpus=f"{root}/*.txt", data_dir=str(tmp_path / "tfds"), tokenizer=tokenizer_path,
                seq_len=SEQ_LEN)
  c.train.batch_size = 4
  c.model.vocab_size = 512
  batches = _take(pipeline.make_train_iterator(c), 30)
  out = capsys.readouterr().out
  assert "skipped 1 binary files and 2 empty documents; 1 documents had invalid UTF-8" in out
  assert all(b["inputs"].shape == (4, SEQ_LEN) for b in batches)
  assert all(b["weights"].sum() > 0 for b in batches)
  assert max(len(s) for b in batches for s in _segments(b)) == SEQ_LEN  # the huge one, chunked


def test_tokenizer_cli_says_why_it_made_fewer_pieces(corpus_dir, tmp_path, capsys):
  out = tmp_path / "big.model"
  assert tokenizer_cli.main([f"--corpus={corpus_dir}/code/**/*.py", "--vocab_size=20000",
                             f"--out={out}"]) == 0
  made = tokenizer_lib.load(str(out)).vocab_size
  assert made < 20000
  assert (f"note: asked for 20000 pieces, made {made}: the corpus has no more distinct pieces"
          in capsys.readouterr().out)
