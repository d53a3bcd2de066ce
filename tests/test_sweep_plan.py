"""Sweep plans: shapes are valid, parameter counts are the model's, FLOPs follow the MFU formula."""

import contextlib
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from transformer_jax import config as config_lib
from transformer_jax.parallel import sharding
from transformer_jax.sweep import plan as plan_lib
from transformer_jax.perf import counting
from transformer_jax.training.step import Trainer
from tests.conftest import REPO, TEST_XLA_FLAGS

SWEEP = f"{REPO}/configs/sweeps/cpu_small.py"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
  cwd = os.getcwd()
  os.chdir(tmp_path_factory.mktemp("elsewhere"))  # the base config resolves from any directory
  try:
    return plan_lib.plan(SWEEP)
  finally:
    os.chdir(cwd)


def test_sizes_that_round_to_one_shape_make_one_run(tmp_path):
  """2.5e4 and 3e4 both give 1 layer of width 32: planned once (twice, its result counted
  twice in every fit and its workdir launched twice)."""
  sweep = tmp_path / "dup.py"
  sweep.write_text(open(SWEEP).read().replace("def get_sweep():", "def _original():") + (
      "\n\ndef get_sweep():\n  s = _original()\n  s.budgets = [5e12]\n"
      "  s.sizes = [2.5e4, 3e4, 1e5]\n  return s\n"))
  runs, dropped = plan_lib.plan(str(sweep))
  names = [r.name for r, _ in runs]
  assert len(names) == len(set(names)) == 2
  assert [why for _, why in dropped] == ["size 3e+04 make the same run as C5e12_N1.28e04"]


@pytest.mark.parametrize("change, message", [
    ("s.lr_exponet = 0.5", "unknown sweep key.s. lr_exponet"),
    ("s.overrides = s.overrides + ['optimizer.warmup_steps=500']",
     "overrides optimizer.warmup_steps=500 would be replaced"),
    ("s.grid = 'nd'", "grid=nd needs 'tokens'"),  # (a traceback)
    ("s.tokens = [1e6]", "'tokens' is for the other grid"),  # (ignored)
    # (tracebacks: ZeroDivisionError, a math domain error, TypeError, ValueError)
    ("s.sizes = [0]", r"sweep key sizes\[0\] must be a number > 0, got 0"),
    ("s.sizes = [-5e4]", r"sweep key sizes\[0\] must be a number > 0, got -50000.0"),
    ("s.lr_ref_params = 0", "sweep key lr_ref_params must be a number > 0, got 0"),
    ("s.budgets = ['1.2e8']", r"sweep key budgets\[0\] must be a number, got '1.2e8'"),
    ("s.budgets = [float('nan')]", r"sweep key budgets\[0\] must be a number > 0, got nan"),
    ("s.head_dim = 0", "sweep key head_dim must be an int > 0, got 0"),
    ("s.budgets = 1.2e8", r"typo.py: Could not override field 'budgets'"),  # (a TypeError)
])
def test_sweep_keys_the_plan_would_not_read_are_refused(tmp_path, change, message):
  """A misspelled key took its default, and an override of what the plan sets per run was
  replaced: both silently, before."""
  sweep = tmp_path / "typo.py"
  sweep.write_text(open(SWEEP).read().replace("def get_sweep():", "def _original():") + (
      f"\n\ndef get_sweep():\n  s = _original()\n  {change}\n  return s\n"))
  with pytest.raises(config_lib.ConfigError, match=message):
    plan_lib.load_sweep(str(sweep))


