"""Long runs survive: anomalies (skip / rollback / abort), unreadable or foreign checkpoints, a full
or read-only disk (signals and kills: test_signals.py)."""

import glob
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.training import loop
from transformer_jax.training import resume
from transformer_jax.training.anomaly import AnomalyError
from transformer_jax.training.checkpoint import Checkpoints
from transformer_jax.training.step import Trainer
from transformer_jax.parallel import sharding
from tests.conftest import REPO, TEST_XLA_FLAGS, tiny_overrides

ONE = lambda: jax.devices()[:1]  # pylint: disable=unnecessary-lambda-assignment


def _config(tiny_data, **extra):
  """configs/gpt2.py:tiny on the tiny corpus with one layer, unless `extra` says otherwise (what
  these tests check does not depend on the depth; a second layer added ~1 s to each run's
  trace, compiles and saves)."""
  return config_lib.load(f"{REPO}/configs/gpt2.py:tiny",
                         tiny_overrides(tiny_data, **{"model.num_layers": 1, **extra}))


def _lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _batch(config, weight):
  b, t = config.train.batch_size, config.data.seq_len
  return {"inputs": np.ones((b, t), np.int32), "targets": np.ones((b, t), np.int32),
          "weights": np.full((b, t), weight, np.float32), "segment_ids": np.ones((b, t), np.int32),
          "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}


@pytest.fixture
def poison(monkeypatch):
  """poison(steps): the train steps at these state.step values get NaN target weights, so their
  loss and gradients are NaN (the loop's data and state are otherwise untouched)."""
  def at(steps):
    train_step = Trainer.train_step

    def poisoned(self, state, batch, rng):
      if int(jax.device_get(state.step)) in steps:
        batch = {k: v * np.float32("nan") if k.endswith("weights") else v
                 for k, v in batch.items()}
      return train_step(self, state, batch, rng)
    monkeypatch.setattr(Trainer, "train_step", poisoned)
  return at


def _assert_untouched(after, before):
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  jax.tree.map(np.testing.assert_array_equal, after.opt_state, before.opt_state)


def test_nonfinite_batch_leaves_params_and_optimizer_untouched(tiny_data):
  config = _config(tiny_data)
  trainer = Trainer(config, sharding.make_mesh(config, ONE()))
  state = trainer.init_state(0)
  before = jax.device_get(state)
  after, m = trainer.train_step(state, trainer.put_batch(_batch(config, np.nan)),
                                jax.random.key(0))
  after = jax.device_get(after)
  assert bool(m["nonfinite"]) and int(after.skipped) == 1 and int(after.step) == 1
  _assert_untouched(after, before)


def test_after_a_nonfinite_first_step_the_mean_starts_and_the_schedule_follows_the_step(
    tiny_data):
  """Step 0 non-finite (skipped): step 1 is applied at the learning rate of step 1 (the update
  a fresh state at step 1 makes; the optimizer's own count would give step 0's, 0 in warm-up),
  its loss starts the running mean (it stayed 0, and every later step was a spike), and the
  following steps are no spikes."""
  config = _config(tiny_data, **{"train.spike_factor": 3.0, "train.spike_warmup_steps": 1,
                                 "optimizer.warmup_steps": 10})
  trainer = Trainer(config, sharding.make_mesh(config, ONE()))
  good, key = trainer.put_batch(_batch(config, 1.0)), jax.random.key(0)
  state, _ = trainer.train_step(trainer.init_state(0), trainer.put_batch(_batch(config, np.nan)),
                                key)
  assert float(state.loss_mean) == 0.0 and int(state.skipped) == 1
  state, m = trainer.train_step(state, good, key)
  # (the state's own int32: a weakly typed step traced and compiled the train step again)
  fresh, _ = trainer.train_step(
      trainer.init_state(0).replace(step=jax.numpy.asarray(1, jax.numpy.int32)), good, key)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.device_get(fresh.params))
  assert not np.array_equal(state.params["embed"]["tokens"],  # moved: lr(1) = peak / 10
                            trainer.init_state(0).params["embed"]["tokens"])
  assert float(state.loss_mean) == float(m["loss"]) > 0 and int(state.skipped) == 1
  for _ in range(3):
    state, m = trainer.train_step(state, good, key)
    assert not bool(m["spike"]) and int(state.skipped) == 1


