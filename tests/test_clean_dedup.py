"""The cleaner's dedup stages (data/clean/dedup.py): near duplicates removed by their measured
similarity, words with their combining marks, and a long document compared whole."""

import json
import random

from tests.test_clean import _prose, _run
from transformer_jax.data import corpus as corpus_lib


def test_near_duplicates_are_removed_by_their_similarity_not_by_band_collisions():
  """Pairs of 200-word documents whose word 5-gram Jaccard is known exactly (k words replaced,
  5 apart): at --near_threshold=0.8 the pairs at 0.86 are removed and those at 0.73 kept;
  every removal's value is the signatures' agreement, at least the threshold. (datasketch's
  balanced bands, with no check of the agreement, removed 42 and 3 of these 60 and 60.)"""
  from transformer_jax.data.clean import dedup  # pylint: disable=g-import-not-at-top
  rng = random.Random(3)
  near = dedup.Near(0.8, 128, 5, 0)

  def pair(i, replaced):
    words = [f"w{rng.randrange(10 ** 6)}" for _ in range(200)]
    copy = list(words)
    for j in range(replaced):
      copy[8 + 10 * j] = f"x{i}_{j}"
    return [{"id": f"{i:03d}a", "text": " ".join(words)},
            {"id": f"{i:03d}b", "text": " ".join(copy)}]

  def jaccard(a, b):
    a, b = set(dedup.shingles(a["text"], 5)), set(dedup.shingles(b["text"], 5))
    return len(a & b) / len(a | b)

  removed = {}
  for label, replaced in (("0.86", 3), ("0.73", 6)):  # (196-5k)/(196+5k): 0.855, 0.734
    for i in range(60):
      docs = pair(i + (100 if replaced == 6 else 0), replaced)
      assert abs(jaccard(*docs) - (196 - 5 * replaced) / (196 + 5 * replaced)) < 1e-9
      for doc in docs:
        near.analyze(doc)
        out = near.decide(doc)
        if out is None:
          near.keep(doc)  # (the pipeline's call for a written document)
        else:
          assert doc["id"].endswith("b") and doc["duplicate_of"] == doc["id"][:-1] + "a"
          agree = sum(x == y for x, y in zip(doc["signature"], near.kept[doc["duplicate_of"]]))
          assert out == ("near", agree / 128) and agree / 128 >= 0.8
          removed[label] = removed.get(label, 0) + 1
  assert removed.get("0.86", 0) >= 54 and removed.get("0.73", 0) <= 2, removed
  # A match of several kept documents is named by the first kept (ids sorted as strings named
  # d:10 before d:9)
  text = " ".join(f"w{rng.randrange(10 ** 6)}" for _ in range(50))
  docs = [{"id": f"d:{i}", "text": text} for i in (9, 10, 11)]
  for doc in docs:
    near.analyze(doc)
  assert near.decide(docs[0]) is None
  near.keep(docs[0])
  near.keep(docs[1])  # (kept, as a document below the threshold would be)
  assert near.decide(docs[2]) == ("near", 1.0) and docs[2]["duplicate_of"] == "d:9"
  # a word keeps its combining marks: Hindi vowel signs were dropped, so texts that differ in
  # every word's signs had the same shingles (and the second was removed at similarity 1.0)
  hindi = "हिन्दी भाषा बहुत सुंदर है और इसे करोड़ों लोग बोलते हैं"
  other = hindi.translate({ord("ि"): "ु", ord("ा"): "े", ord("ं"): "ँ", ord("ै"): "ौ"})
  assert b" ".join(dedup.shingles(hindi, 20)).decode() == hindi  # (the words whole)
  assert len(set(dedup.shingles(hindi, 2)) & set(dedup.shingles(other, 2))) == 2  # of 9
  # a script written without spaces: each letter (with its marks) is a word. A Chinese clause was
  # one word, so one character changed of 131 left its copy at word 5-gram Jaccard 0.09 (kept).
  chinese = "".join(chr(rng.randrange(0x4E00, 0x9FA5)) for _ in range(131))
  copy = chinese[:65] + chr(0x9FA5) + chinese[66:]  # (a character the draw never makes)
  words = dedup._words().findall("abc中文ok ภาษา हिन्दी カタカナ 한국어")  # pylint: disable=protected-access
  assert words == ["abc", "中", "文", "ok", "ภ", "า", "ษ", "า", "हिन्दी", "カ", "タ", "カ", "ナ",
                   "한국어"]
  a, b = set(dedup.shingles(chinese, 5)), set(dedup.shingles(copy, 5))
  assert len(a & b) / len(a | b) == (127 - 5) / (127 + 5)  # 0.92: five 5-grams hold the change
  docs = [{"id": "zh:a", "text": chinese}, {"id": "zh:b", "text": "，".join([copy[:60], copy[60:]])}]
  for doc in docs:
    near.analyze(doc)
  assert near.decide(docs[0]) is None
  near.keep(docs[0])
  assert near.decide(docs[1])[0] == "near" and docs[1]["duplicate_of"] == "zh:a"


def test_a_long_document_is_deduplicated_whole_not_piece_by_piece(tmp_path, monkeypatch):
  """A piece ID#k that matched an earlier document's was removed alone, and the kept pieces
  around it were joined into one record: text that was never written. The pieces of a long
  document are compared as one document now: kept whole where one piece repeats, removed whole
  (each piece counted) where all of it does, exactly or nearly."""
  monkeypatch.setattr(corpus_lib, "MAX_DOCUMENT_CHARS", 1000)
  rng = random.Random(6)
  paragraph = lambda: " ".join(_prose(rng, sentences=20).split()[:110])  # (a piece each)
  shared = paragraph()
  a = "\n".join([paragraph(), shared, paragraph()])
  b = "\n".join([paragraph(), shared, paragraph()])
  near = a[:-30] + " and a different ending of the document."
  (tmp_path / "c").mkdir()
  for name, text in (("a.txt", a), ("b.txt", b), ("c_copy.txt", a), ("d_near.txt", near)):
    (tmp_path / "c" / name).write_text(text)
  pieces = list(corpus_lib.iter_documents(str(tmp_path / "c" / "b.txt"), "text"))
  assert [t for _, t in pieces][1] == shared + "\n"  # (the same piece as a's)
  summary = _run(str(tmp_path / "c" / "*.txt"), tmp_path / "out", fmt="text", languages="none",
                 quality="none", dedup="exact,near")
  records = [json.loads(x) for x in open(tmp_path / "out" / "part-00000.jsonl", encoding="utf-8")]
  assert [(r["id"], r["text"]) for r in records] == [("a.txt", a), ("b.txt", b)]
  assert summary["removed"]["exact_duplicate"] == summary["removed"]["near_duplicate"] == 3
  removed = json.loads(open(tmp_path / "out" / "removed" / "near_duplicate.jsonl").read())
  assert (removed["id"], removed["duplicate_of"]) == ("d_near.txt", "a.txt")