def test_token_counts_that_round_to_one_step_count_make_one_run(tmp_path):
  """An nd grid names a run by the tokens it trains on; 1e5 and 1.01e5 tokens are 49 steps
  either way: one run (two, each in every fit)."""
  sweep = tmp_path / "nd.py"
  sweep.write_text(open(SWEEP).read().replace("def get_sweep():", "def _original():") + (
      "\n\ndef get_sweep():\n  s = _original()\n  s.grid = 'nd'\n  del s['budgets']\n"
      "  s.sizes = [1e5]\n  s.tokens = [1e5, 1.01e5, 4e5]\n  s.min_steps = 1\n  return s\n"))
  runs, dropped = plan_lib.plan(str(sweep))
  assert [(r.steps, r.name) for r, _ in runs] == [
      (r.steps, f"N{r.params_nonembed:.3g}_D{r.tokens:.3g}".replace("e+", "e")) for r, _ in runs]
  assert len({r.steps for r, _ in runs}) == len(runs) == 2 and len(dropped) == 1


@pytest.mark.parametrize("change, message", [
    ("s.budgets = [5e12, 5.004e12]\n  s.sizes = [1e5]",
     r"two runs get the name C5e12_N1e05: 619 and 620 steps at budgets 5e\+12 and 5.004e\+12"),
    ("s.grid = 'nd'\n  del s['budgets']\n  s.sizes = [1e5]\n  s.tokens = [4879 * 2048, "
     "4880 * 2048]", "two runs get the name N1e05_D9.99e06: 4879 and 4880 steps .* tokens")])
def test_two_runs_that_would_share_a_name_are_refused(tmp_path, change, message):
  """Budgets or token counts equal to 3 significant figures but not to a step gave two runs one
  name, so one workdir: one result was lost and `sweep run` relaunched the other forever."""
  sweep = tmp_path / "clash.py"
  sweep.write_text(open(SWEEP).read().replace("def get_sweep():", "def _original():") + (
      f"\n\ndef get_sweep():\n  s = _original()\n  {change}\n  s.min_steps = 1\n  return s\n"))
  with pytest.raises(config_lib.ConfigError, match=message):
    plan_lib.plan(str(sweep))


@pytest.mark.parametrize("base, sizes", [("configs/llama.py:tiny", [1e5, 4e5, 1.6e6]),
                                         ("configs/t5.py:tiny", [4e5, 1.6e6, 6.4e6])])
def test_every_size_gets_its_own_ffn_heads_and_depths(base, sizes, tmp_path):
  """The base recipe's fixed d_ff, head_dim, kv heads and decoder depth (Llama's, T5's) stayed
  the same at every width: the sizes missed their targets ~2x. Every run resolves them from its
  width, and the shape rule counts the block's real parameters (a gated FFN's 16 d^2)."""
  sweep = tmp_path / "base.py"
  sweep.write_text(open(SWEEP).read().replace("def get_sweep():", "def _original():") + (
      f"\n\ndef get_sweep():\n  s = _original()\n  s.base = {base!r}\n  s.overrides = []\n"
      f"  s.budgets = [1e13]\n  s.sizes = {sizes}\n  s.min_steps = 1\n  return s\n"))
  runs, _ = plan_lib.plan(str(sweep))
  assert len(runs) == 3
  for (run, config), target in zip(sorted(runs, key=lambda rc: rc[0].params), sizes):
    m = config.model
    assert (m.d_ff, m.head_dim, m.num_kv_heads, m.num_decoder_layers) == (0, 0, 0, 0)
    assert 0.6 < run.params_nonembed / target < 1.6, (run.name, target)


def test_grid_shapes_and_flop_arithmetic(planned):
  runs, dropped = planned
  sweep = plan_lib.load_sweep(SWEEP)
  assert len(runs) + len(dropped) == len(sweep.budgets) * len(sweep.sizes)
  assert len(runs) >= 12 and not dropped
  for run, config in runs:
    assert run.d_model == run.num_heads * sweep.head_dim
    assert (config.model.num_layers, config.model.d_model) == (run.num_layers, run.d_model)
    assert run.tokens == run.steps * run.batch_size * run.seq_len == config.train.steps * 16 * 128
    assert run.flops == pytest.approx(run.flops_per_token * run.tokens)
    # the budget is met to within half a step's tokens
    assert abs(run.flops - run.budget) <= 0.5 * run.flops_per_token * run.batch_size * run.seq_len
    assert config.optimizer.learning_rate == pytest.approx(
        sweep.lr * (run.params_nonembed / sweep.lr_ref_params) ** -sweep.lr_exponent)


