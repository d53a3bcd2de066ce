"""Tests of the fast input pipeline: data.pretokenize (token ids written once, when the TFDS dataset
is prepared) and data.packing = "concat" (documents concatenated and cut into full rows)."""

import glob
import json
import os
import shutil
import time

import grain
import numpy as np
import pytest

from tests.conftest import tiny_overrides
from tests.test_data import _assert_same, _take
from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import pipeline
from transformer_jax.data import tfds_text
from transformer_jax.data import tokenization as tokenizer_lib
from transformer_jax.training import data_position

SEQ_LEN = 32


def _config(tiny_data, **extra):
  return config_lib.load("configs/gpt2.py:tiny", tiny_overrides(tiny_data, **extra))


def test_pretokenized_batches_equal_the_text_path(tiny_data):
  text = _config(tiny_data, **{"data.pretokenize": False})
  tokens = _config(tiny_data, **{"data.pretokenize": True})
  _assert_same(_take(pipeline.make_train_iterator(text), 4),
               _take(pipeline.make_train_iterator(tokens), 4))
  _assert_same(pipeline.eval_batches(text, 2), pipeline.eval_batches(tokens, 2))
  tok = tokenizer_lib.load(tiny_data["tokenizer"])
  texts, ids = (tfds_text.data_source(tokens.data, "train", tokenized=t) for t in (False, True))
  assert len(texts) == len(ids)
  for i in range(len(ids)):  # Index i is text document i, tokenized.
    assert ids[i]["id"] == texts[i]["id"]
    assert list(ids[i]["tokens"]) == [2] + tok.encode(texts[i]["text"].decode()) + [3]


def _doc_stream(config):
  """The training documents' tokens in the shuffled order of one epoch (one data shard)."""
  source = tfds_text.data_source(config.data, "train", tokenized=True)
  seed = pipeline._order_seed(config.seed, 0, 1)  # pylint: disable=protected-access
  docs = grain.MapDataset.source(source).shuffle(seed=seed)
  return [np.asarray(docs[i]["tokens"]) for i in range(len(docs))]


def _check_rows(batches, seq_len):
  """Segments 1, 2, .. follow each other in a row; positions restart at 0 and count up in every
  segment; targets and weights are clm's."""
  for b in batches:
    seg, pos = b["segment_ids"], b["positions"]
    for r in range(seg.shape[0]):
      real = seg[r][seg[r] > 0]
      assert (np.diff(real) >= 0).all() and (np.unique(real) == np.arange(1, real.max() + 1)).all()
      for s in np.unique(real):
        np.testing.assert_array_equal(pos[r][seg[r] == s], np.arange((seg[r] == s).sum()))
    same_next = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
    np.testing.assert_array_equal(b["weights"][:, :-1], same_next)
    np.testing.assert_array_equal(np.where(same_next, b["targets"][:, :-1], 0),
                                  np.where(same_next, b["inputs"][:, 1:], 0))
    assert b["inputs"].shape[1] == seq_len


def test_concat_rows_are_full_and_reconstruct_the_documents(tiny_data):
  c = _config(tiny_data, **{"data.packing": "concat", "train.batch_size": 1})
  rows = list(pipeline.train_dataset(c, num_epochs=1))
  _check_rows(rows, SEQ_LEN)
  seg = np.concatenate([r["segment_ids"] for r in rows])
  assert (seg[:-1] > 0).all()  # Every row is full; only the last one may be padded.
  docs = _doc_stream(c)
  stream = np.concatenate(docs)
  inputs = np.concatenate([r["inputs"] for r in rows])
  np.testing.assert_array_equal(inputs[seg > 0], stream)  # In order, nothing lost.
  # Inside a row, a new piece (segment) starts exactly where a document ends.
  new_piece = (seg[:, 1:] != seg[:, :-1]) & (seg[:, 1:] > 0)
  starts = {r * SEQ_LEN + j + 1 for r, j in zip(*np.nonzero(new_piece))}
  doc_ends = np.cumsum([len(d) for d in docs])
  assert starts == {e for e in doc_ends.tolist() if e % SEQ_LEN and e < len(stream)}