def test_loss_spike_is_caught_in_the_step_and_not_applied(tiny_data):
  """loss > spike_factor x the running mean, after spike_warmup_steps: flagged, not applied; the
  same batch below the factor, or before the warm-up, is applied."""
  config = _config(tiny_data, **{"train.spike_factor": 2.0, "train.spike_warmup_steps": 5})
  trainer = Trainer(config, sharding.make_mesh(config, ONE()))
  batch = trainer.put_batch(_batch(config, 1.0))  # loss ~ ln(320) = 5.8 at init
  for step, mean, spike in ((5, 1.0, True), (5, 4.0, False), (4, 1.0, False)):
    state = trainer.init_state(0)
    state = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32),
                          loss_mean=jax.numpy.asarray(mean, jax.numpy.float32))
    before = jax.device_get(state)
    after, m = trainer.train_step(state, batch, jax.random.key(0))
    after = jax.device_get(after)
    assert bool(m["spike"]) == spike and not bool(m["nonfinite"]), (step, mean)
    assert int(after.skipped) == int(spike)
    if spike:
      _assert_untouched(after, before)
      assert float(after.loss_mean) == mean
    else:  # the update was applied: Adam's moments moved
      moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), after.opt_state,
                           before.opt_state)
      assert any(jax.tree.leaves(moved))


def test_skip_policy_completes_and_logs_each_skipped_batch(tiny_data, tmp_path, poison):
  poison({3, 7})
  out = loop.train(_config(tiny_data), str(tmp_path), quiet=True, devices=ONE())
  events = [r for r in _lines(tmp_path) if r.get("event") == "anomaly"]
  assert [(e["step"], e["batch"], e["policy"]) for e in events] == [(4, 3, "skip"), (8, 7, "skip")]
  assert out["step"] == 20 and out["skipped"] == 2 and np.isfinite(out["loss"])
  losses = [r["loss"] for r in _lines(tmp_path) if "loss" in r]
  assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]


def test_rollback_policy_restores_and_skips_the_data_window(tiny_data, tmp_path, poison):
  config = _config(tiny_data, **{"train.on_anomaly": "rollback", "checkpoint.every_steps": 4,
                                 "train.log_every": 2, "checkpoint.async_save": True})
  poison({6})  # (read while step 4's async save may be in flight: restore waits for it)
  out = loop.train(config, str(tmp_path), quiet=True, devices=ONE())
  rows = _lines(tmp_path)
  rollback = [r for r in rows if r.get("event") == "rollback"]
  assert rollback == [{"step": 7, "event": "rollback", "restored_step": 4,
                       "skipped_batches": [4, 6]}]
  assert out["step"] == 20 and np.isfinite(out["loss"])
  assert int(jax.device_get(out["state"].skipped)) == 0  # the bad update was rolled back
  assert int(jax.device_get(out["state"].step)) == 20
  # Nothing saved yet (the first checkpoint at step 4): the initial state and the data's start.
  poison({1})
  out = loop.train(_config(tiny_data, **{"train.on_anomaly": "rollback", "train.steps": 3,
                                         "checkpoint.every_steps": 4}),
                   str(tmp_path / "early"), quiet=True, devices=ONE())
  assert [(r["restored_step"], r["skipped_batches"]) for r in _lines(tmp_path / "early")
          if r.get("event") == "rollback"] == [(0, [0, 1])] and out["step"] == 3


def test_no_evaluation_runs_between_a_bad_batch_and_its_rollback(tiny_data, tmp_path, poison):
  """An eval step between a bad batch and the next check logged the discarded trajectory's
  eval_loss, then the replayed step's: two rows for step 7."""
  config = _config(tiny_data, **{"train.on_anomaly": "rollback", "checkpoint.every_steps": 4,
                                 "train.log_every": 4, "eval.every_steps": 7,
                                 "train.steps": 12})
  poison({5})
  loop.train(config, str(tmp_path), quiet=True, devices=ONE())
  rows = _lines(tmp_path)
  assert [r["restored_step"] for r in rows if r.get("event") == "rollback"] == [4]
  evals = [r["step"] for r in rows if "eval_loss" in r]
  assert evals == sorted(set(evals)) == [7, 12]


