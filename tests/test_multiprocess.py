"""Several JAX processes over loopback (gloo), as launch/local.sh --processes runs them: the same
losses as one process, a coordinated SIGTERM, restore onto fewer processes and another mesh, and
a bounded exit when a peer dies or stops on its own error, and checkpoint verdicts (a restore's,
a save's) that all the processes share."""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, TEST_XLA_FLAGS, tiny_overrides, two_process_job

STEPS = 18


def _overrides(tiny_data, **extra):
  # One layer (the tiny recipe has 2): every process of every job compiles its steps (process 1
  # loads none of its own programs from the compilation cache: only process 0 writes it), in
  # about half the time; no check reads the depth.
  kv = {"train.log_every": 1, "train.steps": STEPS, "optimizer.decay_steps": STEPS,
        "data.shards": 2, "mesh.data": -1, "eval.every_steps": 0, "checkpoint.every_steps": 6,
        "model.num_layers": 1}
  kv.update(extra)
  return tiny_overrides(tiny_data, **kv)


def _flags(tiny_data, **extra):
  return [f"--config.{x}" for x in _overrides(tiny_data, **extra)]


def _train_here(tiny_data, workdir, quiet=True, **extra):
  """What `_local(workdir, 1, 4, _flags(tiny_data, **extra))` trains, in this process on 4 of
  its 8 devices: 1 process x 4 devices, without a process's start (its imports, ~3 s of CPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import loop  # pylint: disable=g-import-not-at-top
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", _overrides(tiny_data, **extra))
  return loop.train(config, workdir, quiet=quiet, devices=jax.devices()[:4])


def _local(workdir, processes, devices, flags):
  return subprocess.Popen(
      ["bash", "launch/local.sh", "configs/gpt2.py:tiny", "--workdir", workdir, "--processes",
       str(processes), "--devices-per-process", str(devices)] + flags,
      cwd=REPO, env=dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS, TJAX_HEARTBEAT_TIMEOUT_S="10"),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _wait_for_steps(workdir, n, procs, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(f"{workdir}/metrics.jsonl") and len(_losses(workdir)) >= n:
      return
    for p in procs:
      if p.poll() is not None:
        raise AssertionError(f"exited early ({p.returncode}): {p.communicate()[0][-3000:]}")
    time.sleep(0.2)
  raise AssertionError(f"{workdir} did not reach {n} logged steps")


def _workers(workdir, job, timeout=240):
  """{pid: environment} of the train processes of `job` (a _local of 2 processes) once both
  have started."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    pids = subprocess.run(["pgrep", "-f", f"workdir={workdir}"], capture_output=True, text=True)
    if len(pids.stdout.split()) == 2:
      return {int(p): open(f"/proc/{p}/environ").read().replace("\0", " ")
              for p in pids.stdout.split()}
    if job.poll() is not None:
      raise AssertionError(f"exited early ({job.returncode}): {job.communicate()[0][-3000:]}")
    time.sleep(0.1)
  raise AssertionError(f"{workdir}'s 2 train processes did not start")


MC_TASK = "".join(json.dumps({"context": c, "choices": [" x", " ("], "label": 0}) + "\n"
                  for c in ("def f(", "import", "for x in", "return"))


@pytest.fixture(scope="module")
def one_process(tiny_data, tmp_path_factory):
  """The 2-process runs' reference: _flags' STEPS steps on 1 process x 4 devices with a data=4
  mesh (this process, on 4 of its 8 devices), scoring MC_TASK every 2 steps (evaluation changes
  no loss). Returns (its {step: loss}, {step: eval_mc_acc}, the task file). A run whose mesh
  splits the rows' tokens or the parameters instead gives the same losses to 1e-7 (other sums),
  so one reference serves them all; its train.steps may stop early (the schedule is STEPS')."""
  tmp = tmp_path_factory.mktemp("one_process")
  task = tmp / "mc.jsonl"
  task.write_text(MC_TASK)
  ref = str(tmp / "ref")
  _train_here(tiny_data, ref, **{"eval.every_steps": 2, "eval.tasks": f"('{task}',)",
                                 "checkpoint.every_steps": STEPS})
  with open(os.path.join(ref, "metrics.jsonl")) as f:
    rows = list(map(json.loads, f))
  return ({r["step"]: r["loss"] for r in rows if "loss" in r},
          {r["step"]: r["eval_mc_acc"] for r in rows if "eval_mc_acc" in r}, str(task))


