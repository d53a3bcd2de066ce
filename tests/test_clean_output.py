"""What the corpus cleaner does to its OUT folder: a run's output replaces an earlier one's only
once it is complete (a failed or killed run leaves the earlier output, or a folder the corpus
reader refuses), and only the cleaner's own files are ever replaced."""

import glob
import json
import os

import pytest

from transformer_jax import clean
from transformer_jax.config import ConfigError
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data.clean import output


def _small_run(tmp_path, *flags, copies=2):
  """clean.main on 6 prose documents and `copies` exact copies (c/a.jsonl) into tmp_path/o, ~1
  shard per document; returns OUT."""
  (tmp_path / "c").mkdir(exist_ok=True)
  texts = [f"document {i}: " + "some words " * 20 for i in range(6)]
  (tmp_path / "c" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                  for t in texts + texts[:copies]))
  clean.main([f"--corpus={tmp_path}/c/*.jsonl", "--format=jsonl", f"--out={tmp_path}/o",
              "--languages=none", "--quality=none", "--dedup=exact", "--shard_mb=1e-4",
              "--plots=false", *flags])
  return tmp_path / "o"


def _files(out) -> dict:
  return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_files_of_the_users_in_out_are_never_removed(tmp_path):
  """OUT/removed/*.jsonl and OUT/plots/*.png were all deleted, even with --plots=false and no
  --overwrite; only the cleaner's own names are replaced, and only with --overwrite."""
  (tmp_path / "o" / "removed").mkdir(parents=True)
  (tmp_path / "o" / "plots").mkdir()
  mine = {"removed/my_notes.jsonl": b'{"note": "mine"}\n', "plots/my_figure.png": b"png",
          "notes.txt": b"mine"}
  for name, data in mine.items():
    (tmp_path / "o" / name).write_bytes(data)
  out = _small_run(tmp_path)
  assert {k: v for k, v in _files(out).items() if k in mine} == mine
  assert "removed/exact_duplicate.jsonl" in _files(out)
  (out / "report.md").unlink()
  for name in [n for n in _files(out) if n.startswith("part-")]:
    (out / name).unlink()
  with pytest.raises(ConfigError, match=r"holds an earlier clean's output \(removed/exact_dup"):
    _small_run(tmp_path)  # (its samples: replaced only with --overwrite)
  _small_run(tmp_path, "--overwrite", copies=0)  # (no samples)
  assert {k: v for k, v in _files(out).items() if k in mine} == mine
  assert not (out / "removed" / "exact_duplicate.jsonl").exists()


def test_a_failed_overwrite_leaves_the_earlier_output_whole(tmp_path):
  """--overwrite removed the earlier shards at its start: a run that then failed (a bad line
  late in the corpus) left the earlier report.md, no shards, and a .partial. A failed first run
  left an empty OUT behind; it is removed."""
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "a.jsonl").write_text('{"txt": "oops"}\n')
  with pytest.raises(ConfigError, match=r"text_field='text' is missing"):
    clean.main([f"--corpus={tmp_path}/bad/*.jsonl", "--format=jsonl", f"--out={tmp_path}/new"])
  assert not (tmp_path / "new").exists()
  out = _small_run(tmp_path)
  before = _files(out)
  with open(tmp_path / "c" / "a.jsonl", "a") as f:
    f.write('{"txt": "oops"}\n')
  with pytest.raises(ConfigError, match=r"text_field='text' is missing at \S+a.jsonl:9$"):
    clean.main([f"--corpus={tmp_path}/c/*.jsonl", "--format=jsonl", f"--out={out}",
                "--overwrite", "--shard_mb=1e-4"])
  assert _files(out) == before and sorted(os.listdir(out)) == sorted(
      ["report.md", "removed"] + [n for n in before if n.startswith("part-")])


def test_a_run_stopped_while_moving_its_output_is_never_read_as_the_corpus(tmp_path,
                                                                           monkeypatch):
  """A kill during the final renames left some part-N.jsonl beside .partial ones: OUT/*.jsonl
  read a part of the corpus as the whole. OUT/clean.unfinished marks it until the last rename
  and report.md are done, and the corpus reader refuses a folder that holds it."""
  out = _small_run(tmp_path)
  assert not os.path.exists(out / "clean.unfinished") and len(_files(out)) > 5
  replace, calls = os.replace, []
  class Killed(BaseException):
    pass
  def killed_at_the_third(src, dst):
    calls.append(dst)
    if len(calls) == 3:
      raise Killed()
    replace(src, dst)
  monkeypatch.setattr(output.os, "replace", killed_at_the_third)
  with pytest.raises(Killed):
    _small_run(tmp_path, "--overwrite")
  monkeypatch.undo()
  with pytest.raises(ConfigError, match=r"^data.corpus='\S+': \S+/o is an unfinished clean run "
                                        r"\(it holds clean.unfinished; .*\): re-run clean$"):
    list(corpus_lib.iter_documents(f"{out}/*.jsonl", "jsonl"))
  assert len(glob.glob(str(out / "part-*.jsonl"))) == 2 and not (out / "report.md").exists()
  _small_run(tmp_path)  # a rerun needs no --overwrite: nothing whole was there
  assert sorted(os.listdir(out)) == sorted(["report.md", "removed"] + [
      n for n in _files(out) if n.startswith("part-")])
  assert len(list(corpus_lib.iter_documents(f"{out}/*.jsonl", "jsonl"))) == 6


