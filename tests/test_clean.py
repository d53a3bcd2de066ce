"""The corpus cleaner (transformer_jax.clean): planted duplicates, languages and low-quality
documents are removed (and only those), each counted once, the same for any --workers; bad
input is counted, never fatal; user mistakes are one-line errors."""

import collections
import glob
import gzip
import json
import os
import random
import re
import subprocess
import sys
import unicodedata

import pytest

from transformer_jax import clean
from transformer_jax.config import ConfigError
from transformer_jax.data import clean as clean_lib
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data.clean import c4
from transformer_jax.data.clean import gopher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENGLISH = (
    "the of and to in that have with for on was they from this by at but not are which one all "
    "would there their what about when make like time just know people into year your good some "
    "could them other than then look only come over think also back after work first well way "
    "even new want because any these give most river garden winter morning village teacher "
    "window market history summer letter family city mountain music children evening story "
    "water friend house road table paper light forest doctor kitchen animal island journey "
    "quiet bright careful simple heavy gentle early little ancient modern golden narrow "
    "walked carried opened listened remembered painted followed noticed answered visited").split()
_GERMAN = (
    "der die das und ist nicht ein eine zu mit sich auf für von dem den des im auch es an werden "
    "aus er hat dass sie nach wird bei einer um am sind noch wie einem über einen so zum war "
    "haben nur oder aber vor zur bis mehr durch man sein wurde sei Haus Garten Winter Morgen "
    "Dorf Lehrer Fenster Markt Geschichte Sommer Brief Familie Stadt Berg Kinder Abend Wasser "
    "Freund Straße Tisch Licht Wald Küche Reise ruhig hell einfach schwer früh klein alt").split()


def _prose(rng: random.Random, words=_ENGLISH, sentences: int = 24) -> str:
  """Random sentences of common words in short paragraphs: normal prose for every filter."""
  out = []
  for i in range(sentences):
    sentence = " ".join(rng.choice(words) for _ in range(rng.randint(8, 14)))
    out.append(sentence[0].upper() + sentence[1:] + ".")
    out.append("\n\n" if i % 4 == 3 else " ")
  return "".join(out).strip()


def _near_copy(rng: random.Random, text: str) -> str:
  """`text` with one word replaced: word 5-gram Jaccard ~0.97."""
  words = text.split(" ")
  i = rng.randrange(10, len(words) - 10)
  words[i] = "zebra"
  return " ".join(words)


def _planted_corpus(tmp_path, rng):
  """A JSONL corpus: 60 distinct English documents, plus planted exact and near duplicates,
  German documents and low-quality ones. Returns (glob, {reason: planted ids})."""
  docs, planted = [], {"exact_duplicate": set(), "near_duplicate": set(), "language": set(),
                       "quality": set()}
  originals = [_prose(rng) for _ in range(60)]
  docs += [(f"prose{i}", t) for i, t in enumerate(originals)]
  for i in range(0, 60, 10):  # exact copies: other whitespace, decomposed accents
    copy = unicodedata.normalize("NFD", originals[i].replace(" ", "  \n", 3) + "  café")
    docs.append((f"exact{i}", copy))
    planted["exact_duplicate"].add(f"exact{i}")
    docs[i] = (docs[i][0], originals[i] + " café")
  for i in range(5, 60, 10):
    docs.append((f"near{i}", _near_copy(rng, originals[i])))
    planted["near_duplicate"].add(f"near{i}")
  for i in range(4):
    docs.append((f"german{i}", _prose(rng, _GERMAN)))
    planted["language"].add(f"german{i}")
  bad = {"short": "Too short to be a document at all.",
         "bullets": "\n".join(f"- {_prose(rng, sentences=1)}" for _ in range(12)),
         "repeated": "\n".join([_prose(rng, sentences=2)] * 8),
         "symbols": _prose(rng) + " #tag" * 80}
  for name, text in bad.items():
    docs.append((f"quality_{name}", text))
    planted["quality"].add(f"quality_{name}")
  rng.shuffle(docs[60:])  # planted ones after their originals
  path = tmp_path / "corpus" / "docs.jsonl"
  path.parent.mkdir()
  path.write_text("".join(json.dumps({"name": n, "text": t}) + "\n" for n, t in docs))
  ids = {f"docs.jsonl:{k + 1}": name for k, (name, _) in enumerate(docs)}
  return str(path.parent / "*.jsonl"), planted, ids


