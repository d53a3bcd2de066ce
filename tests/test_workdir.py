"""A workdir holds one run's history: one live owner, the tokenizer's content checked on resume,
config.json written atomically and read with a one-line error."""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import tokenization as tokenizer_lib
from transformer_jax.training import lock
from transformer_jax.training import loop
from transformer_jax.training import metrics as metrics_lib
from transformer_jax.training import resume
from transformer_jax.parallel import sharding
from transformer_jax.training.checkpoint import Checkpoints, WriteError
from transformer_jax.training.step import Trainer
from tests.conftest import REPO, tiny_overrides

ONE = lambda: jax.devices()[:1]  # pylint: disable=unnecessary-lambda-assignment


def _config(tiny_data, **extra):
  """configs/gpt2.py:tiny on the tiny corpus, one layer (what these tests check does not depend
  on the depth; a second layer added ~1 s to each run's trace, compiles and saves)."""
  extra = {"train.steps": 2, "checkpoint.every_steps": 2, "eval.every_steps": 0,
           "model.num_layers": 1, **extra}
  return config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data, **extra))


def test_a_live_run_owns_its_workdir_and_a_dead_one_does_not(tiny_data, tmp_path):
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  with lock.hold(workdir):  # another live run (here: this process, through another descriptor)
    with pytest.raises(ConfigError, match=rf"{workdir} is in use by pid {os.getpid()} on "):
      loop.train(_config(tiny_data), workdir, quiet=True, devices=ONE())
  assert not os.path.exists(os.path.join(workdir, "config.json"))  # refused before any write
  # A run killed while holding the workdir leaves the lock file behind, but not the lock.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from transformer_jax.training import lock\n"
       "with lock.hold(sys.argv[1]):\n  print('held', flush=True); time.sleep(600)", workdir],
      stdout=subprocess.PIPE, text=True, cwd=REPO)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=rf"in use by pid {holder.pid} "):
      loop.train(_config(tiny_data), workdir, quiet=True, devices=ONE())
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  assert os.path.isfile(os.path.join(workdir, "lock"))
  # (it starts: no step needed to show that)
  out = loop.train(_config(tiny_data), workdir, quiet=True, devices=ONE(), stop_after=0)
  assert out["step"] == 0


def test_a_tokenizer_replaced_at_the_same_path_is_refused(tiny_data, tmp_path):
  """By a resume, and by sample, evaluate, inspect, export and quantize."""
  tok = str(tmp_path / "tok.model")
  shutil.copy(tiny_data["tokenizer"], tok)
  workdir = str(tmp_path / "w")
  loop.train(_config(tiny_data, **{"data.tokenizer": tok}), workdir, quiet=True, devices=ONE())
  shutil.copy(tok, tmp_path / "same.model")  # the same tokenizer at another path resumes
  out = loop.train(_config(tiny_data, **{"data.tokenizer": str(tmp_path / "same.model"),
                                         "train.steps": 3}), workdir, quiet=True, devices=ONE(),
                   stop_after=0)  # (resumed: no step needed to show that)
  assert out["step"] == 2
  docs = [t for _, t in corpus_lib.iter_documents(tiny_data["corpus"])]
  tokenizer_lib.train(docs, 296, str(tmp_path / "other.model"))
  shutil.copy(tmp_path / "other.model", tok)  # new content, same file name
  config = _config(tiny_data, **{"data.tokenizer": tok, "train.steps": 4})
  with pytest.raises(ConfigError, match=r"holds checkpoints of another model, tokenizer or "
                     r"optimizer \(the tokenizer data.tokenizer='.*tok.model' \(sha256 "
                     r"[0-9a-f]{12}\.\.\. -> "):
    loop.train(config, workdir, quiet=True, devices=ONE())
  # and the commands that read the workdir (they read the model through other ids, silently);
  # its config.json names same.model since the resume
  shutil.copy(tmp_path / "same.model", tmp_path / "kept.model")
  shutil.copy(tmp_path / "other.model", tmp_path / "same.model")
  from transformer_jax import sample  # pylint: disable=g-import-not-at-top
  from transformer_jax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
  from transformer_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
  from transformer_jax.quant import run as quant_run  # pylint: disable=g-import-not-at-top
  for command in (lambda: harness.read_config(workdir),  # evaluate and inspect
                  lambda: sample.main([f"--workdir={workdir}", "--prompt=def"]),
                  lambda: convert_cli.export_hf(workdir, str(tmp_path / "hf")),
                  lambda: quant_run.quantize_workdir(workdir, str(tmp_path / "q"), "int8")):
    with pytest.raises(ConfigError, match=r"^data.tokenizer='.*same.model' is not the tokenizer "
                       r".* was trained with \(its tokenizer.sha256: [0-9a-f]{12}\.\.\.; .*: put "
                       r"that tokenizer back at that path, or, where it moved, set data.tokenizer "
                       r"in .*config.json to its new path$"):
      command()
  assert not (tmp_path / "hf").exists() and not (tmp_path / "q").exists()
  shutil.copy(tmp_path / "kept.model", tmp_path / "same.model")  # the right one back: read
  assert harness.read_config(workdir).data.tokenizer == str(tmp_path / "same.model")