def test_concat_infinite_stream_has_no_padding(tiny_data):
  c = _config(tiny_data, **{"data.packing": "concat"})
  batches = _take(pipeline.make_train_iterator(c), 12)  # Several epochs of the tiny corpus.
  _check_rows(batches, SEQ_LEN)
  assert all((b["segment_ids"] > 0).all() for b in batches)
  assert any(len(np.unique(b["segment_ids"][r])) > 1 for b in batches for r in range(4))


@pytest.mark.parametrize("overrides", [
    {"data.packing": "concat"},
    {"data.packing": "concat", "data.shards": 2},
    {"data.pretokenize": True},
])
def test_resume_gives_the_same_batches(tiny_data, overrides):
  c = _config(tiny_data, **overrides)
  it = pipeline.make_train_iterator(c)
  first = _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # As the checkpoint writes it.
  expected = _take(it, 4)
  fresh = pipeline.make_train_iterator(c)
  fresh.set_state(state)
  _assert_same(expected, _take(fresh, 4))
  _assert_same(first, _take(pipeline.make_train_iterator(c), 3))  # Deterministic per seed.
  other = _take(pipeline.make_train_iterator(_config(tiny_data, seed=1, **overrides)), 3)
  assert any((a["inputs"] != b["inputs"]).any() for a, b in zip(first, other))


def test_changed_tokenizer_file_reprepares(tiny_data, tmp_path):
  path = tmp_path / "tok.model"
  shutil.copy(tiny_data["tokenizer"], path)
  c = _config(tiny_data, **{"data.tokenizer": str(path), "data.data_dir": str(tmp_path / "tfds")})
  old = tfds_text.data_source(c.data, "train", tokenized=True)
  old_name = tfds_text.tokenized_builder(c.data).builder_config.name
  texts = [t for _, t in corpus_lib.iter_documents(tiny_data["corpus"])]
  tokenizer_lib.train(texts, 310, str(path))  # Another model at the same path.
  new_name = tfds_text.tokenized_builder(c.data).builder_config.name
  assert new_name != old_name
  new = tfds_text.data_source(c.data, "train", tokenized=True)
  tok = tokenizer_lib.load(str(path))
  text = tfds_text.data_source(c.data, "train")
  assert [list(new[i]["tokens"]) for i in range(len(new))] == [
      [2] + tok.encode(text[i]["text"].decode()) + [3] for i in range(len(text))]
  assert any(len(old[i]["tokens"]) != len(new[i]["tokens"]) for i in range(len(new)))
  c.data.add_eos = False
  assert tfds_text.tokenized_builder(c.data).builder_config.name not in (old_name, new_name)


@pytest.mark.parametrize("overrides,match", [
    ({"data.packing": "best"}, "data.packing='best' is unknown"),
    ({"data.packing": "concat", "data.objective": "prefix_lm"}, "causal LM rows only"),
])
def test_validate_errors(tiny_data, overrides, match):
  with pytest.raises(ConfigError, match=match):
    pipeline.validate(_config(tiny_data, **overrides))


def test_a_saved_position_of_the_other_packing_is_refused(tiny_data):
  its = {p: pipeline.make_train_iterator(_config(tiny_data, **{"data.packing": p}))
         for p in pipeline.PACKINGS}
  states = {p: (next(it), it.get_state())[1] for p, it in its.items()}
  for p, it in its.items():
    other = next(q for q in pipeline.PACKINGS if q != p)
    with pytest.raises(ConfigError, match="does not fit this input pipeline"):
      it.set_state(states[other])