def test_two_processes_train_like_one_then_stop_together_and_resume_on_one(tiny_data, tmp_path,
                                                                          one_process, capsys):
  """2 processes x 2 devices give 1 process x 4 devices' losses (within 1e-5); SIGTERM to ONE
  process stops both after the same step with a checkpoint; the run resumes on 1 process with a
  data=2 x tensor=2 mesh and its remaining losses match too (within 1e-3: other sums). (The
  1-process runs train in this process, on 4 of its devices.)"""
  run = str(tmp_path / "run")
  two = _local(run, 2, 2, _flags(tiny_data))
  # Found before they train: however slow this machine is at finding them, the run cannot have
  # trained on to its last step (and exited 0) before they are paused below.
  workers = _workers(run, two)
  ones = [p for p, env in workers.items() if "TJAX_PROCESS_ID=1" in env]
  assert len(ones) == 1, workers
  _wait_for_steps(run, 3, [two])
  # Both paused while the signal is sent: neither trains on past a step the other cannot reach.
  for p in workers:
    os.kill(p, signal.SIGSTOP)
  os.kill(ones[0], signal.SIGTERM)
  for p in workers:
    os.kill(p, signal.SIGCONT)
  out, _ = two.communicate(timeout=180)
  assert two.returncode == 143, out[-3000:]
  assert "SIGTERM received: stopped after step" in out
  stopped = max(int(s) for s in os.listdir(f"{run}/checkpoints") if s.isdigit())
  assert 3 <= stopped < STEPS
  assert sorted(os.listdir(f"{run}/checkpoints/{stopped}/data"))[-2:] == [
      "shard-0-of-2.json", "shard-1-of-2.json"]
  capsys.readouterr()
  _train_here(tiny_data, run, quiet=False, **{"mesh.data": 2, "mesh.tensor": 2})
  assert f"resumed from {run}/checkpoints/{stopped}" in capsys.readouterr().out
  got, want = _losses(run), one_process[0]
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  for step, loss in want.items():  # the same mesh shape: the same sums; after the resume onto
    # data=2 x tensor=2, other reduction orders leave ~1e-7 parameter differences, which a
    # batch with a large gradient (norm 60, clipped) turns into a loss 2e-4 off (the next: 1e-7)
    assert got[step] == pytest.approx(loss, rel=1e-5 if step <= stopped else 1e-3), step