def test_another_optimizer_state_is_refused_and_never_sets_checkpoints_aside(tiny_data, tmp_path):
  """grad_clip turned on changes the optimizer state's structure: refused in one line naming
  it, the checkpoints stay where they are (they were set aside as unreadable, and the next run
  started over from step 0); `on_mismatch=params` reuses the parameters; the saved config
  resumes."""
  workdir = str(tmp_path / "w")
  loop.train(_config(tiny_data, **{"optimizer.grad_clip": 0.0}), workdir, quiet=True,
             devices=ONE())
  saved = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  clipped = {"optimizer.grad_clip": 1.0, "train.steps": 4}
  with pytest.raises(ConfigError, match=r"tokenizer or optimizer \(optimizer.grad_clip > 0: "
                     r"False -> True\)"):
    loop.train(_config(tiny_data, **clipped), workdir, quiet=True, devices=ONE())
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == saved
  assert not os.path.exists(os.path.join(workdir, "checkpoints_unreadable"))
  ckpts = Checkpoints(workdir, _config(tiny_data).checkpoint, read_only=True)
  trainer = Trainer(_config(tiny_data, **clipped), sharding.make_mesh(_config(tiny_data), ONE()))
  with pytest.raises(ConfigError, match=r"^checkpoint 2 in .* holds a train state that this "
                     r"config's does not match \(not saved: opt_state/1/0/count; saved, not "
                     r"wanted: opt_state/0/0/count\)"):
    ckpts.restore(trainer.abstract_state)  # the backstop, for a run that reaches the restore
  ckpts.close()
  out = loop.train(_config(tiny_data, **{"optimizer.grad_clip": 0.0, "train.steps": 3}), workdir,
                   quiet=True, devices=ONE(), stop_after=0)
  assert out["step"] == 2  # resumed (no step needed to show that)
  old = Checkpoints(workdir, _config(tiny_data).checkpoint, read_only=True)
  _, reused = old.restore_params(trainer.abstract_state.params)
  old.close()
  out = loop.train(_config(tiny_data, **clipped, **{"checkpoint.on_mismatch": "params"}),
                   workdir, quiet=True, devices=ONE())
  assert out["step"] == 4
  # The reused parameters are checkpoint 0: a crash or a rollback before the first save came
  # back to a fresh init (the previous checkpoints set aside, nothing else saved).
  new = Checkpoints(workdir, _config(tiny_data, **clipped).checkpoint, read_only=True)
  step, at_zero = new.restore_params(trainer.abstract_state.params, step=0)
  new.close()
  assert step == 0
  for a, b in zip(jax.tree.leaves(at_zero), jax.tree.leaves(reused)):
    assert (a == b).all()