def test_missing_tokenizer_command_carries_the_corpus_fields(tmp_path):
  """The "create it with" command reads the same documents the run will: pair fields and the
  TFDS data dir for catalog corpora and jsonl pairs, nothing extra for plain text."""
  config = config_lib.load("configs/transformer.py:base", [
      f"data.tokenizer={tmp_path / 'missing.model'}", f"data.data_dir={tmp_path / 'tfds'}"])
  with pytest.raises(ConfigError) as e:
    pipeline.load_tokenizer(config)
  assert (f"--corpus=tfds:wmt14_translate/de-en --source_field=en --target_field=de "
          f"--data_dir={tmp_path / 'tfds'} --vocab_size=37000 --out=") in str(e.value)
  command = tokenizer_lib.create_command("t.model", corpus="pairs/*.jsonl", fmt="jsonl_pairs",
                                         source_field="q", target_field="a", data_dir="/ignored")
  assert command == ("python -m transformer_jax.tokenizer --corpus='pairs/*.jsonl' "
                     "--format=jsonl_pairs --source_field=q --target_field=a --vocab_size=8192 "
                     "--out=t.model")
  assert tokenizer_lib.create_command("t.model", source_field="q") == (
      "python -m transformer_jax.tokenizer --corpus=stdlib --vocab_size=8192 --out=t.model")
  # and the control pieces the objective needs (a T5 run told to make a tokenizer without them)
  config = config_lib.load("configs/t5.py:tiny", [f"data.tokenizer={tmp_path / 'm.model'}"])
  with pytest.raises(ConfigError, match=r"--vocab_size=\d+ --special=mask,sentinels:100,ul2 "):
    pipeline.load_tokenizer(config)


def test_the_data_config_is_validated_once_for_all_shards(tiny_data, monkeypatch):
  """Validation loads the tokenizer and builds the TFDS builder: once per iterator, not once per
  logical data shard (nor again for the validation batches)."""
  calls = []
  validate = pipeline.validate
  monkeypatch.setattr(pipeline, "validate", lambda *a, **k: calls.append(1) or validate(*a, **k))
  c = _config(tiny_data, **{"data.shards": 4})
  it = pipeline.make_train_iterator(c)
  next(it)
  pipeline.eval_batches(c, 1)
  assert len(it.shards) == 4 and len(calls) == 1


def test_an_empty_tokenizer_file_is_not_a_sentencepiece_model(tmp_path):
  """Was: 'has pad id -1; packing pads with 0' (an empty file parses as a model with no pieces)."""
  path = tmp_path / "empty.model"
  path.write_bytes(b"")
  with pytest.raises(ConfigError, match=r"^data.tokenizer='.*empty.model' is not a SentencePiece "
                                        r"model \(the file is empty\)$"):
    tokenizer_lib.load(str(path))