def _flags(**overrides) -> dict:
  return dict(clean.FLAGS, **overrides)


def _run(corpus, out, fmt="jsonl", workers=1, plots=False, **flags):
  stages = clean_lib.build_stages(_flags(**flags))
  return clean_lib.run(corpus, fmt, "text", str(out), stages, workers=workers, plots=plots)


def _removed_names(out, reason, ids) -> set:
  path = os.path.join(out, "removed", f"{reason}.jsonl")
  if not os.path.exists(path):
    return set()
  with open(path, encoding="utf-8") as f:
    return {ids[json.loads(line)["id"]] for line in f}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("clean")
  corpus, planted_ids, ids = _planted_corpus(tmp, random.Random(0))
  outs = {w: tmp / f"out{w}" for w in (1, 2)}
  summaries = {w: _run(corpus, outs[w], workers=w, languages="en", plots=w == 1)
               for w in (1, 2)}
  return planted_ids, ids, outs, summaries


def test_planted_documents_are_removed_and_only_those(planted):
  planted_ids, ids, outs, summaries = planted
  summary = summaries[1]
  for reason, names in planted_ids.items():
    assert _removed_names(outs[1], reason, ids) == names, reason
    assert summary["removed"][reason] == len(names), reason
  assert summary["documents_in"] == len(ids)
  assert summary["documents_out"] == len(ids) - sum(summary["removed"].values()) == 60
  kept = list(corpus_lib.iter_documents(str(outs[1] / "*.jsonl"), "jsonl"))
  assert len(kept) == 60  # the shards read back as a corpus
  records = [json.loads(line) for p in sorted(glob.glob(str(outs[1] / "part-*.jsonl")))
             for line in open(p, encoding="utf-8")]
  assert {r["language"] for r in records} == {"en"}
  assert all(r["language_score"] >= 0.65 for r in records)
  assert os.path.exists(outs[1] / "report.md")
  assert len(glob.glob(str(outs[1] / "plots" / "*.png"))) == 4  # a plot per stage


def test_result_does_not_depend_on_workers(planted):
  _, _, outs, summaries = planted
  def files(out):
    paths = sorted(glob.glob(str(out / "part-*.jsonl")) + glob.glob(str(out / "removed" / "*")))
    return {os.path.relpath(p, out): open(p, "rb").read() for p in paths}
  assert files(outs[1]) == files(outs[2])
  def counts(summary):
    return {k: v for k, v in summary.items()
            if k not in ("seconds", "workers", "cpu_seconds") and "per_s" not in k}
  assert counts(summaries[1]) == counts(summaries[2])


def test_quality_rules_read_any_line_ending_and_passage_order():
  """Paragraphs split at blank lines written as CRLF or holding spaces, NBSP included (the whole
  document was one paragraph); the top n-gram share takes the longest of equally frequent
  n-grams (the first seen decided); a C4 sentence may end in a closing quote (a page of quoted
  speech had none)."""
  rng = random.Random(4)
  body = "\n".join(_prose(rng, sentences=1) for _ in range(20))
  repeated = "The very same paragraph comes back here again and again."
  for blank in ("\n\n", "\r\n\r\n", "\n \n", "\n\xa0\n", "\n\u3000\n"):
    text = blank.join([body] + [repeated] * 3)
    assert gopher.check(text, gopher.Limits())[1] == ("duplicate_paragraphs", 0.5), repr(blank)
  words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
  short, long_ = ["the", "of"] * 6, ["extraordinarily", "magnificent"] * 6
  value = lambda w: gopher._top_ngram(w, 2, sum(map(len, w)))  # pylint: disable=protected-access
  assert value(short + words + long_) == value(long_ + words + short) > 0.4
  quoted = "\n".join(f'He said, "I will be there at noon on day {i} of the trip."' for i in range(3))
  for text in (quoted, quoted.replace('"', "\u201c").replace("trip.\u201c", "trip.\u201d")):
    _, values, failure = c4.check(text, c4.Limits())
    assert values["sentences"] == 3 and failure is None