@pytest.mark.parametrize("index", [0, -1])
def test_parameter_counts_are_the_models(planned, index):
  run, config = sorted(planned[0], key=lambda rc: rc[0].params)[index]
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  params = trainer.abstract_state.params
  assert run.params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert run.params - run.params_nonembed == sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(params["embed"]))
  assert run.flops_per_token == counting.flops_per_token(trainer.model.cfg, params,
                                                         config.data.seq_len)


def test_shape_rule_hits_the_target_within_the_grid_step():
  for target in (1e4, 1e5, 1e6, 1e7, 1e8):
    layers, d, heads = plan_lib.shape_for(target, aspect=32.0, head_dim=32)
    assert d % 32 == 0 and heads * 32 == d and layers >= 1
    assert 0.3 < 12 * layers * d * d / target < 3.0


def test_written_configs_resume_as_the_plan_says(planned, tmp_path):
  plan_lib.write(planned[0], str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "plan.jsonl")]
  assert [l["name"] for l in lines] == [r.name for r, _ in planned[0]]
  for line in lines:
    saved = config_lib.from_json_file(str(tmp_path / line["name"] / "config.json"))
    assert saved.train.steps == line["steps"] and saved.model.d_model == line["d_model"]
  plan_lib.write(planned[0], str(tmp_path))  # the same plan again: nothing changes
  run, config = planned[0][0]
  config = config_lib.from_json_file(str(tmp_path / run.name / "config.json"))
  config.optimizer.learning_rate *= 10  # a corrected sweep, its runs never started: replanned
  plan_lib.write([(run, config)] + planned[0][1:], str(tmp_path))  # (refused before)
  saved = config_lib.from_json_file(str(tmp_path / run.name / "config.json"))
  assert saved.optimizer.learning_rate == config.optimizer.learning_rate
  (tmp_path / run.name / "metrics.jsonl").write_text("")  # started: its saved config would win
  config.optimizer.learning_rate *= 10
  with pytest.raises(config_lib.ConfigError, match=f"another config .* run {run.name}, which has"):
    plan_lib.write([(run, config)] + planned[0][1:], str(tmp_path))


@pytest.mark.parametrize("override, message", [
    ("model.dropout_rate=1.5", "model.dropout_rate must be in"),  # (train's refusal, per run)
    ("data.validation_fraction=0.0", "data.validation_fraction=0 holds out no documents"),
])
def test_plan_refuses_configs_train_would_refuse_or_fit_nothing_from(tmp_path, override, message):
  """Each planned config was written unchecked: train refused every run; and with no held-out
  data a run exited 0 with no eval_loss, was left out of runs.jsonl and rerun forever."""
  sweep = tmp_path / "bad.py"
  sweep.write_text(open(SWEEP).read().replace("def get_sweep():", "def _original():") + (
      "\n\ndef get_sweep():\n  s = _original()\n  s.budgets = [5e12]\n  s.sizes = [1e5]\n"
      f"  s.overrides = s.overrides + [{override!r}]\n  return s\n"))
  with pytest.raises(config_lib.ConfigError, match=message):
    plan_lib.plan(str(sweep))