def test_a_sentencepiece_model_without_pad_trains(tiny_data, tmp_path):
  """Llama's tokenizer.model layout (unk 0, bos 1, eos 2, no pad) was refused ("has pad id -1;
  packing pads with 0"): padding is marked by segment id 0 and weight 0, whatever id fills it."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  texts = [t for _, t in corpus_lib.iter_documents(tiny_data["corpus"])]
  path = str(tmp_path / "llama_layout.model")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=path[:-6],
                                 vocab_size=300, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2,
                                 pad_id=-1, minloglevel=2)
  tok = tokenizer_lib.load(path)
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (-1, 0, 1, 2)
  c = _config(tiny_data, **{"data.tokenizer": path, "data.data_dir": str(tmp_path / "tfds")})
  pipeline.validate(c)
  (batch,) = _take(pipeline.make_train_iterator(c), 1)
  real = batch["segment_ids"] > 0
  assert real.any() and not batch["weights"][~real].any() and (batch["inputs"][real] >= 0).all()
  assert (batch["inputs"][real] == 1).any()  # documents start with bos (id 1)


def test_a_builder_not_yet_prepared_leaves_nothing_in_the_temporary_folder(tiny_data, tmp_path,
                                                                          monkeypatch):
  """TFDS's catalog-metadata lookup made an empty folder there at each construction (1,400 of
  them after one test suite); a local corpus has no catalog metadata to look up."""
  import tempfile  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temporary"))
  os.mkdir(tempfile.tempdir)
  for pretokenize in (False, True):
    c = _config(tiny_data, **{"data.data_dir": str(tmp_path / "tfds"),
                              "data.pretokenize": pretokenize})
    made = tfds_text.tokenized_builder(c.data) if pretokenize else tfds_text.builder(c.data)
    assert not os.path.exists(os.fspath(made.data_dir))  # not prepared
  assert os.listdir(tempfile.tempdir) == []


def test_ctrl_c_during_preparation_is_one_line_and_dead_leftovers_go(tiny_data, tmp_path,
                                                                     monkeypatch, capsys):
  """TFDS's writer turns a Ctrl-C into a RuntimeError (a traceback); a killed preparation's
  `incomplete.*` folder stayed forever. Now: KeyboardInterrupt (cli.run prints one line), and
  an untouched leftover is removed by the next preparation (a fresh one is left alone)."""
  c = _config(tiny_data, **{"data.data_dir": str(tmp_path / "tfds")})
  version_dir = tfds_text.builder(c.data).data_dir
  parent = os.path.dirname(os.fspath(version_dir).rstrip("/"))
  os.makedirs(os.path.join(parent, "incomplete.DEAD01_1.0.0"))
  os.makedirs(os.path.join(parent, "incomplete.LIVE01_1.0.0"))
  old = time.time() - 2 * tfds_text.STALE_INCOMPLETE_S
  os.utime(os.path.join(parent, "incomplete.DEAD01_1.0.0"), (old, old))

  def interrupted(self, *args, **kwargs):
    try:
      raise KeyboardInterrupt
    except KeyboardInterrupt as e:
      raise RuntimeError("Failed to write the shard") from e
  monkeypatch.setattr(type(tfds_text.builder(c.data)), "download_and_prepare", interrupted)
  with pytest.raises(KeyboardInterrupt):
    tfds_text.prepare(c.data)
  left = sorted(os.path.basename(p) for p in glob.glob(os.path.join(parent, "incomplete.*")))
  assert left == ["incomplete.LIVE01_1.0.0"]
  assert "left by an unfinished preparation" in capsys.readouterr().out


def test_each_data_shard_reads_its_documents_in_an_order_of_its_own(tiny_data):
  """Every shard reads each of its documents (every S-th stored one) once an epoch, in an order
  of its own: shards sharing one seed read stored neighbours in step (S pi(t) + k) every epoch.
  One shard keeps the order of the config's seed."""
  config = _config(tiny_data)
  stored = pipeline._documents(config, "train")  # pylint: disable=protected-access
  where = {stored[i]["id"]: i for i in range(len(stored))}
  s = 4
  for epoch in range(2):
    streams = []
    for k in range(s):
      docs = pipeline.shard_documents(config, config.seed, k, s)
      n = len(stored[k::s])
      streams.append([where[docs[epoch * n + t]["id"]] for t in range(n)])
      assert sorted(streams[-1]) == list(range(k, len(stored), s))
    steps = min(map(len, streams))
    in_step = sum(all(streams[k][t] - k == streams[0][t] for k in range(s)) for t in range(steps))
    assert steps > 10 and in_step <= 2, (steps, in_step)
  one = pipeline.shard_documents(config, config.seed, 0, 1)
  assert sorted(one[t]["id"] for t in range(len(stored))) == sorted(where)


