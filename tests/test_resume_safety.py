"""A workdir's history survives interruptions and refused updates: a params start cut short at
any point, a diverged run's saves, a checkpoint deleted while it is read, a full disk at start,
Ctrl-C before the first step."""

import errno
import glob
import json
import os
import shutil
import signal
import types

import jax
import numpy as np
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.data import pipeline
from transformer_jax.parallel import sharding
from transformer_jax.training import checkpoint as ckpt_lib
from transformer_jax.training import resume
from transformer_jax.training.step import Trainer
from tests.conftest import REPO, tiny_overrides

ONE = lambda: jax.devices()[:1]  # pylint: disable=unnecessary-lambda-assignment


def _config(tiny_data, **extra):
  """configs/gpt2.py:tiny on the tiny corpus with one layer (what these tests check does not
  depend on the depth; a second layer added to each run's trace, compiles, saves and reads)."""
  return config_lib.load(f"{REPO}/configs/gpt2.py:tiny",
                         tiny_overrides(tiny_data, **{"model.num_layers": 1, **extra}))


class _Cut(Exception):
  """A crash injected into a storage operation."""


def _cut_at(monkeypatch, k):
  """The k-th storage operation (a write, move, delete or checkpoint save) raises _Cut before it
  runs; returns the names of those seen so far (read after the run)."""
  seen = []
  def wrap(owner, name):
    real = getattr(owner, name)
    def op(*args, **kwargs):
      seen.append(name)
      if len(seen) == k:
        raise _Cut(f"cut before {name} #{k}")
      return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, op)
  for name in ("write_texts", "move", "rmtree", "remove"):
    wrap(paths, name)
  wrap(ckpt_lib.Checkpoints, "save")
  return seen


def test_a_params_start_cut_short_anywhere_is_taken_on_by_the_same_command(
    tiny_data, tmp_path, monkeypatch):
  """on_mismatch=params set the old checkpoints aside, wrote the new config.json, then saved
  step 0: a crash in between left no checkpoint and a config.json without a mismatch, and the
  re-run trained from a random init without a word. Now a crash before any storage
  operation of the start leaves a workdir whose re-run starts from the old parameters, as the
  uninterrupted start did (its state, data position, files and folders); and before the old
  checkpoints move, the old command still resumes them."""
  old_cfg = _config(tiny_data, **{"checkpoint.every_steps": 2})
  new_cfg = _config(tiny_data, **{"checkpoint.every_steps": 2, "model.dropout_rate": 0.1,
                                  "checkpoint.on_mismatch": "params"})
  trainer = Trainer(new_cfg, sharding.make_mesh(new_cfg, ONE()))
  rows = (0, new_cfg.train.batch_size)
  base = str(tmp_path / "base")
  old = trainer.init_state(1)  # (the other seed: not what a fresh start makes)
  old = old.replace(params=jax.tree.map(lambda p: p + 1, old.params))
  ckpts = ckpt_lib.Checkpoints(base, old_cfg.checkpoint)
  ckpts.save(2, old, pipeline.make_train_iterator(old_cfg, rows), force=True)
  ckpts.close()
  resume.record(old_cfg, base)

  def start(workdir, trainer=trainer):
    data = pipeline.make_train_iterator(trainer.config, rows)
    step, state, ckpts = resume.start(trainer, workdir, data, say=lambda msg: None)
    ckpts.close()
    return step, jax.device_get(state), data.get_state()

  def layout(workdir):
    aside = glob.glob(f"{workdir}/checkpoints_previous-*")
    return (sorted(n.split("-")[0] for n in os.listdir(workdir)),
            sorted(os.listdir(f"{workdir}/checkpoints")),
            [sorted(os.listdir(d)) for d in aside],
            json.load(open(f"{workdir}/config.json"))["model"]["dropout_rate"])

  read = ckpt_lib.Checkpoints.restore_params
  params = []  # (every copy of `base` holds the same parameters: read once)
  monkeypatch.setattr(ckpt_lib.Checkpoints, "restore_params",
                      lambda *a: params[0] if params else params.append(read(*a)) or params[0])
  ref = str(tmp_path / "ref")
  shutil.copytree(base, ref)
  want = start(ref)
  assert want[0] == 0
  jax.tree.map(np.testing.assert_array_equal, want[1].params, jax.device_get(old.params))
  want_layout = layout(ref)
  assert want_layout[1:] == (["0"], [["2", "config.json", "corpus_identity.txt",
                                      "tokenizer.sha256"]], 0.1)
  cuts, old_trainer = 0, Trainer(old_cfg, trainer.mesh)
  for k in range(1, 40):
    workdir = str(tmp_path / f"cut{k}")
    shutil.copytree(base, workdir)
    with monkeypatch.context() as m:
      seen = _cut_at(m, k)
      try:
        start(workdir)
      except _Cut:
        cuts += 1
      else:
        break
    if os.path.isfile(f"{workdir}/{resume.STAGING}/{resume.RECORD}/config.json") and \
        os.path.isdir(f"{workdir}/checkpoints/2"):  # (step 0 staged, the old ones not moved)
      assert start(shutil.copytree(workdir, f"{workdir}-old"), old_trainer)[0] == 2
    os.makedirs(f"{workdir}/checkpoints", exist_ok=True)  # (empty, where it was set aside)
    got = start(workdir)
    assert got[0] == 0, k
    jax.tree.map(np.testing.assert_array_equal, got[1], want[1])
    assert got[2] == want[2], k
    assert layout(workdir) == want_layout, (k, seen)
  assert cuts >= 8, seen  # every operation of the start was cut once