def test_a_dead_process_stops_the_others_within_bounded_time(tiny_data, tmp_path):
  """kill -9 of process 1: process 0 is told by JAX's coordination service (heartbeat timeout
  10 s here) or by its collective and exits non-zero instead of hanging in that collective."""
  run = str(tmp_path / "run")
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {TEST_XLA_FLAGS}",
             JAX_PLATFORMS="cpu", TJAX_HEARTBEAT_TIMEOUT_S="10", TJAX_NUM_PROCESSES="2",
             TJAX_COORDINATOR=f"127.0.0.1:{_free_port()}")
  cmd = [sys.executable, "-m", "transformer_jax.train", f"--config={REPO}/configs/gpt2.py:tiny",
         f"--workdir={run}"] + _flags(tiny_data, **{"train.steps": 100000, "data.shards": 0})
  procs = [subprocess.Popen(cmd, cwd=REPO, env=dict(env, TJAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    _wait_for_steps(run, 2, procs)
    procs[1].kill()
    t0 = time.time()
    out, _ = procs[0].communicate(timeout=90)
    assert procs[0].returncode != 0
    assert time.time() - t0 < 60
    # the coordination service's word, or gloo's collective's (its socket reset, or closed: as
    # the peer's end went) and the line that says it stops
    assert ("another task died" in out or "unhealthy" in out
            or re.search(r"Connection (reset|closed) by peer", out)
            and "error: this process of 2 stopped" in out), out[-3000:]
  finally:
    for p in procs:
      p.kill()
      p.communicate()


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_restore_onto_another_mesh_and_device_count_gives_identical_params(tiny_data, tmp_path):
  """Saved with fsdp=8 on 8 devices, restored with data=2 x tensor=2 on 4: every parameter and
  optimizer moment is bit-identical, and the data position carries over (data.shards fixed)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import loop  # pylint: disable=g-import-not-at-top
  from transformer_jax.training.checkpoint import Checkpoints  # pylint: disable=g-import-not-at-top
  from transformer_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from transformer_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top

  def config(**mesh):
    kv = {"train.steps": 3, "data.shards": 2, "mesh.data": 1, "model.d_model": 64,
          "model.num_layers": 1, "train.batch_size": 8,
          **{f"mesh.{k}": v for k, v in mesh.items()}}
    return config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data, **kv))

  saved = loop.train(config(fsdp=8), str(tmp_path), quiet=True, devices=jax.devices()[:8])
  assert saved["state"].params["embed"]["tokens"].sharding.spec[1] == ("fsdp", "sequence")
  c = config(data=2, tensor=2)
  trainer = Trainer(c, sharding.make_mesh(c, jax.devices()[:4]))
  ckpts = Checkpoints(str(tmp_path), c.checkpoint)
  from transformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = pipeline.make_train_iterator(c)
  step, restored = ckpts.restore(trainer.abstract_state, data)
  ckpts.close()
  assert step == 3
  assert restored.params["embed"]["tokens"].sharding.mesh.shape == {
      "data": 2, "fsdp": 1, "expert": 1, "sequence": 1, "tensor": 2}
  flat_saved = jax.tree_util.tree_leaves_with_path(saved["state"])
  flat_restored = jax.tree_util.tree_leaves(restored)
  assert len(flat_saved) == len(flat_restored)
  for (path, a), b in zip(flat_saved, flat_restored):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  fresh = pipeline.make_train_iterator(c)
  for _ in range(3):
    next(fresh)
  np.testing.assert_array_equal(next(data)["inputs"], next(fresh)["inputs"])


def test_a_sequence_axis_across_processes_trains_like_one_process(tiny_data, tmp_path,
                                                                  one_process):
  """mesh.sequence=4 over 2 processes x 2 devices (each process holds half of every row's
  tokens, ring attention between hosts) gives 1 process x 4 devices' losses (one_process's:
  data parallel, so a ring attention wrong on 1 process too would show)."""
  run = str(tmp_path / "run")
  job = _local(run, 2, 2, _flags(tiny_data, **{"train.steps": 4, "mesh.data": 1,
                                               "mesh.sequence": 4, "checkpoint.every_steps": 4}))
  out, _ = job.communicate(timeout=240)
  assert job.returncode == 0, out[-3000:]
  got, want = _losses(run), one_process[0]
  assert sorted(got) == [1, 2, 3, 4]
  for step, loss in got.items():
    assert loss == pytest.approx(want[step], rel=1e-4), step


def test_parameters_across_processes_evaluate_tasks_sample_and_take_dcn_axes(tiny_data,
                                                                            tmp_path,
                                                                            one_process):
  """mesh.dcn_fsdp=2 over 2 processes (the devices all say slice 0: the processes are the
  slices; it was refused), so the parameters and the rows span both: eval.tasks' scores are
  gathered (a traceback, and no checkpoint) and train.sample_prompt samples on every process
  (process 0 alone waited forever on the other's shards). The scores and losses are 1 process
  x 4 devices' (one_process's)."""
  want, scores, task = one_process
  run = str(tmp_path / "run")
  job = _local(run, 2, 2, _flags(tiny_data, **{
      "train.steps": 2, "mesh.data": 1, "mesh.fsdp": 2, "mesh.dcn_fsdp": 2,
      "eval.every_steps": 2, "checkpoint.every_steps": 2, "eval.tasks": f"('{task}',)",
      "train.sample_prompt": "def", "train.sample_tokens": 4}))
  try:
    out, _ = job.communicate(timeout=150)
  except subprocess.TimeoutExpired:  # (a hang: its processes must not outlive the test)
    os.killpg(job.pid, signal.SIGKILL)
    raise
  assert job.returncode == 0, out[-3000:]
  assert os.path.isdir(f"{run}/checkpoints/2") and "--- sample (prompt 'def') ---" in out
  with open(f"{run}/metrics.jsonl") as f:
    accuracy = [(r["step"], r["eval_mc_acc"]) for r in map(json.loads, f) if "eval_mc_acc" in r]
  assert accuracy == [(2, scores[2])]
  got = _losses(run)
  assert sorted(got) == [1, 2]
  for step, loss in got.items():
    assert loss == pytest.approx(want[step], rel=1e-5), step


def test_explicit_process_flags_are_not_dropped_by_tjax_distributed_off():
  """Flags win over the environment, and TJAX_DISTRIBUTED=off cannot silently drop them (each
  process trained alone, on its own copy of the batch)."""
  from transformer_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from transformer_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  flags = ("127.0.0.1:1234", 2, 1)
  assert distributed.detect(*flags, environ={}) == {
      "coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
  assert distributed.detect(environ={"TJAX_DISTRIBUTED": "off"}) is None
  with pytest.raises(ConfigError, match="TJAX_DISTRIBUTED=off, but --coordinator"):
    distributed.detect(*flags, environ={"TJAX_DISTRIBUTED": "off"})


def test_a_checkpoint_damaged_in_one_processs_shards_is_set_aside_by_both(tiny_data, tmp_path):
  """mesh.fsdp=2 over 2 processes: each process reads only its own parameter shards, so a file
  damaged in process 1's shards fails its restore alone. Both processes must come to that
  verdict, set the checkpoint aside and resume from the previous one (process 0 waited in
  Orbax's end-of-restore barrier while process 1 waited in the set-aside's: a hang)."""
  run = str(tmp_path / "run")
  def job(steps, workdir=run, **extra):
    cmd = [sys.executable, "-m", "transformer_jax.train", f"--config={REPO}/configs/gpt2.py:tiny",
           f"--workdir={workdir}"] + _flags(
               tiny_data, **{"train.steps": steps, "optimizer.decay_steps": 8, "data.shards": 0,
                             "mesh.data": 1, "mesh.fsdp": 2, "checkpoint.every_steps": 4, **extra})
    return two_process_job(cmd, 150, TJAX_HEARTBEAT_TIMEOUT_S="60")
  codes, outs = job(8)
  assert codes == [0, 0], [o[-2000:] for o in outs]
  def damage(step):
    victims = glob.glob(f"{run}/checkpoints/{step}/state/ocdbt.process_1/d/*")
    assert victims
    for path in victims:  # (emptied: which arrays a part of a file holds varies by run)
      with open(path, "r+b") as f:
        f.truncate(0)
  damage(8)
  before = _losses(run)
  codes, outs = job(8)
  assert codes == [0, 0], [o[-2000:] for o in outs]
  assert ("checkpoint 8 is unreadable (OSError: process 1 could not read its part of it)"
          in outs[0] and f"resumed from {run}/checkpoints/4" in outs[0]), outs[0][-2000:]
  assert os.listdir(f"{run}/checkpoints_unreadable")[0].startswith("8-")
  assert os.path.isdir(f"{run}/checkpoints/8")  # trained again from step 4 and saved
  after = _losses(run)
  for step in range(5, 9):  # the same steps from the same checkpoint: the same losses
    assert after[step] == pytest.approx(before[step], rel=1e-6), step
  # Reading the parameters alone (here a distillation teacher's, fsdp-sharded as the student's)
  # stops both processes, each with one line (process 0 had read its own shards, then waited in
  # Orbax's barrier for process 1, which waited in JAX's shutdown: past the 150 s here)
  damage(8)
  t0 = time.time()
  codes, outs = job(2, str(tmp_path / "student"), **{"train.distill.teacher": run})
  assert codes == [2, 2] and time.time() - t0 < 50, [o[-2000:] for o in outs]
  assert outs[0].strip().splitlines()[-1] == (
      f"error: process 1 stopped while restoring checkpoint 8 from {run}/checkpoints: its log "
      "says why"), outs[0][-2000:]
  assert outs[1].strip().splitlines()[-1].startswith(
      f"error: checkpoint 8 in {run}/checkpoints is unreadable ("), outs[1][-2000:]


ONE_PROCESS_FAILS = """
import jax
from transformer_jax import cli, train
from transformer_jax.config import ConfigError
from transformer_jax.training.step import Trainer
step = Trainer.train_step
def train_step(self, state, batch, rng):
  if jax.process_index() == 1 and int(jax.device_get(state.step)) == 3:
    raise ConfigError("process 1's own refusal")
  return step(self, state, batch, rng)
Trainer.train_step = train_step
cli.run(train.main)
"""


def test_an_error_on_one_process_stops_the_job_within_the_heartbeat(tiny_data, tmp_path):
  """Process 1 stops on an error of its own while process 0 is in a collective with it: process
  1 says its one line and leaves at once, and process 0 stops too (here gloo reports the peer
  gone; elsewhere the heartbeat does). Process 1 waited in JAX's shutdown for process 0 (up to
  300 s), which waited in the collective: the job hung."""
  (tmp_path / "fails.py").write_text(ONE_PROCESS_FAILS)
  cmd = [sys.executable, str(tmp_path / "fails.py"), f"--config={REPO}/configs/gpt2.py:tiny",
         f"--workdir={tmp_path / 'run'}"] + _flags(
             tiny_data, **{"train.steps": 8, "data.shards": 0, "checkpoint.every_steps": 100})
  t0 = time.time()
  codes, outs = two_process_job(cmd, 150, TJAX_HEARTBEAT_TIMEOUT_S="10")
  assert codes[1] == 2 and codes[0] != 0 and time.time() - t0 < 60, [o[-2000:] for o in outs]
  assert outs[1].strip().splitlines()[-1] == "error: process 1's own refusal"


SAVE_FAILS = """
import errno, os
from transformer_jax import cli, train
from transformer_jax.config import paths
path, probes = paths.path, []
class FullDisk:
  def write_text(self, text):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
def path_on_a_full_disk(p):  # process 1's second save (checkpoint 4) finds its disk full
  if os.environ["TJAX_PROCESS_ID"] == "1" and os.path.basename(str(p)).startswith(".probe-"):
    probes.append(p)
    if len(probes) == 2:
      return FullDisk()
  return path(p)
paths.path = path_on_a_full_disk
cli.run(train.main)
"""


def test_a_save_that_fails_on_one_process_stops_both_with_one_line_each(tiny_data, tmp_path):
  """Process 1's storage is full when checkpoint 4 is saved (its host's disk, say), process 0's
  is not: both stop at once with exit 4 and one line naming checkpoint 2 as the one to resume
  from (process 0 stopped in Orbax's barrier with a traceback of gloo's, exit 1)."""
  (tmp_path / "fails.py").write_text(SAVE_FAILS)
  run = tmp_path / "run"
  cmd = [sys.executable, str(tmp_path / "fails.py"), f"--config={REPO}/configs/gpt2.py:tiny",
         f"--workdir={run}"] + _flags(
             tiny_data, **{"train.steps": 8, "data.shards": 0, "checkpoint.every_steps": 2,
                           "checkpoint.async_save": True})
  t0 = time.time()
  codes, outs = two_process_job(cmd, 150, TJAX_HEARTBEAT_TIMEOUT_S="60")
  assert codes == [4, 4] and time.time() - t0 < 90, [o[-2000:] for o in outs]
  saving = f"error: saving checkpoint 4 to {run}/checkpoints failed: "
  then = ("; complete checkpoints on disk: 2 (an unfinished save is never loaded). Free space or "
          "fix the workdir, then re-run the same command to resume from step 2")
  assert outs[0].strip().splitlines()[-1] == (
      f"{saving}process 1 could not write to it (its log says why){then}"), outs[0][-2000:]
  assert outs[1].strip().splitlines()[-1] == f"{saving}No space left on device{then}", (
      outs[1][-2000:])
  assert sorted(os.listdir(run / "checkpoints")) == ["2"]


POISONED = """
import jax, numpy as np
from transformer_jax.training.step import Trainer
put, step = Trainer.put_batch, Trainer.train_step
def put_batch(self, batch):
  self.host_batch = batch
  return put(self, batch)