def test_config_json_is_written_atomically_and_read_with_a_one_line_error(tmp_path, monkeypatch):
  path = str(tmp_path / "config.json")
  config = config_lib.base.get_config()
  config_lib.write_json(config, path)
  before = open(path).read()

  def crash(_):
    raise OSError("disk full")
  monkeypatch.setattr(config_lib, "to_json", crash)
  with pytest.raises(OSError):
    config_lib.write_json(config, path)  # a crash mid-write ...
  assert open(path).read() == before  # ... leaves the previous file whole
  monkeypatch.undo()
  with open(path, "w") as f:
    f.write(before[:len(before) // 2])
  with pytest.raises(ConfigError, match=rf"^{path} is not valid JSON \(.*line \d+\); delete it"):
    config_lib.from_json_file(path)
  out = subprocess.run([sys.executable, "-m", "transformer_jax.train", "--workdir", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode == 2 and out.stderr.startswith(f"error: {path} is not valid JSON")
  assert "Traceback" not in out.stderr
  json.loads(before)
  # Valid JSON that is no config, a value of the wrong type and a model no command can build:
  # one line each, naming the file (the sample, evaluate and export commands built the model
  # from it: tracebacks, or a shape error naming neither the file nor the key)
  for edit, message in (
      (lambda c: [1, 2], r"holds a JSON list, not a config \(an object\); delete it"),
      (lambda c: c["model"].update(d_model="sixty-four") or c,
       r"has model.d_model='sixty-four', not of the type config/base.py gives that key"),
      (lambda c: c["train"].update(steps=2.5) or c, r"has train.steps=2.5, not of the type"),
      (lambda c: c["model"].update(num_heads=5) or c,
       r": model.num_heads=5 does not divide model.d_model=768$")):
    with open(path, "w") as f:
      json.dump(edit(json.loads(before)), f)
    with pytest.raises(ConfigError, match=rf"^{path}\b.*{message}"):
      config_lib.from_json_file(path)


def test_a_resumed_run_replays_into_one_clean_metrics_history(tiny_data, tmp_path, capsys):
  """...and a resume whose data order changed (here the seed) says that the saved position
  indexes another order; a plain resume says nothing of the kind."""
  workdir = str(tmp_path)
  extra = {"train.steps": 10, "train.log_every": 5, "checkpoint.every_steps": 5}
  loop.train(_config(tiny_data, **extra), workdir, quiet=True, devices=ONE())
  shutil.rmtree(os.path.join(workdir, "checkpoints", "10"))  # as if killed before that save
  capsys.readouterr()
  loop.train(_config(tiny_data, **extra), workdir, devices=ONE())  # replays 6..10
  said = capsys.readouterr()
  assert "resumed from" in said.out and "changed since" not in said.out + said.err
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if "loss" in json.loads(line)]
  assert steps == [5, 10]
  loop.train(_config(tiny_data, **{**extra, "train.steps": 11, "seed": 7, "model.remat": "full"}),
             workdir, devices=ONE(), stop_after=0)  # (said at the start: no step needed)
  said = capsys.readouterr()
  assert "warning: the data changed since checkpoint 10 (seed: 0 -> 7)" in said.out + said.err
  # A model.* key a run may change (EXECUTION_KEYS) is said too (it went unsaid).
  assert re.search(r"config changed since checkpoint 10: model.remat: '\w+' -> 'full'; "
                   r"train.steps: 10 -> 11", said.out + said.err), said


def test_a_resume_after_the_corpus_files_changed_says_so(tiny_data, tmp_path, capsys):
  """Files added under the same data.corpus glob make another prepared corpus, whose order the
  saved position does not index (it resumed without a word); a mixture source counts alone."""
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for f in glob.glob(tiny_data["corpus"]):
    shutil.copy(f, corpus)
  extra = {"train.steps": 5, "data.corpus": f"{corpus}/*.py", "data.data_dir": str(tmp_path / "d")}
  workdir = str(tmp_path / "w")
  loop.train(_config(tiny_data, **extra), workdir, quiet=True, devices=ONE())
  (corpus / "added.py").write_text("def added():\n  return 'a new file'\n" * 20)
  capsys.readouterr()
  loop.train(_config(tiny_data, **{**extra, "train.steps": 6}), workdir, devices=ONE(),
             stop_after=0)  # (said at the start: no step needed)
  said = capsys.readouterr()
  assert re.search(r"warning: the data changed since checkpoint 5 \(the files of data.corpus: "
                   r"text-\w+ -> text-\w+\)", said.out + said.err), said
  assert resume._corpus_changes("a=x b=y", "a=x b=z c=w") == [  # pylint: disable=protected-access
      "the files of source 'b': y -> z"]


def test_metrics_file_deleted_during_a_run_is_created_again(tmp_path):
  w = metrics_lib.Writer(str(tmp_path))
  w.write(1, {"loss": 1.0})
  os.remove(tmp_path / "metrics.jsonl")
  w.write(2, {"loss": 0.5})
  w.close()
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line) for line in f] == [{"step": 2, "loss": 0.5}]


def test_a_full_disk_under_tensorboards_events_is_a_write_error(tmp_path):
  """tensorboardX's close before a save (or at the end) raising ENOSPC is the one-line
  WriteError (exit 4) that metrics.jsonl's gives; it was an OSError traceback (exit 1), when the
  disk filled during an async save and the events came first."""
  import errno  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import checkpoint  # pylint: disable=g-import-not-at-top

  def full():
    raise OSError(errno.ENOSPC, "No space left on device")
  for finish in ("flush", "close"):
    (tmp_path / finish).mkdir()
    w = metrics_lib.Writer(str(tmp_path / finish))
    w.write(1, {"loss": 1.0})
    real, w._tb.close = w._tb.close, full  # pylint: disable=protected-access
    with pytest.raises(checkpoint.WriteError, match=r"tensorboard failed: .*No space left"):
      getattr(w, finish)()
    real()


def test_the_metrics_writer_starts_without_importing_torch(tmp_path):
  """tensorboardX imports torch where it is installed (1.5 s of a warm two-step start here) and
  google-cloud-storage (0.2 s); the writer hides both, and they import as usual afterwards."""
  code = ("import sys; from transformer_jax.training import metrics; "
          f"w = metrics.Writer({str(tmp_path)!r}); w.write(1, {{'loss': 1.0}}); w.close(); "
          "print('torch' in sys.modules, 'google.cloud.storage' in sys.modules); import torch; "
          "print(torch.zeros(2).sum().item()); from google.cloud import storage; "
          "print(storage.Blob.__name__)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["False", "False", "0.0", "Blob"]
  assert os.listdir(tmp_path / "tensorboard")  # the events were written


def test_a_flush_puts_tensorboard_events_on_disk(tmp_path):
  """The loop flushes the writer before each save; TensorBoard's events were left in
  tensorboardX's buffer (written every 120 s), and a run killed after a save lost, for good, the
  steps before it (the resumed run does not log them again)."""
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  writer = metrics_lib.Writer(str(tmp_path))
  writer.write(3, {"loss": 2.5})
  writer.flush()
  tags = []
  for path in (tmp_path / "tensorboard").iterdir():
    data, at = path.read_bytes(), 0
    while at + 12 <= len(data):  # TFRecord: length, its CRC, the event, its CRC
      (n,) = struct.unpack("<Q", data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + n])
      tags += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
      at += 16 + n
  assert tags == [(3, "loss", 2.5)]
  writer.close()


def _read_only(path: str) -> list:
  """Makes a folder unwritable for this process (root ignores modes: the immutable attribute);
  returns the command that undoes it."""
  if os.geteuid() == 0:
    subprocess.run(["chattr", "+i", path], check=True)
    return ["chattr", "-i", path]
  os.chmod(path, 0o555)
  return ["chmod", "755", path]


def test_checkpoints_folder_made_read_only_mid_run_fails_at_once_naming_step_and_cause(
    tiny_data, tmp_path, monkeypatch):
  """Orbax's background threads waited 300 s for each other, then named the previous step and a
  timeout; the probe before each save fails within seconds with the cause."""
  undo = []
  save = Checkpoints.save

  def save_then_lock(self, step, *args, **kwargs):
    if step == 4:
      self.wait()
      undo.append(_read_only(self.directory))
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(Checkpoints, "save", save_then_lock)
  config = _config(tiny_data, **{"train.steps": 6, "checkpoint.every_steps": 2,
                                 "checkpoint.async_save": True})
  t0 = time.monotonic()
  try:
    with pytest.raises(WriteError, match=r"saving checkpoint 4 to .* failed: (Operation not "
                       r"permitted|Permission denied); complete checkpoints on disk: 2 "):
      loop.train(config, str(tmp_path), quiet=True, devices=ONE())
  finally:
    for cmd in undo:
      subprocess.run(cmd, check=True)
  assert time.monotonic() - t0 < 120  # not Orbax's 300 s barrier timeout


def test_rerunning_a_finished_run_reports_its_last_figures(tiny_data, tmp_path, capsys):
  config = _config(tiny_data, **{"train.steps": 4, "train.log_every": 2, "eval.every_steps": 2})
  first = loop.train(config, str(tmp_path), quiet=True, devices=ONE())
  again = loop.train(config, str(tmp_path), quiet=True, devices=ONE())
  assert again["complete"] and again["step"] == 4
  assert again["loss"] == first["loss"] and again["eval_loss"] == first["eval_loss"]
  with open(tmp_path / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [2, 2, 4, 4]  # nothing appended
  # nor is its config.json rewritten by a flag the finished run never trained with (the next
  # resume read it, and trained on at another seq_len without a word)
  saved = (tmp_path / "config.json").read_text()
  other = _config(tiny_data, **{"train.steps": 4, "train.log_every": 2, "eval.every_steps": 2,
                                "optimizer.learning_rate": 0.5})
  assert loop.train(other, str(tmp_path), quiet=True, devices=ONE())["complete"]
  assert (tmp_path / "config.json").read_text() == saved
  fewer = _config(tiny_data, **{"train.steps": 2, "train.log_every": 2, "eval.every_steps": 2})
  capsys.readouterr()
  assert loop.train(fewer, str(tmp_path), devices=ONE())["step"] == 4
  assert (f"{tmp_path} already holds the finished run (step 4, train.steps=2); raise "
          f"--config.train.steps above 4 to train on") in capsys.readouterr().out
  # A run its first step refuses (splash needs a TPU: found when tracing) leaves config.json as
  # it was: it saved its own, and the plain resume command then failed with it every time
  saved = (tmp_path / "config.json").read_text()
  splash = _config(tiny_data, **{"train.steps": 6, "model.attention_impl": "splash"})
  capsys.readouterr()
  with pytest.raises(ConfigError, match="needs a TPU"):
    loop.train(splash, str(tmp_path), devices=ONE())
  assert (tmp_path / "config.json").read_text() == saved
  assert capsys.readouterr().err == ""  # no progress bar before its one line (cli.run's)


def test_a_kernel_for_another_platform_is_refused_before_the_workdir_and_the_data(tiny_data,
                                                                                   tmp_path):
  """attention_impl=splash on CPU devices: refused before anything is written or prepared (it
  was found when the first step was traced, after the corpus had been built into data_dir)."""
  for impl, why in (("splash", "needs a TPU"), ("cudnn", "needs a CUDA GPU")):
    config = _config(tiny_data, **{"model.attention_impl": impl, "model.dtype": "bfloat16",
                                   "data.data_dir": str(tmp_path / "tfds")})
    with pytest.raises(ConfigError, match=f"^model.attention_impl={impl} {why} \\(compiling "
                                          "for cpu\\); use auto, xla or dot_product$"):
      loop.train(config, str(tmp_path / "w"), devices=ONE())
    assert not (tmp_path / "w").exists() and not (tmp_path / "tfds").exists()


def test_no_held_out_documents_is_said_and_never_logged_as_a_perfect_eval(tiny_data, tmp_path,
                                                                          capsys):
  """With no validation data the eval was 0.0 (perplexity 1.0: a perfect model, it read)."""
  config = _config(tiny_data, **{"data.validation_fraction": 0.0, "train.steps": 4,
                                 "eval.every_steps": 2, "data.data_dir": str(tmp_path / "tfds")})
  out = loop.train(config, str(tmp_path / "w"), devices=ONE())
  said = capsys.readouterr()
  assert "no validation data: data.corpus=" in said.out + said.err
  assert "eval_loss" not in out
  with open(tmp_path / "w" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert rows and not any("eval_loss" in r for r in rows)


def test_wandb_logs_offline_beside_metrics_jsonl(tiny_data, tmp_path, monkeypatch):
  """metrics.wandb=true in wandb's offline mode: a run under WORKDIR/wandb that logged the last
  losses of metrics.jsonl; a resumed run continues the same wandb run id."""
  pytest.importorskip("wandb")
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  import glob  # pylint: disable=g-import-not-at-top
  extra = {"train.steps": 4, "train.log_every": 2, "checkpoint.every_steps": 2,
           "eval.every_steps": 0, "metrics.wandb": True, "model.num_layers": 1}
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data, **extra))
  loop.train(config, str(tmp_path), quiet=True, devices=jax.devices()[:1], stop_after=2)
  run_id = (tmp_path / "wandb_id").read_text()
  loop.train(config, str(tmp_path), quiet=True, devices=jax.devices()[:1])
  assert (tmp_path / "wandb_id").read_text() == run_id
  runs = glob.glob(str(tmp_path / "wandb" / f"offline-run-*-{run_id}"))
  assert len(runs) == 2, runs  # the first run and its resumption, one id
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  # Offline runs are wandb's record logs (protobuf), whose history values are JSON text.
  logged = open(glob.glob(sorted(runs)[-1] + "/run-*.wandb")[0], "rb").read()
  train = [r for r in rows if "loss" in r][-1]
  assert train["step"] == 4 and json.dumps(train["loss"]).encode() in logged
  assert json.dumps(rows[-1]["eval_loss"]).encode() in logged


def test_wandb_without_an_api_key_is_one_line(tiny_data, tmp_path, monkeypatch):
  """metrics.wandb=true online with no key was wandb's UsageError traceback."""
  pytest.importorskip("wandb")
  for name in ("WANDB_MODE", "WANDB_API_KEY", "NETRC"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny",
                           tiny_overrides(tiny_data, **{"metrics.wandb": True}))
  with pytest.raises(ConfigError, match="metrics.wandb=true: No API key"):
    loop.train(config, str(tmp_path / "w"), quiet=True, devices=jax.devices()[:1])
  monkeypatch.setenv("WANDB_API_KEY", "abc")  # (wandb's AuthenticationError, no UsageError)
  with pytest.raises(ConfigError, match="metrics.wandb=true: WANDB_API_KEY invalid"):
    loop.train(config, str(tmp_path / "w"), quiet=True, devices=jax.devices()[:1])


def test_a_restore_waits_for_the_save_in_flight(tiny_data, tmp_path):
  """A rollback right after an async save reads that save's step, which Orbax lists as soon as
  the save starts: the read raced the write (its folder was still STEP.orbax-checkpoint-tmp),
  called it unreadable and set aside a folder that was not there (FileNotFoundError)."""
  config = _config(tiny_data, **{"checkpoint.async_save": True})
  ckpts = Checkpoints(str(tmp_path), config.checkpoint)
  state = {"params": {"w": jax.numpy.ones((1024, 1024))}, "mu": jax.numpy.zeros((1024, 1024))}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  try:
    ckpts.save(1, state, force=True)
    for step in (2, 3):  # restore, then restore_params, as soon as the save has begun
      ckpts.save(step, jax.tree.map(lambda x, s=step: x + s, state), force=True)
      got, params = (ckpts.restore(abstract, step=step) if step == 2 else
                     ckpts.restore_params(abstract["params"], step=step))
      params = params["params"] if step == 2 else params
      assert got == step and float(params["w"][0, 0]) == step + 1, (got, params["w"][0, 0])
    assert not os.path.exists(tmp_path / "checkpoints_unreadable")
  finally:
    ckpts.close()


def test_a_save_whose_failure_was_raised_is_never_listed_as_complete(tiny_data, tmp_path,
                                                                      monkeypatch):
  """Orbax raises a failed async save once; the next wait returned, and listed the step as
  complete (named so when the storage cannot be listed)."""
  import errno  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = _config(tiny_data, **{"checkpoint.async_save": True})
  ckpts = Checkpoints(str(tmp_path), config.checkpoint)
  wait, failures = ocp.CheckpointManager.wait_until_finished, []

  def wait_once_failing(self):
    wait(self)
    if failures:
      raise failures.pop()
  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait_once_failing)
  monkeypatch.setattr(ocp.CheckpointManager, "all_steps", lambda self: [])  # 1 never finalized
  try:
    ckpts.save(1, {"w": jax.numpy.ones(4)}, force=True)
    failures.append(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(WriteError, match="saving checkpoint 1 to .* failed: No space left"):
      ckpts.wait()
    ckpts.wait()
    assert 1 not in ckpts._listed  # pylint: disable=protected-access
  finally:
    ckpts.close()
