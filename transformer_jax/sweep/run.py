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

from transformer_jax.config import ConfigError
from transformer_jax.config import paths


def load_plan(sweep_dir: str) -> list[dict]:
  path = paths.join(sweep_dir, "plan.jsonl")
  if not paths.isfile(path):
    raise ConfigError(f"{path} not found; run `python -m transformer_jax.sweep plan` first")
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


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


class _Stopped(Exception):
  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = signum


def _raise_stopped(signum, frame):
  del frame
  raise _Stopped(signum)


def run_all(sweep_dir: str, jobs: int = 1, say=print) -> int:
  """Runs every unfinished run, `jobs` at a time; returns how many failed. On SIGTERM (passed on
  to the running trains; Ctrl-C's SIGINT reaches them from the terminal) the sweep waits for
  them to save their checkpoints and exits with 128 + the signal, so a re-run resumes them (an
  orphaned train kept its workdir's lock, and the re-run called its run failed)."""
  todo = [r for r in load_plan(sweep_dir) if status(sweep_dir, r) != "done"]
  say(f"{len(todo)} runs to go")
  running = []
  previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    return _run_loop(sweep_dir, todo, running, jobs, say)
  except _Stopped as e:
    for _, _, proc in running if e.signum == signal.SIGTERM else ():  # (a 2nd SIGINT: kill)
      proc.send_signal(signal.SIGTERM)
    for run, log, proc in running:
      try:
        proc.wait(timeout=STOP_WAIT_S)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      _close_log(sweep_dir, run, log)
    say(f"{signal.Signals(e.signum).name}: stopped {len(running)} running train(s) (each "
        f"saved a checkpoint); run `sweep run` again to resume")
    raise SystemExit(128 + e.signum) from None
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def _run_loop(sweep_dir, todo, running, jobs, say) -> int:
  failed = 0
  while todo or running:
    while todo and len(running) < jobs:
      run = todo.pop(0)
      log = _open_log(sweep_dir, run)
      say(f"start {run['name']} ({status(sweep_dir, run)})")
      running.append((run, log, subprocess.Popen(train_command(sweep_dir, run), stdout=log,
                                                 stderr=subprocess.STDOUT)))
    time.sleep(0.5)
    for item in [r for r in running if r[2].poll() is not None]:
      run, log, proc = item
      running.remove(item)
      _close_log(sweep_dir, run, log)
      ok = proc.returncode == 0
      failed += not ok
      say(f"{'done' if ok else f'FAILED (exit {proc.returncode})'} {run['name']}"
          + ("" if ok else f"; see {paths.join(sweep_dir, run['name'], 'train.log')}"))
  return failed


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