def test_run_skips_finished_runs_and_resumes_interrupted_ones(tiny_data, tmp_path):
  """A 2-run sweep at the tests' tiny size: one run is interrupted beforehand (it must resume),
  `sweep run` finishes both and collects runs.jsonl; a second `sweep run` has nothing to do."""
  from tests.conftest import tiny_overrides  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import loop  # pylint: disable=g-import-not-at-top
  overrides = [o for o in tiny_overrides(tiny_data, **{"train.log_every": 2})
               if not o.startswith(("train.steps", "checkpoint.every_steps", "eval.every_steps",
                                    "optimizer.learning_rate"))]
  sweep = tmp_path / "micro.py"
  sweep.write_text(
      "import ml_collections\n"
      "def get_sweep():\n"
      "  return ml_collections.ConfigDict(dict(\n"
      f"      base={REPO + '/configs/gpt2.py:tiny'!r}, overrides={overrides!r},\n"
      "      grid='isoflop', budgets=[1.2e8, 2.4e8], sizes=[1.2e4], aspect=32.0, head_dim=32,\n"
      "      lr=1e-2, min_steps=2))\n")
  out = str(tmp_path / "sweep")
  runs, _ = plan_lib.plan(str(sweep))
  plan_lib.write(runs, out)
  first = runs[-1][0]
  config = config_lib.from_json_file(os.path.join(out, first.name, "config.json"))
  loop.train(config, os.path.join(out, first.name), quiet=True, devices=jax.devices()[:1],
             stop_after=2)  # interrupted after 2 of its steps
  cmd = [sys.executable, "-m", "transformer_jax.sweep", "run", f"--dir={out}"]
  env = dict(os.environ, XLA_FLAGS=TEST_XLA_FLAGS, JAX_PLATFORMS="cpu")
  a = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=400)
  assert a.returncode == 0, a.stdout[-2000:] + a.stderr[-2000:]
  assert "2 runs to go" in a.stdout and f"start {first.name} (interrupted)" in a.stdout
  assert "resumed from" in open(os.path.join(out, first.name, "train.log")).read()
  rows = [json.loads(l) for l in open(os.path.join(out, "runs.jsonl"))]
  assert sorted(r["name"] for r in rows) == sorted(r.name for r, _ in runs)
  for r, (run, _) in zip(sorted(rows, key=lambda r: r["name"]),
                         sorted(runs, key=lambda rc: rc[0].name)):
    assert (r["params"], r["params_nonembed"], r["tokens"], r["flops"]) == (
        run.matmul_params, run.params_nonembed, run.tokens, run.flops)
    assert np.isfinite(r["loss"])
  b = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
  assert b.returncode == 0 and "0 runs to go" in b.stdout and "2 of 2 runs finished" in b.stdout


# A fake train for the driver's tests: it writes each signal it gets to DIR/signals (and its
# session id to DIR/session), saves (exit 143) 0.5 s after a SIGTERM (time for a second one to
# land), or with IGNORE ignores SIGTERM; it never trains.
FAKE_TRAIN = """import os, signal, sys, time
out = sys.argv[1]
open(os.path.join(out, 'session'), 'w').write(str(os.getsid(0)))
def got(s, f):
  open(os.path.join(out, 'signals'), 'a').write(f'{s} ')
  if s == signal.SIGTERM and not IGNORE:
    time.sleep(0.5)
    sys.exit(143)
signal.signal(signal.SIGTERM, got)
signal.signal(signal.SIGINT, got)
print('training', flush=True)
time.sleep(60)
"""


def _fake_sweep(tmp_path, monkeypatch, ignore_sigterm=False, code=None):
  """The driver over one run "a" whose train is FAKE_TRAIN (or, with `code`, one that exits with
  that status at once); returns the run module and the log files it opened."""
  from transformer_jax.sweep import run as run_lib  # pylint: disable=g-import-not-at-top
  (tmp_path / "a").mkdir()
  child = (f"import sys; sys.exit({code})" if code is not None else
           f"IGNORE = {ignore_sigterm}\n" + FAKE_TRAIN)
  monkeypatch.setattr(run_lib, "load_plan", lambda d: [{"name": "a", "steps": 4}])
  monkeypatch.setattr(run_lib, "status", lambda d, r: "pending")
  monkeypatch.setattr(run_lib, "train_command",
                      lambda d, r: [sys.executable, "-c", child, str(tmp_path)])
  monkeypatch.setattr(run_lib, "STOP_WAIT_S", 20)
  opened, real_open = [], run_lib._open_log  # pylint: disable=protected-access
  monkeypatch.setattr(run_lib, "_open_log", lambda d, r: opened.append(real_open(d, r))
                      or opened[-1])
  return run_lib, opened