@pytest.fixture
def sighup_handled():
  """SIGHUP with a handler of the test's own while it runs: a suite run under nohup ignores
  SIGHUP, and clean leaves an ignored one alone (a terminal's default action would end the
  test's worker, should clean not take it)."""
  import signal  # pylint: disable=g-import-not-at-top
  previous = signal.signal(signal.SIGHUP, lambda *_: None)
  yield
  signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize("sent", ["SIGTERM", "SIGHUP"])
def test_a_signal_mid_run_stops_it_as_an_error_does(tmp_path, monkeypatch, capsys, sent,
                                                     sighup_handled):
  """A SIGTERM (or a closed terminal's SIGHUP) mid-run ended the process at once and left
  OUT/.clean-run, as large as the output, until the next run into OUT. Now the run stops as
  after an error: the staging folder removed, OUT as it was, one line, exit 128 + the signal;
  a second signal meanwhile is ignored, and the handlers are restored afterwards."""
  import signal  # pylint: disable=g-import-not-at-top
  import transformer_jax  # pylint: disable=g-import-not-at-top
  out = _small_run(tmp_path)
  before, handlers = _files(out), [signal.getsignal(signal.SIGTERM),
                                   signal.getsignal(signal.SIGHUP)]
  hung_up, write, written = [], output.Shards.write, []
  monkeypatch.setattr(transformer_jax, "hung_up", lambda: hung_up.append(True))

  def signalled_at_the_third(self, doc):
    written.append(os.listdir(out / output.STAGING))
    if len(written) == 3:
      os.kill(os.getpid(), getattr(signal, sent))
    write(self, doc)

  def told_again(path, **kwargs):  # the staging folder's removal, the signal sent again
    os.kill(os.getpid(), getattr(signal, sent))
    rmtree(path, **kwargs)
  rmtree = output.shutil.rmtree
  monkeypatch.setattr(output.Shards, "write", signalled_at_the_third)
  monkeypatch.setattr(output.shutil, "rmtree", told_again)
  with pytest.raises(SystemExit) as e:
    _small_run(tmp_path, "--overwrite")
  assert e.value.code == 128 + getattr(signal, sent) and len(written) == 3
  assert capsys.readouterr().err.splitlines()[-1] == (
      f"{sent} received: stopped; {out} is as it was before this run")
  assert _files(out) == before and not os.path.exists(out / output.STAGING)
  assert hung_up == [True] * (sent == "SIGHUP")
  assert [signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)] == handlers


def test_a_signal_while_the_output_moves_into_place_waits_for_the_move(tmp_path, monkeypatch,
                                                                       capsys):
  """A SIGTERM that came during the final renames stopped them halfway (the earlier output
  removed, the new one partly moved) and said OUT was as it was. It now waits for the move:
  OUT holds the new output whole, and one line says so (exit 143)."""
  import signal  # pylint: disable=g-import-not-at-top
  out = _small_run(tmp_path)
  replace, calls = os.replace, []

  def signalled_at_the_second(src, dst):
    calls.append(dst)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    replace(src, dst)
  monkeypatch.setattr(output.os, "replace", signalled_at_the_second)
  with pytest.raises(SystemExit) as e:
    _small_run(tmp_path, "--overwrite", copies=0)
  monkeypatch.undo()
  assert e.value.code == 143 and len(calls) > 2
  assert capsys.readouterr().err.splitlines()[-1] == (
      f"SIGTERM received as the output moved into place: stopped once it was; {out} holds this "
      "run's output")
  assert not (out / output.UNFINISHED).exists() and not (out / output.STAGING).exists()
  assert (out / "report.md").exists() and not (out / "removed" / "exact_duplicate.jsonl").exists()
  assert len(list(corpus_lib.iter_documents(f"{out}/*.jsonl", "jsonl"))) == 6