def test_a_rollback_landing_on_a_save_or_eval_step_still_saves_and_evaluates(tiny_data, tmp_path,
                                                                             poison):
  """The step after the last bad batch keeps its own save and eval: a bad last batch left the
  run with no final checkpoint and no final eval (a sweep re-ran it forever), a mid-run one
  skipped that step's checkpoint and eval. One run has both: bad batch 7 lands mid-run on step
  8 (a save and eval step), whose checkpoint the rollback from the last batch (11) restores."""
  from transformer_jax.sweep import run as sweep_run  # pylint: disable=g-import-not-at-top
  config = _config(tiny_data, **{"train.on_anomaly": "rollback", "checkpoint.every_steps": 4,
                                 "train.log_every": 4, "eval.every_steps": 8,
                                 "train.steps": 12})
  poison({7, 11})
  out = loop.train(config, str(tmp_path), quiet=True, devices=ONE())
  rows = _lines(tmp_path)
  assert [(r["step"], r["restored_step"]) for r in rows if r.get("event") == "rollback"] == [
      (8, 4), (12, 8)]
  evals = [r["step"] for r in rows if "eval_loss" in r]
  assert 8 in evals and 12 in evals
  assert {"8", "12"} <= set(os.listdir(tmp_path / "checkpoints"))
  assert out["step"] == 12 and sweep_run.final_eval(str(tmp_path), 12) is not None


def test_a_resume_from_a_save_between_log_steps_logs_the_uninterrupted_rows(tiny_data, tmp_path):
  """The log window's sums are not saved: a row at every save step too, so the row after a
  resume averages what the uninterrupted run's does (it averaged fewer steps)."""
  config = _config(tiny_data, **{"checkpoint.every_steps": 4, "train.log_every": 5,
                                 "train.steps": 12, "eval.every_steps": 0})
  loop.train(config, str(tmp_path / "ref"), quiet=True, devices=ONE())
  loop.train(config, str(tmp_path / "run"), quiet=True, devices=ONE(), stop_after=4)
  loop.train(config, str(tmp_path / "run"), quiet=True, devices=ONE())
  got, want = ({r["step"]: r["loss"] for r in _lines(tmp_path / d) if "loss" in r}
               for d in ("run", "ref"))
  assert sorted(want) == [4, 5, 8, 10, 12] and sorted(got) == sorted(want)
  for step, loss in want.items():
    assert got[step] == pytest.approx(loss, rel=1e-6, abs=0), step


def test_a_diverged_run_stops_after_max_anomalies_in_a_row(tiny_data, tmp_path, poison, capsys):
  """skip went on to the last step of a run whose every update was refused (NaN metrics, and
  checkpoints of the broken state); train.max_anomalies_in_a_row stops it at the first check
  past the limit, and each check says its refused updates in one line."""
  poison(set(range(7, 20)) - {8})  # a good step (8) starts the count again
  config = _config(tiny_data, **{"train.max_anomalies_in_a_row": 6})
  with pytest.raises(AnomalyError, match=r"^6 updates in a row were not applied \(non-finite "
                                         r"loss or gradient, last at step 15\): the run has "
                                         r"diverged\. .* step 5, saved before .* at step 10 "):
    loop.train(config, str(tmp_path), quiet=False, devices=ONE())
  said = capsys.readouterr().out
  assert "2 update(s) not applied (non-finite loss or gradient) at step(s) 8, 10; " in said
  assert "5 update(s) not applied (non-finite loss or gradient) at step(s) 11, 12, 13, 14, 15; " \
      "train.on_anomaly=skip" in said
  assert os.listdir(tmp_path / "checkpoints") == ["5"]  # (none while the last was refused)


def test_abort_policy_stops_with_a_clear_message(tiny_data, tmp_path, poison):
  config = _config(tiny_data, **{"train.on_anomaly": "abort"})
  poison({2})
  with pytest.raises(AnomalyError, match=r"non-finite loss or gradient at step 3 \(batch 2"):
    loop.train(config, str(tmp_path), quiet=True, devices=ONE())
  assert sorted(os.listdir(tmp_path / "checkpoints")) == []  # nothing after the bad batch saved