def test_a_long_documents_later_pieces_go_with_its_removed_first_piece():
  """Pieces ID#k of a document over 1 MiB are judged one by one: the tail of a book that failed
  max_words was short enough to pass and was kept."""
  from transformer_jax.data.clean import quality  # pylint: disable=g-import-not-at-top
  stage = quality.Quality(("gopher",), gopher.Limits(max_words=150), c4.Limits())
  rng = random.Random(5)
  text = lambda n: _prose(rng, sentences=n) + " The end of it, and that is that."
  docs = [{"id": "book.txt#0", "text": text(24)}, {"id": "book.txt#1", "text": text(6)},
          {"id": "other.txt", "text": text(6)}]
  decisions = []
  for doc in docs:
    stage.analyze(doc)
    decisions.append(stage.decide(doc))
  assert decisions[0][0] == "gopher:word_count" and decisions[1] == decisions[0]
  assert decisions[2] is None and "failed" not in docs[1]  # the tail alone passes
  # a piece C4's page rules remove (a curly bracket, lorem ipsum): a KeyError ended the run
  stage = quality.Quality(("c4",), gopher.Limits(), c4.Limits())
  piece = {"id": "page.txt#1", "text": text(6) + "\nSome code { x = 1 } in a line of text."}
  stage.analyze(piece)
  assert stage.decide(piece) == ("c4:curly_bracket", 1.0)


def test_each_removal_counted_once_by_first_failing_stage(tmp_path):
  rng = random.Random(1)
  german, english = _prose(rng, _GERMAN), _prose(rng)
  docs = [german, german, "Short German: das ist nicht gut.", english,
          english + " " + "\n".join(["Same line again and again, in English."] * 40)]
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
  summary = _run(str(tmp_path / "c" / "*.jsonl"), tmp_path / "out", languages="en",
                 min_language_score=0.0)
  # the 2nd German copy: a language removal too (dedup remembers only written documents)
  assert summary["removed"] == {"exact_duplicate": 0, "language": 3, "quality": 1,
                                "near_duplicate": 0}
  assert summary["documents_out"] == 1


def test_gopher_reads_stop_words_beside_punctuation_and_letters_only_as_letters():
  """A stop word in brackets or before a comma is a stop word ("(the", "with,"), a token of
  vulgar fractions or superscripts has no letter (Unicode calls them word characters), and a
  form's "__________" is no word (it counted as one)."""
  words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split() * 6
  text = " ".join(words[:30]) + " (the " + " ".join(words[30:]) + " with, end."
  metrics = gopher._metrics  # pylint: disable=protected-access
  measure = lambda t: {rule: v for rule, v, _ in metrics(t, gopher.Limits())}
  assert measure(text)["stop_words"] == 2
  form = " ".join(words[:20] + ["Name:", "__________", "Date:", "__________"])
  assert measure(form)["word_count"] == 22  # (underscores are punctuation: no word)
  numbers = " ".join(["\u00bd \u00b2 \u216b 12"] * 10 + words[:20])
  assert measure(numbers)["alpha_words"] == pytest.approx(20 / 60)


def test_quality_rules_keep_prose_and_name_the_rule():
  rng = random.Random(2)
  limits = gopher.Limits()
  for _ in range(20):
    assert gopher.check(_prose(rng), limits)[1] is None
  assert gopher.check("one two three", limits)[1][0] == "word_count"
  no_stops = " ".join(w for w in _prose(rng).split()
                      if w.lower().strip(".,;:!?") not in gopher.STOP_WORDS)
  assert gopher.check(no_stops, limits)[1][0] == "stop_words"
  assert gopher.check(_prose(rng), gopher.Limits(min_words=10_000))[1][0] == "word_count"
  text = _prose(rng)
  kept, _, failure = c4.check(text + "\nmenu home login\nPlease enable javascript now ok.",
                              c4.Limits())
  assert failure is None and kept.replace("\n", " ").split() == text.replace("\n", " ").split()
  assert c4.check(text + " {x}.", c4.Limits())[2][0] == "curly_bracket"
  assert c4.check(text + "\nfunction f() { return 1; }", c4.Limits())[2] is None  # not a kept line
  assert c4.check("Lorem ipsum dolor sit amet. " + text, c4.Limits())[2][0] == "lorem_ipsum"


