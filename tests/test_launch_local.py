"""launch/local.sh: its supervision of N local processes (a failure stops the others, Ctrl-C
waits for their saves), its logs, and the caller's directory for a relative CONFIG or --workdir."""

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.test_launch import DEFAULT_SIGNALS, launch


@pytest.mark.parametrize("statuses, want", [
    ((0, 0, 0), 0),
    ((143, 143, 143), 143),  # a stop after a signal
    ((143, 1, None), 1),  # a failure after another process's stop: not a preemption
    ((3, 143, None), 3),
])
def test_local_job_status_is_its_first_failure_and_a_failure_stops_the_others(statuses, want):
  """launch/local.sh's supervision (_common.sh's tjax_wait_all) over stand-in processes that exit
  in turn with `statuses` (None: runs on, as a process that waits for its dead peer in a
  collective does, and takes SIGTERM for a preemption: a save that waited for the dead peer
  until JAX's heartbeat timeout, then a C++ abort). A failure kills them 3 s later."""
  starts = " ".join(
      "(trap '' TERM; exec sleep 60) & pids+=($!);" if s is None else
      f"(sleep {0.3 * (i + 1)}; exit {s}) & pids+=($!);" for i, s in enumerate(statuses))
  script = f". launch/_common.sh; pids=(); {starts} tjax_wait_all LOGS"
  t0 = time.time()
  r = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True,
                     timeout=30)
  assert r.returncode == want, (r.returncode, r.stderr)
  assert time.time() - t0 < 8  # the still-running process was stopped, not waited for
  failures = [i for i, s in enumerate(statuses) if s not in (0, 143, None)]
  lines = r.stderr.splitlines()
  if failures:
    i = failures[0]
    assert lines == [f"error: process {i} exited with status {statuses[i]} (log: "
                     f"LOGS/process_{i}.log); stopping the others"], r.stderr
  else:
    assert lines == [], r.stderr


def test_local_processes_append_to_their_logs(tmp_path):
  """A re-run (a resume) of `launch/local.sh --processes N` truncated each process's log: the
  earlier run's lines (a preempted run's last words) were gone. Each run now appends after a
  line that dates it; process 0's output is shown here too."""
  script = (f". launch/_common.sh; pids=(); tjax_start_all {tmp_path} 2 bash -c "
            "'echo run $TJAX_PROCESS_ID'; tjax_wait_all LOGS")
  for _ in range(2):
    r = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0 and r.stdout == "run 0\n", r
  for i in range(2):
    for _ in range(100):  # (process 0's tee may still be writing)
      lines = (tmp_path / f"process_{i}.log").read_text().splitlines()
      if len(lines) == 4:
        break
      time.sleep(0.02)
    assert [l.split()[0] for l in lines] == ["===", "run", "===", "run"], lines
    assert lines[0].endswith(" bash -c 'echo run $TJAX_PROCESS_ID'") and lines[1] == f"run {i}"



@pytest.mark.parametrize("sent", ["SIGINT", "SIGHUP"])
def test_a_ctrl_c_to_a_local_job_waits_for_its_processes_to_save(sent):
  """Ctrl-C to `launch/local.sh --processes N` killed tjax_wait_all's `sleep` as well, and
  set -e ended the job at once, its processes still saving (nothing waited or killed them).
  A closed terminal (SIGHUP) ended the job's shell at once, its processes still training."""
  import signal  # pylint: disable=g-import-not-at-top
  saver = ("import signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
           "signal.signal(signal.SIGHUP, signal.SIG_IGN); "
           "signal.signal(signal.SIGTERM, lambda *_: (time.sleep(2), sys.exit(143))); "
           "time.sleep(30)")
  script = (f"set -euo pipefail; . launch/_common.sh; {sys.executable} -c '{saver}' & "
            f"pids=($!); tjax_wait_all_saving LOGS")
  proc = subprocess.Popen([*DEFAULT_SIGNALS, "bash", "-c", script], cwd=REPO,
                          start_new_session=True)
  time.sleep(1.0)
  t0 = time.time()
  os.killpg(proc.pid, getattr(signal, sent))
  assert proc.wait(timeout=30) == 143
  assert time.time() - t0 > 1.5  # it waited for the save



def test_local_takes_config_and_workdir_from_the_callers_directory(tmp_path):
  """`local.sh my.py --workdir out` from another directory: my.py was looked for, and out made,
  in the checkout. A recipe path (configs/...) not found here is the checkout's."""
  import hashlib  # pylint: disable=g-import-not-at-top
  with open(f"{REPO}/pyproject.toml", "rb") as f:  # a .venv that _venv.sh takes as it is
    stamp = f".installed-{hashlib.sha1(f.read()).hexdigest()[:12]}-"
  if not any(n.startswith(stamp) for n in os.listdir(f"{REPO}/.venv")):
    pytest.skip("no .venv installed from this pyproject.toml")
  (tmp_path / "my.py").write_text("")
  for config in ("my.py:x", "configs/gpt2.py:tiny"):
    # PYTHON=false: the venv step stops it (exit 2) right after the arguments are resolved
    r = launch("local.sh", config, "--workdir", "out", cwd=tmp_path, env={"PYTHON": "false"})
    assert r.returncode == 2 and r.stdout == f"workdir: {tmp_path}/out\n", r
    assert r.stderr.startswith("error: Python 3.10+ is required"), r