def test_unreadable_latest_checkpoint_falls_back_to_the_previous(tiny_data, tmp_path, capsys):
  config = _config(tiny_data, **{"train.steps": 12})  # (the resume below trains it to the end)
  loop.train(config, str(tmp_path), quiet=True, devices=ONE(), stop_after=10)
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["5", "10"]
  # its array files (the two largest, parameters and optimizer state, are of about one size:
  # which is larger varies, and only the parameters' is read by restore_params)
  victims = glob.glob(f"{tmp_path}/checkpoints/10/state/ocdbt.process_0/d/*")
  assert len(victims) >= 2
  # Running out of memory while restoring says nothing against the checkpoint: it is raised,
  # and nothing is set aside.
  from transformer_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from transformer_jax.training.checkpoint import Checkpoints  # pylint: disable=g-import-not-at-top
  from transformer_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top
  ckpts = Checkpoints(str(tmp_path), config.checkpoint)
  def oom(*args, **kwargs):
    raise ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB.")
  ckpts._reader.restore = oom  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="Out of memory"):
    ckpts.restore(Trainer(config, sharding.make_mesh(config, ONE())).abstract_state)
  ckpts.close()
  assert not os.path.exists(tmp_path / "checkpoints_unreadable")
  for victim in victims:  # each truncated to a third
    with open(victim, "r+b") as f:
      f.truncate(os.path.getsize(victim) // 3)
  # sample, evaluate, export, ...: one line naming it and the steps there (was orbax's traceback)
  abstract = Trainer(config, sharding.make_mesh(config, ONE())).abstract_state.params
  with pytest.raises(ConfigError, match=r"^checkpoint 10 in .* is unreadable \(\w+: .*; "
                                        r"saved steps: 5, 10 \(a training run resumed"):
    Checkpoints(str(tmp_path), config.checkpoint, read_only=True).restore_params(abstract)
  out = loop.train(config, str(tmp_path), devices=ONE())
  err = capsys.readouterr()
  assert "checkpoint 10 is unreadable" in err.out + err.err
  assert out["step"] == 12
  assert os.listdir(tmp_path / "checkpoints_unreadable")[0].startswith("10-")
  assert "12" in os.listdir(tmp_path / "checkpoints")



def test_checkpoints_of_another_model_are_refused_or_set_aside(tiny_data, tmp_path):
  workdir = str(tmp_path)
  def config(**extra):  # two layers (one is the smaller model below)
    return _config(tiny_data, **{"model.num_layers": 2, **extra})
  loop.train(config(**{"train.steps": 5}), workdir, quiet=True, devices=ONE())
  saved = Checkpoints(workdir, config().checkpoint).restore_params(
      Trainer(config(), sharding.make_mesh(config(), ONE())).abstract_state.params)[1]
  with pytest.raises(ConfigError, match=r"model\.d_ff: 0 -> 128.*on_mismatch=fresh\|params"):
    loop.train(config(**{"model.d_ff": 128}), workdir, quiet=True, devices=ONE())
  # How the step computes may change on resume (another attention kernel, remat)
  assert not resume.workdir_mismatch(config(**{
      "model.attention_impl": "dot_product", "model.remat": "full"}), workdir)
  # params: another shape is one line (orbax's ValueError), the workdir as it was
  with pytest.raises(ConfigError, match=r"^checkpoint 5 in .* holds parameters of other shapes "):
    loop.train(config(**{"model.d_ff": 128, "checkpoint.on_mismatch": "params"}),
               workdir, quiet=True, devices=ONE())
  # ... and so is a smaller model (its restore read the first layers and dropped the rest)
  with pytest.raises(ConfigError, match=r"holds parameters this config's model lacks "
                                        r"\(\['layer_1'\].*; \d+ in all\)"):
    loop.train(config(**{"model.num_layers": 1, "checkpoint.on_mismatch": "params"}),
               workdir, quiet=True, devices=ONE())
  assert Checkpoints(workdir, config().checkpoint).latest_step() == 5
  # ... but a whole head the new model has none of is left unread (a BERT's sentence head
  # turned off, a distillation projection): it was refused too
  from transformer_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  def droppable(name, *tops):
    return checkpoint._droppable(name, set(tops))  # pylint: disable=protected-access
  assert droppable("['pooler']['dense']['kernel']", "embed", "layer_0")
  assert droppable("['distill_projection']['kernel']", "embed", "layers")
  assert not droppable("['layer_1']['mlp']['wi']['kernel']", "embed", "layer_0")
  assert not droppable("['final_norm']['scale']", "embed", "layer_0")  # (post-norm: no head)
  assert not droppable("['decoder']['layer_1']['mlp']['wi']['kernel']", "encoder", "decoder")
  # params: same shapes (dropout differs) -> starts at step 0 from the saved parameters
  out = loop.train(config(**{"model.dropout_rate": 0.1, "checkpoint.on_mismatch": "params"}),
                   workdir, quiet=True, devices=ONE(), stop_after=0)
  assert out["step"] == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(out["state"].params),
               jax.device_get(saved))
  # fresh: another shape -> old checkpoints set aside, training starts over (at step 0: what
  # the start does, no step needed). The params start above was saved as checkpoint 0 (so that
  # a crash before its first save comes back to those parameters): set aside too, in a second
  # folder even within the same second.
  out = loop.train(config(**{"model.d_ff": 128, "train.steps": 5,
                             "checkpoint.on_mismatch": "fresh"}),
                   workdir, quiet=True, devices=ONE(), stop_after=0)
  assert out["step"] == 0
  aside = sorted(glob.glob(f"{workdir}/checkpoints_previous-*"))
  assert [sorted(s for s in os.listdir(d) if s.isdigit()) for d in aside] == [["5"], ["0"]]
  # Each keeps the config its checkpoints were trained with (the workdir's is the new one's).
  d_ff = lambda d: json.load(open(os.path.join(d, "config.json")))["model"]["d_ff"]
  assert [d_ff(d) for d in aside] + [d_ff(workdir)] == [0, 0, 128]
  assert all(os.path.isfile(os.path.join(d, "tokenizer.sha256")) for d in aside)