def _state(value):
  return {"params": {"w": np.full((4,), value, np.float32)}}


def test_a_step_deleted_while_it_is_read_is_no_unreadable_checkpoint(tmp_path, monkeypatch):
  """A run's keep-last-N deleted the step that sample or evaluate was reading: "checkpoint N
  ... is unreadable" with the step list from before. Now the newest step is read instead, or a
  step asked for is said to be deleted by the run training the workdir."""
  ckpt_cfg = types.SimpleNamespace(keep=3, keep_period=0, async_save=False)
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), ckpt_cfg)
  for step in (2, 4, 6):
    ckpts.save(step, _state(step), force=True)
  ckpts.close()
  check_shapes = ckpt_lib._check_shapes  # pylint: disable=protected-access

  def deleting(state_dir, *args):  # the training run's retention, between listing and reading
    step_dir = os.path.dirname(state_dir)
    if os.path.basename(step_dir) in ("6", "4"):
      shutil.rmtree(step_dir)
    return check_shapes(state_dir, *args)
  monkeypatch.setattr(ckpt_lib, "_check_shapes", deleting)
  abstract = {"w": jax.ShapeDtypeStruct((4,), np.float32)}
  reader = ckpt_lib.Checkpoints(str(tmp_path), ckpt_cfg, read_only=True)
  step, params = reader.restore_params(abstract)  # 6, then 4, deleted under the read
  assert step == 2 and params["w"].tolist() == [2.0] * 4
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), ckpt_cfg)
  ckpts.save(4, _state(4), force=True)
  ckpts.close()
  with pytest.raises(ConfigError, match=r"^checkpoint 4 in .* was deleted while it was read, by "
                                        r"the run training this workdir \(it keeps the newest "
                                        r"checkpoint\.keep\); saved steps now: 2$"):
    ckpt_lib.Checkpoints(str(tmp_path), ckpt_cfg, read_only=True).restore_params(abstract, 4)


def test_a_full_disk_at_start_up_is_one_line_and_leaves_no_temporary_file(
    tiny_data, tmp_path, monkeypatch):
  """The files a run writes at start (corpus identity, tokenizer digest, config.json) on a disk
  with room for prepare_workdir's probe but not for them: a 34-line OSError traceback, a
  `tokenizer.sha256.tmp-PID` left behind and the corpus identity rewritten without the config.
  Now one WriteError line (exit 4), none of them changed, no temporary file. The probe itself,
  on a disk with no room at all, was left behind."""
  config = _config(tiny_data)
  workdir = str(tmp_path)
  resume.record(config, workdir, "old corpus")
  before = sorted(os.listdir(workdir)), open(f"{workdir}/{resume.CORPUS}").read()
  real_open = open

  def full(path, mode="r", *args, **kwargs):  # creates the file, then finds the disk full
    f = real_open(path, mode, *args, **kwargs)
    if "w" in mode and resume.TOKENIZER_SHA in path:
      f.close()
      raise OSError(errno.ENOSPC, "No space left on device")
    return f
  monkeypatch.setattr(paths, "open", full, raising=False)
  with pytest.raises(ckpt_lib.WriteError, match=r"^writing corpus_identity\.txt, tokenizer\.sha"
                                                r"256, config\.json in .* failed: No space left "
                                                r"on device; free space or fix the workdir"):
    resume.record(config, workdir)
  assert (sorted(os.listdir(workdir)), open(f"{workdir}/{resume.CORPUS}").read()) == before
  real_path = paths.path

  class FullDisk:  # the probe's file is created, its write fails
    def __init__(self, p):
      self.q = real_path(p)

    def write_text(self, text):
      del text
      real_open(self.q, "w").close()
      raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
      return getattr(self.q, name)
  monkeypatch.setattr(paths, "path", FullDisk)
  with pytest.raises(ConfigError, match=r"is not writable: No space left on device$"):
    resume.prepare_workdir(workdir)
  assert sorted(os.listdir(workdir)) == before[0]