def train_step(self, state, batch, rng):
  if int(jax.device_get(state.step)) == 3:  # NaN target weights: a non-finite loss
    batch = put(self, {k: v * np.float32("nan") if k.endswith("weights") else v
                       for k, v in self.host_batch.items()})
  return step(self, state, batch, rng)
Trainer.put_batch, Trainer.train_step = put_batch, train_step
"""

FIT_ACROSS_PROCESSES = """
import os, types
from transformer_jax.training import fit
pid, GIB = int(os.environ["TJAX_PROCESS_ID"]), 2**30
memory, compile_step = fit.device_memory, fit.compile_step
def device_memory(devices):  # an accelerator's limits: 5 and 4.5 GiB (past an int32 of bytes)
  stats = {"bytes_limit": (5 * GIB, 9 * GIB // 2)[pid]}
  return memory([types.SimpleNamespace(platform="gpu", memory_stats=lambda: stats)])
def figures(trainer):  # the whole batch fits process 0's figure (3 GiB), not process 1's (5 GiB)
  real = compile_step(trainer)
  return real._replace(needed=(3 + 2 * pid) * GIB if trainer.microbatches == 1 else GIB)
fit.device_memory, fit.compile_step = device_memory, figures
"""


@pytest.fixture(scope="module")
def poisoned_job(tiny_data, tmp_path_factory):
  """One 2-process job for the next two tests (a job of its own each cost ~20 s of CPU):
  train.microbatches=0 with devices and figures that differ per process (FIT_ACROSS_PROCESSES)
  and train.on_anomaly=rollback with step 4's batch poisoned (POISONED), checkpoints every 2
  steps. Returns ([exit codes], [outputs], its workdir)."""
  tmp = tmp_path_factory.mktemp("poisoned_job")
  (tmp / "train.py").write_text(POISONED + FIT_ACROSS_PROCESSES
                                + "from transformer_jax import cli, train\ncli.run(train.main)\n")
  run = str(tmp / "run")
  cmd = [sys.executable, str(tmp / "train.py"), f"--config={REPO}/configs/gpt2.py:tiny",
         f"--workdir={run}"] + _flags(
             tiny_data, **{"train.steps": 5, "data.shards": 0, "checkpoint.every_steps": 2,
                           "train.on_anomaly": "rollback", "train.microbatches": 0})
  codes, outs = two_process_job(cmd, 150, TJAX_HEARTBEAT_TIMEOUT_S="60")
  return codes, outs, run


def test_processes_choose_one_microbatch_count_from_the_smallest_memory_and_largest_need(
    poisoned_job):
  """train.microbatches=0 in a job of two processes whose devices and figures differ: both
  take the smallest memory limit (exchanged in MiB: 5 GiB is past an int32 of bytes) and, at
  each count, the largest need, so both choose 2 (process 0 alone would have kept 1), and
  train."""
  codes, outs, _ = poisoned_job
  assert codes == [0, 0], [o[-2000:] for o in outs]
  assert ("train.microbatches=0: 2 microbatches of 2 rows (the step needs 1.00 GiB of the "
          "4.28 GiB it may take of the device's 4.50 GiB; 1: 5.00 GiB)") in outs[0], outs[0][-2000:]


def test_a_rollback_across_processes_restores_and_goes_on(poisoned_job):
  """train.on_anomaly=rollback with 2 processes (poisoned_job's, with 2 microbatches a step): the
  step it put back was one device's array, which a sharding over both processes' devices cannot
  take (a traceback, exit 1, on both)."""
  codes, outs, run = poisoned_job
  assert codes == [0, 0], [o[-2000:] for o in outs]
  with open(os.path.join(run, "metrics.jsonl")) as f:
    rollbacks = [r for r in map(json.loads, f) if r.get("event") == "rollback"]
  assert [(r["restored_step"], r["skipped_batches"]) for r in rollbacks] == [(2, [2, 3])]
  assert sorted(_losses(run)) == [1, 2, 3, 5]  # step 4's batch was the bad one: not logged