def test_two_set_asides_in_one_second_keep_both(tmp_path):
  """checkpoints_previous-TIME named to the second: a second set-aside within it was moved
  into the first folder."""
  from transformer_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  made = []
  for step in ("3", "7"):
    os.makedirs(tmp_path / "checkpoints" / step)
    made.append(checkpoint.set_aside(str(tmp_path)))
  assert len(set(made)) == 2
  assert [os.listdir(d) for d in made] == [["3"], ["7"]]



def _mount_tmpfs(path, size):
  os.makedirs(path, exist_ok=True)
  done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")


@pytest.mark.parametrize("name,made", [("metrics.jsonl", "a folder"), ("config.json", "a folder"),
                                       ("tensorboard", "a file"), ("checkpoints", "a file")])
def test_a_file_where_the_run_writes_a_folder_or_the_reverse_is_one_line(tmp_path, name, made):
  """Each was a traceback (IsADirectoryError, NotADirectoryError) once the run wrote there."""
  if made == "a folder":
    (tmp_path / name).mkdir()
  else:
    (tmp_path / name).write_text("x")
  with pytest.raises(ConfigError, match=f"{name} is {made}, where a run writes its {name}"):
    resume.prepare_workdir(str(tmp_path))


def test_full_or_read_only_workdir_gives_a_clear_error_and_keeps_checkpoints(tiny_data, tmp_path):
  """A 1.4 MiB file system fills up during the (async) save of checkpoint 10: exit 4 with one
  line naming the intact checkpoint; with more space the same command resumes from it. A
  read-only workdir is refused before anything is compiled. (A checkpoint of this one-layer
  model takes 0.94 MiB: one fits with room to spare, two do not. Of the two-layer one, 1.5 MiB
  in 2.25; with 3 MiB, two fitted within a few KiB, and whether checkpoint 10 failed depended
  on the other files' sizes: a flaky test.)"""
  fs = tmp_path / "fs"
  _mount_tmpfs(fs, "1440k")
  try:
    workdir = str(fs / "run")
    cmd = [sys.executable, "-m", "transformer_jax.train",
           f"--config={REPO}/configs/gpt2.py:tiny", f"--workdir={workdir}"] + [
               f"--config.{kv}" for kv in tiny_overrides(tiny_data, **{
                   "train.steps": 30, "eval.every_steps": 0, "checkpoint.async_save": True,
                   "model.num_layers": 1})]
    env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS, JAX_PLATFORMS="cpu")
    full = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 4, full.stderr[:3000]  # (its tail: Orbax's writers at shutdown)
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, full.stderr[-3000:]
    last = errors[0]
    assert (last.startswith("error: saving checkpoint 10 to ")
            and "No space left on device" in last), full.stderr[-3000:]
    # Checkpoint 5 is complete, 10 is not; the message names the step the re-run resumes from.
    listed = [int(x) for x in re.search(r"on disk: ([\d, ]+) \(", last).group(1).split(", ")]
    assert listed == [5], full.stderr[-3000:]
    assert f"resume from step {listed[-1]}" in last
    # (Orbax's background writers may print "Event loop is closed" traces while they fail.)
    subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints/{listed[-1]}" in again.stderr + again.stdout, (
        again.stderr[-3000:])
    assert "done: step 30" in again.stdout, again.stdout[-3000:]
    subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
    ro = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ro.returncode == 2, ro.stderr[-3000:]
    assert ro.stderr.strip() == (f"error: workdir {workdir} is not writable: Read-only file "
                                 "system")
  finally:
    subprocess.run(["umount", str(fs)], check=False)