@contextlib.contextmanager
def _signal_later(tmp_path, *delays_and_signals):
  """Sends this process each signal after its delay, counted from the moment the fake train
  says `training` in its train.log (its handlers are set by then), inside the block. One that
  lands after the code under test has returned (a loaded machine's late timer) is caught here,
  never by pytest's handlers: a SIGTERM would end the xdist worker, a SIGINT the session."""
  import signal  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  old = {s: signal.signal(s, lambda *_: None)
         for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
  log = tmp_path / "a" / "train.log"

  def send():
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "training" in log.read_text()):
      time.sleep(0.02)
    start = time.time()
    for delay, signum in delays_and_signals:
      time.sleep(max(0.0, start + delay - time.time()))
      os.kill(os.getpid(), signum)
  sender = threading.Thread(target=send)
  try:
    sender.start()
    yield
  finally:
    sender.join()
    time.sleep(0.1)  # (a signal just sent is handled at the main thread's next instruction)
    for s, handler in old.items():
      signal.signal(s, handler)


@pytest.mark.parametrize("sent", [["SIGINT"], ["SIGTERM"], ["SIGTERM", "SIGTERM"], ["SIGHUP"]])
def test_a_stopped_sweep_passes_one_sigterm_to_each_train_and_says_how_it_ended(
    tmp_path, monkeypatch, sent):
  """SIGINT to `sweep run` alone (kill -INT, timeout -s INT, an IDE's stop) was not passed on:
  the train trained on until it was SIGKILLed, while the driver said it had saved; a SIGTERM to
  the driver twice (a job's every process) raised in the handler (a traceback); a SIGHUP (its
  terminal closed) ended the driver alone. Each train now runs in its own session (a terminal's
  Ctrl-C reaches the driver alone) and gets exactly one SIGTERM; the driver says how it ended
  (to /dev/null after a SIGHUP: hung_up, recorded here) and exits 128 + the first signal."""
  import signal  # pylint: disable=g-import-not-at-top
  import transformer_jax  # pylint: disable=g-import-not-at-top
  run_lib, opened = _fake_sweep(tmp_path, monkeypatch)
  hung_up = []
  monkeypatch.setattr(transformer_jax, "hung_up", lambda: hung_up.append(True))
  said = []
  with _signal_later(tmp_path, *[(0.2 * i, getattr(signal, name))
                                  for i, name in enumerate(sent)]):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
      run_lib.run_all(str(tmp_path), say=said.append)
    restored = signal.getsignal(signal.SIGTERM) == before
  first = getattr(signal, sent[0])
  assert e.value.code == 128 + first, said
  assert (tmp_path / "signals").read_text() == f"{int(signal.SIGTERM)} ", said
  assert int((tmp_path / "session").read_text()) != os.getsid(0)
  assert "a: saved a checkpoint and stopped (exit 143)" in said
  assert said[-1].startswith(f"{sent[0]}: stopped 1 running train(s) (1 saved")
  assert "training" in (tmp_path / "a" / "train.log").read_text()
  assert all(f.closed for f in opened) and restored
  assert hung_up == [True] * sent.count("SIGHUP")