def test_consecutive_seeds_read_unrelated_orders_in_every_epoch(tiny_data):
  """grain seeds epoch e's shuffle with seed + e: the raw seed s that one shard used to take
  read in epoch 1 the order that seed s + 1 read in epoch 0."""
  config = _config(tiny_data)
  n = len(pipeline._documents(config, "train"))  # pylint: disable=protected-access
  def epochs(seed, legacy=False):
    docs = pipeline.shard_documents(config, seed, 0, 1, legacy_order=legacy)
    return [[docs[e * n + t]["id"] for t in range(n)] for e in range(3)]
  seven, eight = epochs(7), epochs(8)
  assert all(a != b for a in seven for b in eight)
  old_seven, old_eight = epochs(7, legacy=True), epochs(8, legacy=True)
  assert old_seven[1:] == old_eight[:2]  # what the raw seeds did


def test_a_data_position_saved_before_the_hashed_order_seeds_resumes_in_its_order(tiny_data,
                                                                                  tmp_path):
  """A one-shard data position file without the order mark (grain's state alone, as written
  before) restores into the raw seed's order, exactly; a new one into the hashed order."""
  c = _config(tiny_data)
  old = pipeline.make_train_iterator(c)
  old.set_state(old.get_state(), legacy_order=True)  # the order a run before the change read
  new = pipeline.make_train_iterator(c)
  assert any((a["inputs"] != b["inputs"]).any() for a, b in zip(_take(old, 3), _take(new, 3)))
  handler = data_position.DataHandler()
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "shard-0-of-1.json").write_text(json.dumps(old.get_state()["0"]))
  (tmp_path / "new").mkdir()
  handler.save(tmp_path / "new", args=data_position.data_save_args(new))
  assert data_position.ORDER_MARK in json.loads((tmp_path / "new" / "shard-0-of-1.json").read_text())
  for name, it in (("old", old), ("new", new)):
    expected, fresh = _take(it, 4), pipeline.make_train_iterator(c)
    handler.restore(tmp_path / name, args=data_position.DataRestore(fresh))
    _assert_same(expected, _take(fresh, 4))
    (tmp_path / "again").mkdir(exist_ok=True)  # saved again (marked "raw" if old), restored
    handler.save(tmp_path / "again", args=data_position.data_save_args(fresh))
    expected, again = _take(fresh, 3), pipeline.make_train_iterator(c)
    handler.restore(tmp_path / "again", args=data_position.DataRestore(again))
    _assert_same(expected, _take(again, 3))


def test_a_data_position_changed_on_disk_is_damage_not_a_position(tiny_data, tmp_path):
  """A position file carries the checksum of what it says: one digit changed (a bad copy) was
  read as another position; now it is damage (ValueError: the checkpoint is set aside), and
  a file written before the checksums restores as it did."""
  c = _config(tiny_data)
  it, handler = pipeline.make_train_iterator(c), data_position.DataHandler()
  _take(it, 2)
  handler.save(tmp_path, args=data_position.data_save_args(it))
  path = tmp_path / "shard-0-of-1.json"
  saved = json.loads(path.read_text())
  expected = _take(it, 3)
  fresh = pipeline.make_train_iterator(c)
  handler.restore(tmp_path, args=data_position.DataRestore(fresh))
  _assert_same(expected, _take(fresh, 3))
  text = path.read_text()
  digit = next(i for i, ch in enumerate(text) if ch.isdigit() and ch != "9"
               and i > text.index('"grain"'))
  path.write_text(text[:digit] + str(int(text[digit]) + 1) + text[digit + 1:])
  with pytest.raises(ValueError, match=r"shard-0-of-1\.json is not the one saved: its checksum "
                                       r"differs"):
    handler.restore(tmp_path, args=data_position.DataRestore(pipeline.make_train_iterator(c)))
  del saved[data_position.DIGEST_MARK]  # (from before the checksums)
  path.write_text(json.dumps(saved))
  fresh = pipeline.make_train_iterator(c)
  handler.restore(tmp_path, args=data_position.DataRestore(fresh))
  _assert_same(expected, _take(fresh, 3))