def test_a_full_disk_when_the_metrics_writer_starts_is_one_line(tmp_path, monkeypatch):
  """The metrics writer's first writes (metrics.jsonl cut back to the resumed step, TensorBoard's
  first events file) on a full disk: an OSError traceback (exit 1); now the one-line WriteError
  (exit 4) of its later writes."""
  import tensorboardX  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  def full(*args, **kwargs):
    del args, kwargs
    raise OSError(errno.ENOSPC, "No space left on device")
  (tmp_path / "metrics.jsonl").write_text('{"step": 5}\n{"step": 10}\n')
  with monkeypatch.context() as m:
    m.setattr(paths, "write_text", full)
    with pytest.raises(ckpt_lib.WriteError, match=rf"^writing {tmp_path}/metrics.jsonl failed: "
                                                  r"No space left on device; free space"):
      metrics_lib.Writer(str(tmp_path), resume_step=5)
  monkeypatch.setattr(tensorboardX, "SummaryWriter", full)
  with pytest.raises(ckpt_lib.WriteError, match=r"No space left on device; free space or fix "
                                                r"the workdir, then re-run the same command"):
    metrics_lib.Writer(str(tmp_path), resume_step=5)


def _patch_step(monkeypatch, signals: dict, nan=(), handlers=None):
  """Trainer.train_step raises signals[state.step] (before the step) and gives the steps at
  state.step in `nan` NaN target weights (their loss and gradients: non-finite); appends the
  SIGTERM handler of each call to `handlers`."""
  train_step = Trainer.train_step

  def step(self, state, batch, rng):
    at = int(jax.device_get(state.step))
    if handlers is not None:
      handlers.append(signal.getsignal(signal.SIGTERM))
    if at in nan:
      batch = {k: v * np.float32("nan") if k.endswith("weights") else v
               for k, v in batch.items()}
    if at in signals:
      signal.raise_signal(signals[at])
    return train_step(self, state, batch, rng)
  monkeypatch.setattr(Trainer, "train_step", step)


def test_ctrl_c_while_the_first_step_compiles_stops_at_once(tiny_data, tmp_path, monkeypatch):
  """A Ctrl-C while the first step compiled waited for the compile, ran the step and saved it:
  now it ends the run at once (KeyboardInterrupt: `interrupted`, exit 130), nothing saved,
  while a SIGTERM (a preemption) is handled from the start."""
  from transformer_jax.training import loop  # pylint: disable=g-import-not-at-top
  from transformer_jax.training.preemption import Preemption  # pylint: disable=g-import-not-at-top
  handlers = []
  _patch_step(monkeypatch, {0: signal.SIGINT}, handlers=handlers)
  old = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      loop.train(_config(tiny_data), str(tmp_path), quiet=True, devices=ONE())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (put back)
  finally:
    signal.signal(signal.SIGINT, old)
  assert os.listdir(tmp_path / "checkpoints") == []
  assert getattr(handlers[0], "__self__", None).__class__ is Preemption  # (SIGTERM: armed)


def test_a_preemption_inside_a_streak_of_refused_updates_saves_nothing(tiny_data, tmp_path,
                                                                      monkeypatch, capsys):
  """A SIGTERM inside a streak of refused updates saved the parameters they were refused on
  as the newest checkpoint (the one the exit-3 advice resumes from, and keep-last-N deleted an
  older one for it): now nothing is saved, and the re-run resumes from the checkpoint before,
  replaying the streak as the uninterrupted run would have gone on."""
  from transformer_jax.training import loop  # pylint: disable=g-import-not-at-top
  _patch_step(monkeypatch, {7: signal.SIGTERM}, nan=(6, 7))
  out = loop.train(_config(tiny_data), str(tmp_path), devices=ONE())
  assert out["preempted"] == signal.SIGTERM and out["step"] == 8
  assert os.listdir(tmp_path / "checkpoints") == ["5"]
  assert ("SIGTERM received: stopped after step 8, nothing saved: its last 2 updates were not "
          "applied (train.on_anomaly=skip); re-run the same command to resume from checkpoint "
          "5") in capsys.readouterr().out