_C4_LINES = (
    "The quick brown fox jumps over the lazy dog.", "Dr. Smith met Mr. Jones at 5 p.m. today.",
    "It rained. Then it snowed! Did it stop? Nobody knew.", "He said it was fine e.g. for now.",
    "Wait for it, the story goes on and on...", "Menu home about contact us",
    "Too short.", "Please enable JavaScript to view the comments here.",
    "A function like f() { return 1; } is code, not prose.", "Lorem ipsum dolor sit amet, ok.",
    "This site uses cookies to improve your visit here.", "Cited as a fact in the paper[1].",
    "[edit] Section title with an edit link and five words.", "A [] empty marker in a line here.",
    "A {bracket} line without any end mark at all", "lorem ipsum without an end mark or five",
    "A line with a " + "w" * 30 + " long word in it.", 'She wrote: "the end is near."',
    "[Edit] not a citation in C4's case-sensitive rule, kept.", "   ", "")


def test_c4_rules_match_the_reference_implementation(monkeypatch):
  """Pages drawn from lines that exercise every rule get what tensorflow_datasets' c4_utils
  .clean_page (the code that made C4) gives them: the same page removed, the same text kept
  (its Punkt sentence count replaced by ours, which it cannot download here)."""
  c4_utils = pytest.importorskip("tensorflow_datasets.text.c4_utils")
  monkeypatch.setattr(c4_utils, "_get_sentences", lambda line: [None] * c4.sentences(line))
  citation = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
  limits = c4.Limits(max_word_length=20)
  rng = random.Random(6)
  outcomes = collections.Counter()
  for _ in range(400):
    text = "\n".join(rng.choice(_C4_LINES) for _ in range(rng.randint(1, 8)))
    want = list(c4_utils.clean_page(c4_utils.PageFeatures(text=text), citation,
                                    counter_inc_fn=lambda *_: None, max_word_length=20))
    kept, _, failure = c4.check(text, limits)
    assert (failure is None) == bool(want), (text, failure)
    if want:  # (C4 leaves the space a leading citation stood before; we strip it)
      assert kept.split("\n") == [line.strip() for line in want[0].text.split("\n")], text
    outcomes[failure[0] if failure else "kept"] += 1
  assert set(outcomes) == {"kept", *c4.RULES}, outcomes
  assert [c4.sentences(line) for line in _C4_LINES[:4]] == [1, 1, 4, 1]


def test_c4_rules_remove_and_rewrite(tmp_path):
  """C4 drops lines of the 1st page; the 3rd, the 1st with other boilerplate, is then an exact
  duplicate of what was written (dedup reads the rewritten text)."""
  rng = random.Random(3)
  prose = _prose(rng)
  docs = [prose + "\nClick here\nThis site uses cookies to improve your visit.",
          "function f() { return 1; } " + _prose(rng), "Home | About\n" + prose + "\nShare"]
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
  summary = _run(str(tmp_path / "c" / "*.jsonl"), tmp_path / "out", quality="gopher,c4")
  assert summary["removed"]["quality"] == 1 and summary["quality_rules"] == {
      "c4:curly_bracket": 1}
  assert summary["removed"]["exact_duplicate"] == 1 and summary["documents_out"] == 1
  record = json.loads(open(tmp_path / "out" / "part-00000.jsonl", encoding="utf-8").readline())
  assert "cookies" not in record["text"] and "Click" not in record["text"]


def test_bad_documents_are_counted_not_fatal(tmp_path):
  rng = random.Random(4)
  d = tmp_path / "c"
  d.mkdir()
  (d / "binary.txt").write_bytes(b"\x00\x01\x02 binary \xff" * 100)
  (d / "empty.txt").write_text("  \n\n ")
  (d / "invalid.txt").write_bytes(_prose(rng).encode() + b" \xff\xfe broken \xc3")
  (d / "prose.txt").write_text(_prose(rng))
  (d / "huge.txt").write_text((_prose(rng, sentences=40) + "\n") * 800)  # > 1M characters
  summary = _run(str(d / "*.txt"), tmp_path / "out", fmt="text")
  bad = summary["bad"]
  assert bad["binary_files"] == 1 and bad["empty_documents"] == 1
  assert bad["invalid_utf8_documents"] == 1 and bad["pieces_of_long_documents"] >= 2
  assert summary["documents_out"] >= 2  # the invalid-UTF-8 one (repaired) and the prose
  (d / "s.jsonl").write_text(json.dumps({"text": _prose(rng) + " \ud800"}) + "\n")
  summary = _run(str(d / "*.jsonl"), tmp_path / "out2")
  assert summary["bad"]["invalid_utf8_documents"] == 1 and summary["documents_out"] == 1