def test_an_unmarked_position_of_several_shards_says_its_order_may_differ(tiny_data, capsys):
  """Such files were written in two orders (the raw seed until 30cc40f, then the hashed one):
  resumed in the hashed order, with a warning (a run from before 30cc40f went on silently in
  another order). One shard's is restored into its own order, without a word."""
  for shards, warned in ((2, True), (1, False)):
    it = pipeline.make_train_iterator(_config(tiny_data, **{"data.shards": shards}))
    it.set_state(it.get_state(), legacy_order=True)
    err = capsys.readouterr().err
    assert ("warning: the saved data position (2 shards) has no order mark" in err) == warned, err
    it.close()


def test_a_position_says_when_its_rows_were_made_another_way(tiny_data, tmp_path, capsys):
  """A position records the rows version it indexes (pipeline.ROWS_VERSION): a file of a newer
  version resumes with a warning naming both, one of this version in silence, and of an older
  one (marked without one: 1) with a warning only where its objective's rows changed since; an unmarked one (from before dee6b9b) warns only where its objective's rows changed
  before then (span and UL2 went on silently on other rows); a restored "raw" order is saved
  marked, and resumes in that order without a second warning."""
  base = config_lib.base.get_config().data
  for objective, pair, warned in (("span", "", True), ("ul2", "", True), ("mlm", "nsp", True),
                                  ("mlm", "sop", False), ("clm", "", False)):
    cfg = base.copy_and_resolve_references()
    cfg.objective, cfg.sentence_pair = objective, pair
    text = pipeline.rows_warning(cfg, None)
    assert bool(text) == warned and (not text or f"data.objective={objective}'s rows" in text)
    assert not pipeline.rows_warning(cfg, pipeline.ROWS_VERSION)
    # Version 1 (marked, no version): seq2seq's long sources lost their eos until version 2.
    assert not pipeline.rows_warning(cfg, 1)
  cfg.objective = "seq2seq"
  assert "data.objective=seq2seq's rows changed since then (2026-12-08: a source cut" in (
      pipeline.rows_warning(cfg, 1)) and not pipeline.rows_warning(cfg, 2)
  assert "a source cut to seq_len keeps its eos" in pipeline.rows_warning(cfg, None)
  c = _config(tiny_data)
  it, handler = pipeline.make_train_iterator(c), data_position.DataHandler()
  grain_state = it.get_state()["0"]
  for name, saved, said in (
      ("other", {"order_seed": "hashed", "rows": 99, "grain": grain_state},
       "of version 99; this"),  # (newer code's)
      ("marked", {"order_seed": "hashed", "grain": grain_state}, ""),
      ("raw", {"order_seed": "raw", "rows": pipeline.ROWS_VERSION, "grain": grain_state}, "")):
    (tmp_path / name).mkdir()
    (tmp_path / name / "shard-0-of-1.json").write_text(json.dumps(saved))
    fresh = pipeline.make_train_iterator(c)
    handler.restore(tmp_path / name, args=data_position.DataRestore(fresh))
    err = capsys.readouterr().err
    assert (said in err if said else "warning" not in err), (name, err)
    assert fresh.legacy_order == (name == "raw")
    handler.save(tmp_path / name, args=data_position.data_save_args(fresh))
    again = json.loads((tmp_path / name / "shard-0-of-1.json").read_text())
    order = "raw" if name == "raw" else "hashed"
    assert (again["order_seed"], again["rows"]) == (order, pipeline.ROWS_VERSION)
    fresh.close()
  it.close()


def test_only_replaced_bytes_count_as_invalid_utf8(tmp_path):
  """A U+FFFD written in the text is valid UTF-8: not counted (counting the character's presence
  took it for a replaced byte); the invalid byte is."""
  (tmp_path / "t.lines").write_bytes("a \ufffd\n".encode() + b"c \xff\n")
  skipped = corpus_lib.SkipCounts()
  docs = list(corpus_lib.iter_documents(str(tmp_path / "t.lines"), "lines", skipped=skipped))
  assert [t for _, t in docs] == ["a \ufffd", "c \ufffd"] and skipped.invalid_utf8_docs == 1