def test_a_second_ctrl_c_kills_the_trains_in_one_line_and_exits_130(tmp_path, monkeypatch):
  """(a 30-line traceback of _Stopped, exit 1, the train waited for and train.log left open)"""
  import signal  # pylint: disable=g-import-not-at-top
  run_lib, opened = _fake_sweep(tmp_path, monkeypatch, ignore_sigterm=True)
  said = []
  with _signal_later(tmp_path, (0.0, signal.SIGINT), (1.0, signal.SIGINT)):
    with pytest.raises(SystemExit) as e:
      run_lib.run_all(str(tmp_path), say=said.append)
  assert e.value.code == 130
  assert said[-1].startswith("SIGINT again: killed 1 running train(s) without waiting")
  assert (tmp_path / "signals").read_text() == f"{int(signal.SIGTERM)} "
  assert opened and all(f.closed for f in opened)


def test_a_train_that_exits_0_without_a_final_eval_is_a_failure(tmp_path, monkeypatch):
  """(no held-out data: "done", missing from runs.jsonl, and started again at every rerun)"""
  run_lib, _ = _fake_sweep(tmp_path, monkeypatch, code=0)
  said = []
  assert run_lib.run_all(str(tmp_path), say=said.append) == 1
  assert said[-1].startswith("FAILED (exit 0 but no eval_loss at its last step 4")


def test_a_run_another_live_train_holds_is_skipped_not_failed(tmp_path, monkeypatch):
  """Two drivers on one sweep, or a rerun after a driver's kill -9 (its trains live on): the
  run's train was refused the workdir's lock and the run counted FAILED."""
  import fcntl  # pylint: disable=g-import-not-at-top
  run_lib, _ = _fake_sweep(tmp_path, monkeypatch, code=1)
  with open(tmp_path / "a" / "lock", "w", encoding="utf-8") as held:
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.write(json.dumps({"host": "h", "pid": 7, "since": "then", "command": "train"}))
    held.flush()
    said = []
    assert run_lib.run_all(str(tmp_path), say=said.append) == 0
  assert said == ["1 runs to go", "skip a: running elsewhere (pid 7 on h since then (train))"]
  said.clear()
  assert run_lib.run_all(str(tmp_path), say=said.append) == 1  # free again: started (exit 1)


def test_a_corrupt_plan_is_one_line(tmp_path):
  """(a JSONDecodeError traceback)"""
  from transformer_jax.sweep import run as run_lib  # pylint: disable=g-import-not-at-top
  (tmp_path / "plan.jsonl").write_text('{"name": "a", "steps": 4}\n{"name": "b", "st\n')
  with pytest.raises(config_lib.ConfigError, match=r"plan.jsonl:2 is not valid JSON"):
    run_lib.load_plan(str(tmp_path))


def test_a_repeated_sigterm_is_one_preemption_a_repeated_sigint_aborts():
  """A SIGTERM to a train and to its driver (scancel, systemd, kill -TERM -PGID), which passes
  one on: the second SIGTERM aborted the train in the middle of its save. Ctrl-C twice still
  aborts."""
  import signal  # pylint: disable=g-import-not-at-top
  from transformer_jax.training.preemption import Preemption  # pylint: disable=g-import-not-at-top
  for first in (signal.SIGTERM, signal.SIGINT):
    preemption = Preemption()
    try:
      preemption._handle(first, None)  # pylint: disable=protected-access
      preemption._handle(signal.SIGTERM, None)  # pylint: disable=protected-access
      assert preemption.reached(1) and preemption.signum == first
      with pytest.raises(KeyboardInterrupt):
        preemption._handle(signal.SIGINT, None)  # pylint: disable=protected-access
    finally:
      preemption.close()


def test_plan_into_a_folder_that_cannot_be_made_is_one_line(tmp_path):
  """(a NotADirectoryError traceback after planning)"""
  from transformer_jax.sweep import __main__ as sweep_cli  # pylint: disable=g-import-not-at-top
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(config_lib.ConfigError, match=r"--dir=.*a_file/plan cannot be made a folder"):
    sweep_cli.main(["plan", f"--sweep={SWEEP}", f"--dir={tmp_path / 'a_file' / 'plan'}"])
