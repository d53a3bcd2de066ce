"""The local tasks that evaluation.corpus_tasks makes from a corpus: next-line distractors from
other files, and test examples from the documents training holds out."""

import json
import random

from tests.conftest import REPO, tiny_overrides
from transformer_jax import config as config_lib
from transformer_jax.evaluation import corpus_tasks


def test_next_line_distractors_come_from_other_files():
  """The 3 wrong choices are lines of other documents (a line of the example's own file may be
  a plausible next line), distinct, and the label points at the real next line."""
  docs = [(f"doc{d}", "\n".join(f"value_{d}_{i} = compute({d}, {i})" for i in range(30)))
          for d in range(6)]
  examples = corpus_tasks.next_line(docs, 60, random.Random(0))
  assert len(examples) == 60
  lines = {doc_id: text.splitlines() for doc_id, text in docs}
  for ex in examples:
    truth = ex["choices"][ex["label"]]
    assert ex["context"].splitlines()[-1] == lines[ex["id"]][lines[ex["id"]].index(truth) - 1]
    wrong = [c for c in ex["choices"] if c != truth]
    assert len(wrong) == len(set(wrong)) == 3
    assert not set(wrong) & set(lines[ex["id"]]), ex


def test_corpus_tasks_hold_out_what_training_holds_out(tiny_data, tmp_path):
  """No document hashes under the fraction: training holds out the one of smallest hash, and so
  do the tasks' test files (they came out empty, that document going to the few-shot files);
  its next-line questions still have 4 choices."""
  from transformer_jax.data import tfds_text  # pylint: disable=g-import-not-at-top
  c = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(
      tiny_data, **{"data.validation_fraction": 0.001}))
  builder = tfds_text.builder(c.data)
  held = [doc_id for doc_id, _ in builder._validation_docs()]  # pylint: disable=protected-access
  corpus_tasks.make(str(tmp_path), tiny_data["corpus"], examples=20, validation_fraction=0.001)
  rows = [json.loads(line) for line in open(tmp_path / "heldout_text.jsonl")]
  assert len(held) == 1 and [r["id"] for r in rows] == held
  fewshot = [json.loads(line)["id"] for line in open(tmp_path / "last_word_train.jsonl")]
  assert fewshot and held[0] not in fewshot
  # one held-out document: the distractors come from the others (its questions had one choice)
  questions = [json.loads(line) for line in open(tmp_path / "next_line.jsonl")]
  assert questions and all(len(q["choices"]) == 4 == len(set(q["choices"])) for q in questions)


def test_a_jsonl_corpus_is_read_as_training_reads_it(tiny_data, tmp_path):
  """--format=jsonl: documents are the records, and the test examples come from the records
  training holds out (read as text, a shard was one document, JSON and all, and its split
  another); prose with no short lines is refused; --config (ignored before) is refused."""
  import pytest  # pylint: disable=g-import-not-at-top
  from transformer_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tfds_text  # pylint: disable=g-import-not-at-top
  docs = [text for _, text in corpus_lib.iter_documents(tiny_data["corpus"])]
  (tmp_path / "c").mkdir()
  for shard in range(2):
    (tmp_path / "c" / f"part-{shard}.jsonl").write_text("".join(
        json.dumps({"body": text}) + "\n" for text in docs[shard::2]))
  corpus = f"{tmp_path}/c/*.jsonl"
  c = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data, **{
      "data.corpus": corpus, "data.format": "jsonl", "data.text_field": "body",
      "data.validation_fraction": 0.1}))
  builder = tfds_text.builder(c.data)
  held = [i for i, _ in builder._validation_docs()]  # pylint: disable=protected-access
  flags = [f"--corpus={corpus}", "--format=jsonl", "--text_field=body", "--examples=20",
           "--validation_fraction=0.1"]
  corpus_tasks.main([f"--out={tmp_path}/tasks", *flags])
  rows = [json.loads(line) for line in open(tmp_path / "tasks" / "heldout_text.jsonl")]
  assert len(held) >= 2 and [r["id"] for r in rows] == held[:20]
  by_id = {f"part-{s}.jsonl:{k + 1}": text for s in range(2) for k, text in enumerate(docs[s::2])}
  assert all(r["text"] == by_id[r["id"]][:2000] for r in rows)
  with pytest.raises(ConfigError, match=r"^--format='lines': expected text or jsonl"):
    corpus_tasks.main([f"--out={tmp_path}/t1", f"--corpus={corpus}", "--format=lines"])
  for bad in ("--validation_fraction=1.5", "--examples=-1"):  # (training refuses the fraction)
    with pytest.raises(ConfigError, match=r"^need --examples >= 1 and 0 <= --validation_"):
      corpus_tasks.main([f"--out={tmp_path}/t3", f"--corpus={corpus}", bad])
  with pytest.raises(ConfigError, match=r"^corpus_tasks takes no --config"):
    corpus_tasks.main([f"--out={tmp_path}/t2", *flags, "--config.data.format=jsonl"])
  (tmp_path / "prose").mkdir()
  for i in range(8):
    (tmp_path / "prose" / f"{i}.txt").write_text(" ".join(["word"] * 40 + [str(i)]) + "\n")
  with pytest.raises(ConfigError, match=r"gives no next-line or last-word example"):
    corpus_tasks.make(str(tmp_path / "t3"), f"{tmp_path}/prose/*.txt", validation_fraction=0.5)