def test_config_errors(tmp_path):
  with pytest.raises(ConfigError, match="matches no files"):
    clean.main([f"--corpus={tmp_path}/none/*.txt", f"--out={tmp_path}/o"])
  for flag, message in (("--quality=best", "--quality"), ("--dedup=fuzzy", "--dedup"),
                        ("--near_threshold=1.5", "near_threshold"), ("--format=tsv", "--format"),
                        ("--workers=0", "--workers"), ("--bogus=1", "unknown flag"),
                        ("--languages=english", "english unknown"),
                        ("--shard_mb=inf",  # (an OverflowError)
                         r"^--shard_mb=inf must be finite and > 0$"),
                        ("--min_words=500 --max_words=100", "min_words=500 is above"),
                        ("--min_alpha_words=nan", "min_alpha_words=nan")):
    with pytest.raises(ConfigError, match=message):
      clean.main(["--corpus=stdlib", f"--out={tmp_path}/o", *flag.split()])
  with pytest.raises(ConfigError, match="required"):
    clean.main(["--corpus=stdlib"])
  (tmp_path / "gz").mkdir()  # (each was skipped as binary: "wrote 0 documents", exit 0)
  (tmp_path / "gz" / "a.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n'))
  with pytest.raises(ConfigError, match=r"^--corpus='\S+' matches only compressed files \(e.g. "
                                        r"\S+/a.jsonl.gz\), which clean does not read"):
    clean.main([f"--corpus={tmp_path}/gz/*", f"--out={tmp_path}/o"])
  (tmp_path / "gz" / "b.jsonl").write_text('{"txt": "x"}\n')  # (it said data.text_field, train's)
  with pytest.raises(ConfigError, match=r"^--text_field='text' is missing at \S+/b.jsonl:1$"):
    clean.main([f"--corpus={tmp_path}/gz/*.jsonl", "--format=jsonl", f"--out={tmp_path}/o"])
  for inside in ("", "removed/"):  # OUT's files (its shards, removed/ samples) are replaced
    (tmp_path / "o" / "removed").mkdir(parents=True, exist_ok=True)
    (tmp_path / "o" / f"{inside}quality.jsonl").write_text('{"text": "keep me"}\n')
    with pytest.raises(ConfigError, match=r"holds files of --corpus"):
      clean.main([f"--corpus={tmp_path}/o/{inside}*.jsonl", "--format=jsonl",
                  f"--out={tmp_path}/o", "--overwrite"])
    assert (tmp_path / "o" / f"{inside}quality.jsonl").read_text() == '{"text": "keep me"}\n'
  (tmp_path / "w").mkdir()  # a training workdir is never a clean's OUT
  (tmp_path / "w" / "config.json").write_text("{}")
  with pytest.raises(ConfigError, match=r"^--out=\S+/w is a training workdir \(it holds "
                                        r"config.json\); give a folder of its own"):
    clean.main(["--corpus=stdlib", f"--out={tmp_path}/w"])
  assert os.listdir(tmp_path / "w") == ["config.json"]


def test_cli_one_line_error_and_json_line(tmp_path, capsys):
  env = dict(os.environ, PYTHONPATH=REPO)
  run = subprocess.run([sys.executable, "-m", "transformer_jax.clean",
                        f"--corpus={tmp_path}/none/*.jsonl", f"--out={tmp_path}/o"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert run.returncode == 2
  assert run.stderr.strip().count("\n") == 0 and run.stderr.startswith("error: ")
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a.txt").write_text(_prose(random.Random(5)))
  run = subprocess.run([sys.executable, "-m", "transformer_jax.clean",
                        f"--corpus={tmp_path}/c/*.txt", f"--out={tmp_path}/o", "--languages=none",
                        "--plots=false"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert run.returncode == 0, run.stderr
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  assert summary["documents_in"] == summary["documents_out"] == 1
  assert set(summary["removed"]) == {"exact_duplicate", "near_duplicate", "language", "quality"}
  shard = (tmp_path / "o" / "part-00000.jsonl").read_text()  # an earlier output is kept ...
  with pytest.raises(ConfigError, match=r"holds an earlier clean's output \(part-00000.jsonl, "
                                        r"2 files in all\): choose another --out, or --overwrite"):
    clean.main([f"--corpus={tmp_path}/c/*.txt", f"--out={tmp_path}/o"])
  assert (tmp_path / "o" / "part-00000.jsonl").read_text() == shard
  (tmp_path / "c" / "b.txt").write_text(_prose(random.Random(6)))  # ... unless replaced
  assert clean.main([f"--corpus={tmp_path}/c/*.txt", f"--out={tmp_path}/o", "--languages=none",
                     "--plots=false", "--overwrite"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["documents_in"] == 2


def test_workers_read_ahead_is_bounded():
  """Streaming: with N workers at most 2N batches are read ahead of the one being used."""
  pulled = []

  def batches():
    for i in range(40):
      pulled.append(i)
      yield [(f"d{i}", f"text {i}")]

  stages = clean_lib.build_stages(_flags(dedup="exact", languages="none", quality="none"))
  analyzed = clean_lib._analyzed(batches(), stages, workers=2)  # pylint: disable=protected-access
  for k, (batch, results) in enumerate(analyzed):
    assert batch[0][0] == results[0]["id"] == f"d{k}"
    assert len(pulled) <= k + 1 + 2 * 2


def test_workers_are_forked_only_when_jax_is_not_loaded(monkeypatch):
  """A process with JAX loaded (a library caller's, the tests') starts its workers from a fork
  server: JAX's threads make a forked child liable to deadlock (Python warned at each fork). The
  stages then travel pickled, the language model included."""
  monkeypatch.delitem(sys.modules, "jax", raising=False)
  assert clean_lib._start_method() == "fork"  # pylint: disable=protected-access
  monkeypatch.setitem(sys.modules, "jax", object())
  assert clean_lib._start_method() == "forkserver"  # pylint: disable=protected-access
  import pickle  # pylint: disable=g-import-not-at-top
  language, = clean_lib.build_stages(_flags(dedup="none", languages="en", quality="none"))
  copy = pickle.loads(pickle.dumps(language))
  doc = {"id": "d", "text": "This is an ordinary English sentence about the weather today."}
  language.analyze(doc)
  again = dict(doc)
  copy.analyze(again)
  assert again == doc and doc["language"] == "en"


def test_a_copy_of_a_document_that_a_later_stage_removed_is_kept(tmp_path):
  """Dedup remembers only written documents: A fails quality by its line breaks (lines ending
  in '...'); B, A's words on one line (the same exact-dedup key), passes and is written."""
  rng = random.Random(1)
  parts = [_prose(rng, sentences=1).rstrip(".") for _ in range(8)]
  a = "\n".join(p + "..." for p in parts[:7]) + "\n" + parts[7] + "."
  b = " ".join(p + "..." for p in parts[:7]) + " " + parts[7] + "."
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in (a, b)))
  summary = _run(str(tmp_path / "c" / "*.jsonl"), tmp_path / "out", languages="none")
  assert summary["removed"] == {"exact_duplicate": 0, "language": 0, "quality": 1,
                                "near_duplicate": 0}
  assert summary["quality_rules"] == {"gopher:ellipsis_lines": 1}
  lines = (tmp_path / "out" / "part-00000.jsonl").read_text().splitlines()
  assert [json.loads(x)["text"] for x in lines] == [b]


def test_a_long_documents_kept_pieces_are_one_record_read_back_as_one_document(tmp_path,
                                                                              monkeypatch):
  """The pieces ID#k of a document over MAX_DOCUMENT_CHARS come out as one record (their texts
  joined), so training reads them as one document again: one side of the validation split."""
  monkeypatch.setattr(corpus_lib, "MAX_DOCUMENT_CHARS", 300)
  rng = random.Random(3)
  texts = {f"doc{i}.txt": "\n".join(_prose(rng, sentences=3) for _ in range(rng.randint(1, 9)))
           for i in range(12)}
  (tmp_path / "c").mkdir()
  for name, text in texts.items():
    (tmp_path / "c" / name).write_text(text)
  stages = clean_lib.build_stages(_flags(dedup="none", languages="none", quality="none"))
  summary = clean_lib.run(str(tmp_path / "c" / "*.txt"), "text", "text", str(tmp_path / "out"),
                          stages, shard_mb=0.002, plots=False)
  pieces = summary["bad"]["pieces_of_long_documents"]
  assert pieces > 12 and summary["documents_out"] == summary["documents_in"]
  assert summary["records_out"] == 12 and summary["shards"] > 1
  records = [json.loads(x) for f in sorted(glob.glob(str(tmp_path / "out" / "part-*.jsonl")))
             for x in open(f, encoding="utf-8")]
  assert {r["id"]: r["text"] for r in records} == texts
  read = collections.defaultdict(str)
  for doc_id, text in corpus_lib.iter_documents(str(tmp_path / "out" / "*.jsonl"), "jsonl"):
    read[corpus_lib.document_of(doc_id)] += text
  assert sorted(read.values()) == sorted(texts.values())


def test_c4_judges_a_long_documents_page_whole_and_its_pieces_join_as_lines(tmp_path,
                                                                            monkeypatch):
  """C4's page rule (3 sentences) counts a long document's pieces together: a page whose short
  last piece held one sentence was removed, and a page of 2 sentences in 2 pieces is; the kept
  pieces join as the page's lines (C4 rewrote each without its closing newline: two lines ran
  together at every cut). The output is C4's text of the whole page."""
  monkeypatch.setattr(corpus_lib, "MAX_DOCUMENT_CHARS", 300)
  rng = random.Random(5)
  words = "the river carried small boats past quiet towns toward open sea".split()

  def line(n):  # one sentence of n words
    return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."

  pages = {"a_page.txt": "\n".join([line(12) for _ in range(9)] + ["Too short.", line(30)]),
           "b_two.txt": line(35) + "\n" + line(35),  # (a piece C4 empties adds no line below)
           "c_nav.txt": "\n".join(["Home | News | Sport | Weather | Contact us"] * 7
                                  + [line(12) for _ in range(9)])}
  (tmp_path / "c").mkdir()
  for name, text in pages.items():
    (tmp_path / "c" / name).write_text(text)
  pieces = list(corpus_lib.iter_documents(str(tmp_path / "c" / "*.txt"), "text"))
  last = [(i, t) for i, t in pieces if i.startswith("a_")][-1]
  assert last[0] != "a_page.txt"  # alone, the last piece fails the page rule
  assert (c4.check(last[1], c4.Limits())[2] or ("",))[0] == "too_few_sentences"
  assert [i for i, _ in pieces if i.startswith("b_")] == ["b_two.txt#0", "b_two.txt#1"]
  summary = _run(str(tmp_path / "c" / "*.txt"), tmp_path / "out", fmt="text", languages="none",
                 quality="c4")
  records = [json.loads(x) for x in open(tmp_path / "out" / "part-00000.jsonl", encoding="utf-8")]
  assert [(r["id"], r["text"]) for r in records] == [
      (name, c4.check(pages[name], c4.Limits())[0]) for name in ("a_page.txt", "c_nav.txt")]
  assert summary["removed"]["quality"] == 2 == summary["quality_rules"]["c4:too_few_sentences"]
  removed = [json.loads(x) for x in open(tmp_path / "out" / "removed" / "quality.jsonl")]
  assert [(r["id"], r["value"]) for r in removed] == [("b_two.txt", 2.0)]


def test_a_long_document_whose_later_piece_fails_quality_is_not_written(tmp_path, monkeypatch):
  """A failing piece ID#k removes the pieces before it too: nothing of the book is written (its
  first pieces used to be), they count as removed, and exact dedup does not remember them (a
  copy of the first piece, a document of its own, is kept)."""
  monkeypatch.setattr(corpus_lib, "MAX_DOCUMENT_CHARS", 1000)
  rng = random.Random(4)
  good = [" ".join(_prose(rng, sentences=12).split()[:70]) for _ in range(4)]
  junk = " ".join("".join(rng.choice("qxzv") for _ in range(12)) for _ in range(80))
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "a_book.txt").write_text("\n".join(good + [junk]))
  pieces = list(corpus_lib.iter_documents(str(tmp_path / "c" / "a_book.txt"), "text"))
  assert len(pieces) >= 3 and pieces[0][0] == "a_book.txt#0"
  assert gopher.check(pieces[0][1], gopher.Limits())[1] is None  # the first piece alone passes
  (tmp_path / "c" / "b_copy.txt").write_text(pieces[0][1])
  (tmp_path / "c" / "c_other.txt").write_text(good[0] + "\n" + good[2])
  summary = _run(str(tmp_path / "c" / "*.txt"), tmp_path / "out", fmt="text", languages="none",
                 quality="gopher")
  assert summary["removed"]["quality"] == len(pieces), summary
  assert sum(summary["quality_rules"].values()) == len(pieces)
  records = [json.loads(x) for x in open(tmp_path / "out" / "part-00000.jsonl", encoding="utf-8")]
  assert [r["id"] for r in records] == ["b_copy.txt", "c_other.txt"]
  assert summary["documents_out"] == 2 and summary["removed"]["exact_duplicate"] == 0


def test_a_long_document_is_kept_or_removed_by_the_language_of_its_start(tmp_path, monkeypatch):
  """--languages=en over pieces ID#k: an English book with a German passage long enough for a
  piece of its own is written whole (that piece was removed alone and the text around it joined
  into a record that never existed); a book that starts in German is removed whole."""
  monkeypatch.setattr(corpus_lib, "MAX_DOCUMENT_CHARS", 1000)
  rng = random.Random(6)
  english, german = (lambda w=w: _prose(rng, w, sentences=12) for w in (_ENGLISH, _GERMAN))
  books = {"a_quote.txt": "\n".join([english(), german() + "\n" + german(), english()]),
           "b_german.txt": "\n".join([german(), english(), english()])}
  (tmp_path / "c").mkdir()
  for name, text in books.items():
    (tmp_path / "c" / name).write_text(text)
  identify = clean_lib.build_stages(_flags(dedup="none", languages="all", quality="none"))[0]
  pieces = {}
  for doc_id, text in corpus_lib.iter_documents(str(tmp_path / "c" / "*.txt"), "text"):
    pieces.setdefault(corpus_lib.document_of(doc_id), []).append(
        identify._identify(text)[0])  # pylint: disable=protected-access
  assert pieces["a_quote.txt"][0] == "en" and "de" in pieces["a_quote.txt"][1:], pieces
  assert pieces["b_german.txt"][0] == "de" and "en" in pieces["b_german.txt"][1:], pieces
  summary = _run(str(tmp_path / "c" / "*.txt"), tmp_path / "out", fmt="text", languages="en",
                 quality="none", dedup="none")
  records = [json.loads(x) for x in open(tmp_path / "out" / "part-00000.jsonl", encoding="utf-8")]
  assert [(r["id"], r["language"], r["text"]) for r in records] == [
      ("a_quote.txt", "en", books["a_quote.txt"])]
  assert summary["removed"]["language"] == len(pieces["b_german.txt"]), summary
  assert summary["languages"] == {"en": len(pieces["a_quote.txt"]),
                                  "de": len(pieces["b_german.txt"])}


def test_the_language_threshold_reads_the_unrounded_score():
  from transformer_jax.data.clean import language  # pylint: disable=g-import-not-at-top
  text = "Der Hund läuft schnell, the dog runs fast"
  lang, score = language.Language((), 0.0)._identify(text)  # pylint: disable=protected-access
  just_above = score + 1e-6
  assert round(score, 4) >= just_above  # (so a rounded comparison would keep it)
  doc = {"id": "d", "text": text}
  language.Language((lang,), just_above).analyze(doc)
  assert doc.get("failed") == "language" and doc["language_score"] == round(score, 4)

