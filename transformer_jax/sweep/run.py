"""Running a planned sweep: each run is an ordinary training workdir, DIR/NAME, whose config.json
the plan wrote, so `python -m transformer_jax.train --workdir=DIR/NAME` starts it, resumes it when
it was interrupted, and does nothing new when it is finished. A run is finished when its
metrics.jsonl holds the held-out evaluation at its last step. DIR may be gs://... (config/paths.py):
the plan, the workdirs and runs.jsonl are in the bucket; a run's train.log is written locally while
it runs and uploaded when it ends."""

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import transformer_jax
from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.training import lock


def load_plan(sweep_dir: str) -> list[dict]:
  path = paths.join(sweep_dir, "plan.jsonl")
  if not paths.isfile(path):
    raise ConfigError(f"{path} not found; run `python -m transformer_jax.sweep plan` first")
  runs = []
  for lineno, line in enumerate(paths.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      run = json.loads(line)
    except json.JSONDecodeError as e:  # (a traceback)
      raise ConfigError(f"{path}:{lineno} is not valid JSON ({e.msg}): plan the sweep again "
                        f"into this folder (finished runs are kept)") from None
    if not isinstance(run, dict) or not {"name", "steps"} <= run.keys():
      raise ConfigError(f"{path}:{lineno} is not a planned run (no name and steps): plan the "
                        f"sweep again into this folder")
    runs.append(run)
  return runs


def final_eval(workdir: str, steps: int):
  """The eval loss logged at `steps`, or None while the run is not finished."""
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.isfile(path):
    return None
  loss = None
  for line in paths.read_text(path).splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a kill: the rerun logs it again
      continue
    if row.get("step") == steps and "eval_loss" in row:
      loss = row["eval_loss"]
  return loss


def status(sweep_dir: str, run: dict) -> str:
  workdir = paths.join(sweep_dir, run["name"])
  if final_eval(workdir, run["steps"]) is not None:
    return "done"
  return "interrupted" if paths.isdir(paths.join(workdir, "checkpoints")) else "pending"


def train_command(sweep_dir: str, run: dict) -> list[str]:
  return [sys.executable, "-m", "transformer_jax.train",
          f"--workdir={paths.join(sweep_dir, run['name'])}"]


LAUNCHERS = {"tpu_vm": "launch/tpu_vm.sh", "slurm": "launch/gpu_slurm.sh"}


def launch_command(sweep_dir: str, run: dict, launcher: str = "local",
                   launcher_args: str = "") -> str:
  """One shell line that trains `run`: the plain train command, or a launch script's (its flags
  `launcher_args` go in verbatim) with the run's workdir, whose config.json the plan wrote."""
  workdir = shlex.quote(paths.join(sweep_dir, run["name"]))
  if launcher == "local":
    return f"python -m transformer_jax.train --workdir={workdir}"
  args = f" {launcher_args.strip()}" if launcher_args.strip() else ""
  return f"bash {LAUNCHERS[launcher]}{args} -- --workdir={workdir}"


STOP_WAIT_S = 300  # how long a stopped sweep waits for its trains' checkpoints before SIGKILL
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def run_all(sweep_dir: str, jobs: int = 1, say=print) -> int:
  """Runs every unfinished run, `jobs` at a time; returns how many failed.

  The trains run in their own sessions, so a terminal's Ctrl-C reaches the driver alone, and the
  driver passes exactly one SIGTERM to each running train for its first SIGINT or SIGTERM (a
  train's second SIGINT aborts it mid-save; a SIGINT it never got, sent to the driver alone,
  left it training until STOP_WAIT_S ran out and it was killed unsaved). It then waits for them
  to save, says how each ended, and exits with 128 + the signal, so a re-run resumes them. A
  second SIGINT meanwhile kills them (one line, exit 130); a second SIGTERM is the same stop
  told twice (a job's every process signalled) and changes nothing. A SIGHUP (the terminal
  closed) is a SIGTERM whose words go to /dev/null: it used to end the driver alone, its trains
  training on unwatched and its remaining runs never started. The handlers only record the
  signal: raised from a handler, it could land between a train's start and its bookkeeping (a
  train nobody stops) or inside a log's write."""
  todo = [r for r in load_plan(sweep_dir) if status(sweep_dir, r) != "done"]
  say(f"{len(todo)} runs to go")
  running, got = [], []
  previous = {s: signal.signal(s, lambda signum, frame: _record(got, signum))
              for s in transformer_jax.stop_signals(*STOP_SIGNALS)}
  try:
    failed = _run_loop(sweep_dir, todo, running, jobs, say, got)
    if got:
      _stop(sweep_dir, running, got, say)
    return failed
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for run, log, proc in running:  # (only after an error of the driver's own: never orphans)
      proc.terminate()
      _wait(proc, STOP_WAIT_S)
      _close_log(sweep_dir, run, log)


def _record(got: list, signum: int):
  if signum == signal.SIGHUP:
    transformer_jax.hung_up()  # (a print to the closed terminal would raise, mid-stop)
  got.append(signum)


def _run_loop(sweep_dir, todo, running, jobs, say, got) -> int:
  failed = 0
  while (todo or running) and not got:
    while todo and len(running) < jobs and not got:
      run = todo.pop(0)
      workdir = paths.join(sweep_dir, run["name"])
      now, owner = status(sweep_dir, run), lock.held_by(workdir)
      if now == "done" or owner:  # (another driver's train: starting it again failed at once)
        say(f"skip {run['name']}: " + ("finished elsewhere" if now == "done" else
                                       f"running elsewhere ({owner})"))
        continue
      log = _open_log(sweep_dir, run)
      say(f"start {run['name']} ({now})")
      running.append((run, log, subprocess.Popen(train_command(sweep_dir, run), stdout=log,
                                                 stderr=subprocess.STDOUT,
                                                 start_new_session=True)))
    time.sleep(0.5)
    for item in [r for r in running if r[2].poll() is not None]:
      run, log, proc = item
      running.remove(item)
      _close_log(sweep_dir, run, log)
      why = _failure(sweep_dir, run, proc.returncode)
      failed += bool(why)
      say(f"done {run['name']}" if not why else f"FAILED ({why}) {run['name']}; see "
          f"{paths.join(sweep_dir, run['name'], 'train.log')}")
  return failed


def _failure(sweep_dir: str, run: dict, code: int) -> str:
  """Why a train that ended with `code` is not a result ("" when it is one)."""
  if code != 0:
    return _ending(code)
  if final_eval(paths.join(sweep_dir, run["name"]), run["steps"]) is None:
    # (exit 0 with no held-out documents: counted done, left out of runs.jsonl, rerun forever)
    return (f"exit 0 but no eval_loss at its last step {run['steps']} in metrics.jsonl: no "
            f"held-out data (data.validation_fraction=0?)")
  return ""


def _ending(code: int) -> str:
  """A train's exit status in words (train exits 128 + the signal after saving on one)."""
  if code == 0:
    return "finished"
  if code in {128 + s for s in STOP_SIGNALS}:
    return f"saved a checkpoint and stopped (exit {code})"
  if code < 0:
    return f"killed by {signal.Signals(-code).name} before it saved (its last steps are lost)"
  return f"exit {code}"


def _wait(proc, timeout: float, got=()) -> bool:
  """Waits up to `timeout` s for `proc`, then kills it. A SIGINT in `got` (the driver's signals)
  after the first ends the wait at once: False (the caller kills), else True."""
  deadline = time.monotonic() + timeout
  while proc.poll() is None:
    if signal.SIGINT in got[1:]:
      return False
    if time.monotonic() > deadline:
      proc.kill()
      proc.wait()
      break
    time.sleep(0.1)
  return True


def _stop(sweep_dir, running, got, say):
  """One SIGTERM to each running train, then their ends (see run_all); raises SystemExit."""
  first = signal.Signals(got[0])
  for _, _, proc in running:
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
  if running:
    say(f"{first.name}: asked {len(running)} running train(s) to save a checkpoint and stop "
        f"(up to {STOP_WAIT_S} s; Ctrl-C again kills them unsaved)")
  if not all(_wait(proc, STOP_WAIT_S, got) for _, _, proc in running):
    for run, log, proc in running:  # a second Ctrl-C: the user will not wait
      proc.kill()
      proc.wait()
      _close_log(sweep_dir, run, log)
    count = len(running)
    running.clear()
    say(f"SIGINT again: killed {count} running train(s) without waiting for their checkpoints; "
        f"run `sweep run` again to resume them from their last saves")
    raise SystemExit(128 + signal.SIGINT)
  saved = 0
  for run, log, proc in running:
    _close_log(sweep_dir, run, log)
    saved += proc.returncode in {0, *(128 + s for s in STOP_SIGNALS)}
    say(f"{run['name']}: {_ending(proc.returncode)}")
  count = len(running)
  running.clear()
  say(f"{first.name}: stopped {count} running train(s) ({saved} saved or finished); run "
      f"`sweep run` again to resume")
  raise SystemExit(128 + first)


def _open_log(sweep_dir: str, run: dict):
  """The run's train.log, appended to; on gs:// a local temporary file (see _close_log)."""
  # pylint: disable=consider-using-with
  if not paths.is_remote(sweep_dir):
    return open(os.path.join(sweep_dir, run["name"], "train.log"), "a")
  return tempfile.NamedTemporaryFile("w+", prefix="train-", suffix=".log")


def _close_log(sweep_dir: str, run: dict, log):
  """Closes the log; on gs:// its text is added to the bucket's train.log (one rewrite a run)."""
  if paths.is_remote(sweep_dir):
    log.flush()
    log.seek(0)
    path = paths.join(sweep_dir, run["name"], "train.log")
    paths.write_text(path, (paths.read_text(path) if paths.isfile(path) else "") + log.read())
  log.close()


def collect(sweep_dir: str) -> str:
  """DIR/runs.jsonl from the finished runs: what `sweep fit` reads. `params` is the N of the
  FLOP formula (matmul parameters, the tied output table included, as Chinchilla counts), so
  C ≈ 6·N·D holds for the fit's isoFLOP algebra even when embeddings dominate a small model;
  params_nonembed (Kaplan's N) and params_total ride along. `loss` is the final held-out loss."""
  path, lines = paths.join(sweep_dir, "runs.jsonl"), []
  for run in load_plan(sweep_dir):
    loss = final_eval(paths.join(sweep_dir, run["name"]), run["steps"])
    if loss is not None:
      lines.append(json.dumps({"name": run["name"], "params": run["matmul_params"],
                               "params_nonembed": run["params_nonembed"],
                               "params_total": run["params"], "tokens": run["tokens"],
                               "flops": run["flops"], "loss": loss}) + "\n")
  paths.write_text(path, "".join(lines))
  return path
