"""Cluster launch scripts (launch/tpu_vm.sh, launch/gpu_slurm.sh) and `sweep run --launcher`:
--dry-run prints every command and runs none, the train command reaches every worker/task
unchanged, mistakes are one `error:` line with exit status 2, and the TPU retry loop re-creates a
preempted VM and re-runs the same command (against a fake gcloud). No cloud, no SLURM needed."""

import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

TRAIN = ["configs/gpt2.py:small", "--workdir", "/mnt/runs/gpt2s", "--config.train.steps=1000",
         "--config.data.corpus=data/it's/**/*.txt"]
TRAIN_CMD = ["python", "-m", "transformer_jax.train", "--config=configs/gpt2.py:small",
             "--workdir=/mnt/runs/gpt2s", "--config.train.steps=1000",
             "--config.data.corpus=data/it's/**/*.txt"]


@pytest.fixture
def fake_bin(tmp_path):
  """A PATH whose gcloud and sbatch only record their arguments (one call per line) and emulate a
  TPU: describe prints tmp/state ("MISSING": fails), create -> READY, delete -> MISSING; the train
  ssh takes the next line of tmp/rcs, each worker's status ("-": its connection is lost), prints
  each worker's last line as launch/tpu_vm.sh's on_worker does, and exits as gcloud does: with
  the one worker's status (255 when lost), 0 with several; it marks the TPU PREEMPTED unless
  every worker's status is 0."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (tmp_path / "state").write_text("MISSING\n")
  script = f"""#!/bin/bash
d={shlex.quote(str(tmp_path))}
printf '%s\\n' "$(basename "$0") $*" >> "$d/calls"
case " $* " in
  *" describe "*) s="$(cat "$d/state")"; [ "$s" = MISSING ] && exit 1; echo "$s" ;;
  *" create "*) echo READY > "$d/state" ;;
  *" delete "*) echo MISSING > "$d/state" ;;
  *"--on-worker"*) read -ra rcs < "$d/rcs"; sed -i 1d "$d/rcs"; w=0
                   for rc in "${{rcs[@]}}"; do
                     [ "$rc" = - ] || echo "tjax: worker $w exit $rc"; w=$((w + 1))
                     [ "$rc" = 0 ] || echo PREEMPTED > "$d/state"
                   done
                   [ "${{#rcs[@]}}" -gt 1 ] && exit 0
                   [ "${{rcs[0]}}" = - ] && exit 255; exit "${{rcs[0]}}" ;;
esac
exit 0
"""
  for name in ("gcloud", "sbatch", "srun", "scontrol"):
    (bin_dir / name).write_text(script)
    (bin_dir / name).chmod(0o755)
  return tmp_path


FORWARDED = ("TJAX_CACHE_DIR", "TJAX_CACHE_MAX_GB", "TJAX_HEARTBEAT_TIMEOUT_S", "TJAX_VERBOSE")


def launch(script, *args, fake=None, env=None, cwd=REPO):
  environ = {k: v for k, v in os.environ.items() if k not in FORWARDED}  # (tpu_vm.sh passes them)
  environ.update(TJAX_POLL_S="0", **(env or {}))
  if fake is not None:
    environ["PATH"] = f"{fake / 'bin'}:{environ['PATH']}"
  return subprocess.run(["bash", f"{REPO}/launch/{script}", *args], capture_output=True,
                        text=True, cwd=cwd, env=environ, timeout=60)


def lines_with(out, *words):
  return [l for l in out.splitlines() if all(w in l for w in words) and not l.startswith("#")]


def ssh_command(line):
  """The --command=... of a printed `gcloud ... ssh` line, as argv."""
  (value,) = [a[len("--command="):] for a in shlex.split(line) if a.startswith("--command=")]
  return value


def test_tpu_dry_run_prints_every_command_and_runs_none(fake_bin):
  r = launch("tpu_vm.sh", "--name", "my-tpu", "--zone", "us-east5-a", "--type", "v5p-16",
             "--project", "proj", "--spot", "--retries", "3", "--delete", "--setup",
             "mountpoint -q /mnt/runs || sudo mount x:/runs /mnt/runs", "--dry-run", "--", *TRAIN,
             fake=fake_bin)
  assert r.returncode == 0, r.stderr
  assert not (fake_bin / "calls").exists()  # nothing external ran
  (create,) = lines_with(r.stdout, "gcloud compute tpus tpu-vm create")
  assert shlex.split(create) == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu",
                                 "--zone=us-east5-a", "--project=proj",
                                 "--accelerator-type=v5p-16", "--version=v2-alpha-tpuv5", "--spot"]
  assert lines_with(r.stdout, "tpu-vm scp", "--worker=all", "my-tpu:tjax-bundle.tar.gz")
  assert lines_with(r.stdout, "git archive")
  (train,) = lines_with(r.stdout, "tpu-vm ssh my-tpu", "--on-worker")
  assert "--worker=all" in shlex.split(train) and "--zone=us-east5-a" in shlex.split(train)
  remote = shlex.split(ssh_command(train))
  assert remote[:3] == ["cd", "transformer_jax", "&&"]
  worker = remote[3:]
  assert worker[:3] == ["bash", "launch/tpu_vm.sh", "--on-worker"]
  assert worker[worker.index("--setup") + 1] == (
      "mountpoint -q /mnt/runs || sudo mount x:/runs /mnt/runs")
  assert worker[worker.index("--") + 1:] == TRAIN_CMD[3:]  # the train arguments, unchanged
  assert lines_with(r.stdout, "tpu-vm scp", "logs/train-worker*.log", "runs/tpu/my-tpu/")
  assert "up to 3 times" in r.stdout
  assert shlex.split(lines_with(r.stdout, "tpu-vm delete")[0])[-1] == "--quiet"


def test_tpu_workers_get_the_cache_and_env_variables(fake_bin):
  """TJAX_CACHE_DIR set here (a gs:// cache shared by the workers) and --env KEY=VALUE reach the
  train command on every worker: the worker command began with `bash`, so the cache variable
  stayed here, and an export in --setup runs in a shell of its own. A bad --env is one line."""
  env = {"TJAX_CACHE_DIR": "gs://b/cache", "TJAX_VERBOSE": "1"}
  r = launch("tpu_vm.sh", "--name", "t1", "--zone", "z", "--env", "LIBTPU_INIT_ARGS=--a=1 --b",
             "--env=WANDB_MODE=offline", "--dry-run", "--", *TRAIN, fake=fake_bin, env=env)
  assert r.returncode == 0, r.stderr
  (train,) = lines_with(r.stdout, "tpu-vm ssh t1", "--on-worker")
  worker = shlex.split(ssh_command(train))[3:]
  assert worker[:6] == ["env", "TJAX_CACHE_DIR=gs://b/cache", "TJAX_VERBOSE=1",
                        "LIBTPU_INIT_ARGS=--a=1 --b", "WANDB_MODE=offline", "bash"]
  assert worker[6:8] == ["launch/tpu_vm.sh", "--on-worker"]
  r = launch("tpu_vm.sh", "--name", "t1", "--zone", "z", "--env", "1BAD", "--dry-run", "--",
             *TRAIN, fake=fake_bin)
  assert r.returncode == 2 and r.stderr.strip() == "error: --env '1BAD' is not KEY=VALUE"


def test_tpu_dry_run_queued_resource_and_sweep_workdir(tmp_path):
  sweep = "runs/test_launch_sweep"  # relative: its config.json goes along with the project
  os.makedirs(f"{REPO}/{sweep}/r1", exist_ok=True)
  try:
    with open(f"{REPO}/{sweep}/r1/config.json", "w") as f:
      f.write("{}")
    r = launch("tpu_vm.sh", "--name=q1", "--zone=us-central2-b", "--type=v6e-8", "--queued",
               "--spot", "--repo", "https://example.com/tjax.git", "--dry-run", "--",
               f"--workdir={sweep}/r1")
  finally:
    subprocess.run(["rm", "-rf", f"{REPO}/{sweep}"], check=True)
  assert r.returncode == 0, r.stderr
  assert "each worker's own disk" in r.stderr  # the honest note about a relative workdir
  (create,) = lines_with(r.stdout, "queued-resources create")
  assert shlex.split(create)[5:] == ["q1", "--zone=us-central2-b", "--node-id=q1",
                                     "--accelerator-type=v6e-8",
                                     "--runtime-version=v2-alpha-tpuv6e", "--spot"]
  assert lines_with(r.stdout, "queued-resources describe q1", "state.state")
  (clone,) = lines_with(r.stdout, "--worker=all", "git clone")
  assert "https://example.com/tjax.git" in ssh_command(clone)
  # the clone has no runs/ (git-ignored): the folder the config.json goes to is made first
  assert ssh_command(clone).endswith(f"; }} && mkdir -p transformer_jax/{sweep}/r1")
  assert lines_with(r.stdout, "tpu-vm scp", f"{sweep}/r1/config.json",
                    f"q1:transformer_jax/{sweep}/r1/config.json")
  (train,) = lines_with(r.stdout, "--on-worker")
  assert shlex.split(ssh_command(train))[-2:] == ["--", f"--workdir={sweep}/r1"]
  assert not lines_with(r.stdout, "delete")


def test_tpu_retries_recreate_a_preempted_vm_and_rerun_the_same_command(fake_bin):
  (fake_bin / "rcs").write_text("255\n0\n")  # preempted mid-run, then finished
  r = launch("tpu_vm.sh", "--name", "t1", "--zone", "z", "--spot", "--retries", "2", "--delete",
             "--repo", "https://example.com/r.git", "--logs", str(fake_bin / "logs"), "--",
             *TRAIN, fake=fake_bin)
  assert r.returncode == 0, r.stderr
  calls = (fake_bin / "calls").read_text().splitlines()
  assert all(c.startswith("gcloud compute tpus tpu-vm ") for c in calls)
  verbs = [c.split()[4] if "--on-worker" not in c else "train" for c in calls]
  verbs = ["clone" if "git clone" in c else v for c, v in zip(calls, verbs)]
  assert verbs == ["describe", "create", "describe", "clone", "train", "scp",   # attempt 1
                   "describe", "delete", "create", "describe", "clone", "train", "scp",  # retry
                   "delete"]  # --delete
  trains = [l for l in (fake_bin / "calls").read_text().splitlines() if "--on-worker" in l]
  assert len(set(trains)) == 1  # the very same command both times: it resumes from the workdir
  assert "retry 1 of 2" in r.stderr


@pytest.mark.parametrize("rc", [2, 3, 143])
def test_tpu_does_not_retry_user_errors_or_anomalies(fake_bin, rc):
  (fake_bin / "state").write_text("READY\n")
  (fake_bin / "rcs").write_text(f"{rc}\n0\n")
  r = launch("tpu_vm.sh", "--name", "t1", "--zone", "z", "--retries", "1" if rc == 143 else "5",
             "--repo", "u", "--logs", str(fake_bin / "logs"), "--", *TRAIN, fake=fake_bin)
  trains = [l for l in (fake_bin / "calls").read_text().splitlines() if "--on-worker" in l]
  if rc == 143:  # preempted: retried once, then done
    assert (r.returncode, len(trains)) == (0, 2)
  else:
    assert (r.returncode, len(trains)) == (rc, 1)


@pytest.mark.parametrize("workers, want, runs", [
    ("0 3", 3, 1),  # gcloud says 0; worker 1's anomaly (3) is the job's: not retried
    ("0 2 143", 2, 1),
    ("143 143", 0, 2),  # stopped after a signal: retried, then done
    ("0 -", 0, 1),  # worker 0 finished: the lost worker's connection does not matter
    ("- 0", 0, 2),  # worker 0's connection lost, gcloud says 0: retried
])
def test_tpu_job_status_comes_from_every_worker_not_from_gcloud(fake_bin, workers, want, runs):
  """With several workers `gcloud ... ssh --worker=all` exits 0 whatever the workers did (each
  failure is only printed); the workers' own last lines decide."""
  (fake_bin / "state").write_text("READY\n")
  (fake_bin / "rcs").write_text(f"{workers}\n0 0\n")
  r = launch("tpu_vm.sh", "--name", "t1", "--zone", "z", "--retries", "1", "--repo", "u",
             "--logs", str(fake_bin / "logs"), "--", *TRAIN, fake=fake_bin)
  trains = [l for l in (fake_bin / "calls").read_text().splitlines() if "--on-worker" in l]
  assert (r.returncode, len(trains)) == (want, runs), r.stderr


def test_a_workers_early_error_is_its_status_and_counts_have_no_leading_zero(fake_bin):
  """A mistake on a worker before the train command (here: no CONFIG and no config.json) says
  its status line too: with several workers gcloud exits 0, and without the line the run looked
  lost (255) and was retried. --retries 08 was read as octal (an endless retry loop)."""
  for setup in ([], ["--setup", "exit 2"]):  # a --setup that fails: set -e ends the worker (its
    # EXIT trap read a local of the function it unwound: `wid: unbound variable`, no line)
    r = subprocess.run(["bash", "launch/tpu_vm.sh", "--on-worker", *setup, "--", "--workdir",
                        str(fake_bin / "none")], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and re.search(r"^tjax: worker \S+ exit 2$", r.stdout, re.M), r
  for flag in ("08", "010"):
    r = launch("tpu_vm.sh", "--name", "t1", "--zone", "z", "--retries", flag, "--dry-run",
               "--", *TRAIN, fake=fake_bin)
    assert r.returncode == 2 and "--retries must be an integer >= 0, got" in r.stderr, r


def test_workers_status_rule():
  """_common.sh's tjax_workers_status over gcloud's output (markers anywhere in a line)."""
  def status(text, rc):
    return subprocess.run(["bash", "-c", f'. launch/_common.sh; tjax_workers_status <(printf '
                           f'%s {shlex.quote(text)}) {rc}'], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
  assert status("tjax: worker 0 exit 0\nxx tjax: worker 1 exit 143\n", 0) == "143"
  assert status("tjax: worker 1 exit 143\ntjax: worker 0 exit 1\n", 0) == "1"
  assert status("tjax: worker 0 exit 0\n", 0) == "0"
  assert status("loss 3.1\n", 0) == "255"
  assert status("loss 3.1\n", 255) == "255"
  assert status("tjax: worker 0 exit 0\n", 1) == "1"


def slurm_script(stdout):
  """The batch script printed by --dry-run."""
  return stdout[stdout.index("#!/bin/bash"):stdout.index("# submit:")]


def test_slurm_dry_run_one_process_per_gpu(fake_bin):
  r = launch("gpu_slurm.sh", "--nodes", "2", "--gpus-per-node", "8", "--partition", "a100",
             "--account=lab", "--time", "04:00:00", "--requeue", "--dry-run", "--", *TRAIN,
             fake=fake_bin)
  assert r.returncode == 0, r.stderr
  assert not (fake_bin / "calls").exists()
  script = slurm_script(r.stdout)
  sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", script, re.M))
  assert sbatch["nodes"] == "2" and sbatch["ntasks-per-node"] == "8"
  assert sbatch["gpus-per-node"] == "8" and sbatch["partition"] == "a100"
  assert sbatch["account"] == "lab" and sbatch["time"] == "04:00:00"
  assert "requeue" in sbatch and sbatch["signal"].startswith("TERM@")
  assert ". .venv/bin/activate" in script and "XLA_PYTHON_CLIENT_MEM_FRACTION" in script
  # the tokenizer the config names, with its objective's pieces (only the default one was made)
  setup = re.search(r"flock 9 && tjax_setup gpu (.*)\) 9>", script).group(1)
  assert shlex.split(setup) == [TRAIN[0], *TRAIN[3:]]
  srun = script[script.index("srun "):].split("\nrc=")[0].replace("\\\n", " ")
  argv = shlex.split(srun)
  assert argv[argv.index("--ntasks-per-node=8")] and "--nodes=2" in argv
  assert argv[-len(TRAIN_CMD):] == TRAIN_CMD
  # what each task runs first: the GPU its process addresses (JAX_LOCAL_DEVICE_IDS)
  wrapper = argv[argv.index("-c") + 1]
  for visible, expected in [("0,1,2,3,4,5,6,7", "5"), ("", "5"), ("5", "0")]:
    env = dict(os.environ, SLURM_LOCALID="5", CUDA_VISIBLE_DEVICES=visible)
    out = subprocess.run(["bash", "-c", wrapper, "task", "printenv", "JAX_LOCAL_DEVICE_IDS"],
                         env=env, capture_output=True, text=True)
    assert out.stdout.strip() == expected, (visible, out)
  assert "scontrol requeue" in script
  assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
  # After the run: a signal requeues the job, at most TJAX_MAX_REQUEUES times (a crash by a
  # signal every time, e.g. an out-of-memory kill, looped forever); other failures do not.
  ending = script[script.index("if (( rc >= 128 ))"):]
  (fake_bin / "scontrol").write_text("#!/bin/sh\necho \"scontrol $*\"\n")
  (fake_bin / "scontrol").chmod(0o755)
  for rc, restarts, status, said in ((143, "0", 0, "scontrol requeue 7"),
                                     (137, "9", 0, "scontrol requeue 7"),
                                     (137, "10", 137, "not requeued: the job restarted 10 times"),
                                     (1, "0", 1, "")):
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", SLURM_JOB_ID="7",
               SLURM_RESTART_COUNT=restarts)
    out = subprocess.run(["bash", "-c", f"rc={rc}\n{ending}"], env=env, capture_output=True,
                         text=True)
    assert out.returncode == status and out.stdout.startswith(said), (rc, restarts, out)
  assert shlex.split(r.stdout.splitlines()[-1]) == ["sbatch", "runs/slurm/tjax-gpt2s.sbatch"]


def test_slurm_one_process_per_node_and_submission(fake_bin):
  script_path = fake_bin / "job.sbatch"
  args = ["--nodes=3", "--gpus-per-node=4", "--per=node", "--script", str(script_path), "--",
          *TRAIN]
  r = launch("gpu_slurm.sh", "--dry-run", *args, fake=fake_bin)
  assert r.returncode == 0, r.stderr
  script = slurm_script(r.stdout)
  assert "#SBATCH --ntasks-per-node=1\n" in script and "#SBATCH --gpus-per-node=4\n" in script
  assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3;" in script
  assert "requeue" not in script
  assert not script_path.exists()
  r = launch("gpu_slurm.sh", *args, fake=fake_bin)  # submits (a fake sbatch)
  assert r.returncode == 0, r.stderr
  assert script_path.read_text() == script
  assert (fake_bin / "calls").read_text().splitlines() == [f"sbatch {script_path}"]


ARGS = {"tpu_vm.sh": ["--name", "t", "--zone", "z"],
        "gpu_slurm.sh": ["--nodes", "1", "--gpus-per-node", "2"]}
TRAIN_OK = ["configs/smoke.py", "--workdir", "runs/x"]


@pytest.mark.parametrize("script,args,culprit", [
    ("gpu_slurm.sh", ["--nodes", "two", "--gpus-per-node", "8", "--"] + TRAIN_OK, "--nodes"),
    ("gpu_slurm.sh", ["--nodes", "0", "--gpus-per-node", "8", "--"] + TRAIN_OK, "--nodes"),
    ("gpu_slurm.sh", ["--nodes", "1", "--gpus-per-node", "x", "--"] + TRAIN_OK,
     "--gpus-per-node"),
    ("gpu_slurm.sh", ["--gpus-per-node", "8", "--"] + TRAIN_OK, "--nodes"),
    ("gpu_slurm.sh", ARGS["gpu_slurm.sh"] + ["--per", "socket", "--"] + TRAIN_OK, "--per"),
    ("gpu_slurm.sh", ARGS["gpu_slurm.sh"] + ["--time", "soon", "--"] + TRAIN_OK, "--time"),
    ("gpu_slurm.sh", ARGS["gpu_slurm.sh"] + ["--partition", "--"] + TRAIN_OK, "--partition"),
    ("gpu_slurm.sh", ARGS["gpu_slurm.sh"] + ["--gpus", "8", "--"] + TRAIN_OK, "--gpus"),
    ("tpu_vm.sh", ARGS["tpu_vm.sh"] + ["--bogus", "--"] + TRAIN_OK, "--bogus"),
    ("tpu_vm.sh", ["--zone", "z", "--"] + TRAIN_OK, "--name"),
    ("tpu_vm.sh", ["--name", "t", "--"] + TRAIN_OK, "--zone"),
    ("tpu_vm.sh", ["--name", "Bad_Name", "--zone", "z", "--"] + TRAIN_OK, "Bad_Name"),
    ("tpu_vm.sh", ARGS["tpu_vm.sh"] + ["--type", "h100", "--"] + TRAIN_OK, "h100"),
    ("tpu_vm.sh", ARGS["tpu_vm.sh"] + ["--retries", "-1", "--"] + TRAIN_OK, "--retries"),
    ("tpu_vm.sh", ARGS["tpu_vm.sh"] + ["--spot", "--preemptible", "--"] + TRAIN_OK, "--spot"),
    ("tpu_vm.sh", ARGS["tpu_vm.sh"] + ["--queued", "--preemptible", "--"] + TRAIN_OK,
     "--preemptible"),
    ("tpu_vm.sh", ARGS["tpu_vm.sh"] + ["--type", "v9z-8", "--"] + TRAIN_OK, "--runtime"),
    ("tpu_vm.sh", ARGS["tpu_vm.sh"] + ["--"] + TRAIN_OK + ["--config=configs/gpt2.py:tiny"],
     "two configs given"),  # the last one won
    # a flag given twice with two values (the last one silently won), as cli.parse refuses it
    ("tpu_vm.sh", ARGS["tpu_vm.sh"] + ["--zone=y", "--"] + TRAIN_OK,
     "--zone given twice ('z', 'y')"),
    ("gpu_slurm.sh", ARGS["gpu_slurm.sh"] + ["--nodes", "2", "--"] + TRAIN_OK,
     "--nodes given twice"),
    ("tpu_vm.sh", ARGS["tpu_vm.sh"] + ["--"] + TRAIN_OK + ["--workdir=runs/y"],
     "--workdir given twice ('runs/x', 'runs/y')"),
    ("gpu_slurm.sh", ARGS["gpu_slurm.sh"] + ["--"] + TRAIN_OK + [
        "--config.train.steps", "5", "--config.train.steps=6"], "--config.train.steps given twice"),
    ("local.sh", ["--processes", "2", "--processes=3"], "--processes given twice ('2', '3')"),
    ("local.sh", ["--devices-per-process", "2", "--config.mesh.cpu_devices=4"], "disagree"),
    ("local.sh", ["--config.train.steps"], "--config.train.steps needs a value"),
    ("local.sh", ["--config.train.steps=1", "--config.train.steps", "2"], "given twice"),
    ("local.sh", ["--dry-run"], "unknown argument '--dry-run'"),
    ("local.sh", ["nowhere.py"], "config file not found: nowhere.py"),
])
def test_validation_errors_are_one_line_exit_2(script, args, culprit):
  r = launch(script, *(["--dry-run"] if script != "local.sh" else []), *args)
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert r.stdout == ""
  (line,) = r.stderr.splitlines()
  assert line.startswith("error: ") and culprit in line


@pytest.mark.parametrize("script", ["tpu_vm.sh", "gpu_slurm.sh"])
@pytest.mark.parametrize("train,culprit", [
    (["configs/missing.py", "--workdir", "runs/x"], "configs/missing.py"),
    (["configs/smoke.py:tiny"], "--workdir"),
    (["--workdir", "runs/not_there_xyz"], "runs/not_there_xyz/config.json"),
    (["configs/smoke.py", "--workdir", "runs/x", "--steps=3"], "--steps=3"),
    (["configs/smoke.py", "--workdir", "runs/x", "--config.train.steps"], "--config.train.steps"),
    (None, "--workdir"),  # no `--` at all
])
def test_train_argument_errors(script, train, culprit):
  r = launch(script, "--dry-run", *ARGS[script], *(["--", *train] if train is not None else []))
  assert r.returncode == 2, (r.stdout, r.stderr)
  (line,) = r.stderr.splitlines()
  assert line.startswith("error: ") and culprit in line


@pytest.mark.parametrize("script,dry_run", [("tpu_vm.sh", []), ("gpu_slurm.sh", []),
                                            ("gpu_slurm.sh", ["--dry-run"])])
def test_a_bad_config_is_one_line_here_before_any_machine(script, dry_run, fake_bin):
  """A bad key or value was found by every worker after its setup (a VM made, a job queued).
  A dry run checks it too (it printed the check and exited 0)."""
  r = launch(script, *ARGS[script], *dry_run, "--", "configs/gpt2.py:tiny", "--workdir", "/mnt/x",
             "--config.model.num_heads=3", fake=fake_bin)
  assert r.returncode == 2, r
  assert r.stderr.splitlines()[-1] == ("error: model.num_heads=3 does not divide "
                                       "model.d_model=64")
  assert not (fake_bin / "calls").exists()  # no gcloud, no sbatch


@pytest.mark.parametrize("script,flags", [
    ("tpu_vm.sh", ["--name", "--zone", "--type", "--project", "--runtime", "--spot",
                   "--preemptible", "--queued", "--retries", "--repo", "--setup", "--delete",
                   "--dry-run", "gs://"]),
    ("gpu_slurm.sh", ["--nodes", "--gpus-per-node", "--per", "--partition", "--account", "--time",
                      "--requeue", "--dry-run", "XLA_PYTHON_CLIENT_MEM_FRACTION"]),
    ("local.sh", ["--workdir", "--processes", "--devices-per-process", "TJAX_KILL_AFTER_S"]),
])
def test_help(script, flags, tmp_path):
  """From any directory, by any path (the scripts cd to the checkout, then read their own help
  from the path they were started by: empty, a sed error, exit 2)."""
  for arg, cwd in (("--help", REPO), ("-h", f"{REPO}/launch"), ("--help", tmp_path)):
    r = subprocess.run(["bash", os.path.relpath(f"{REPO}/launch/{script}", cwd), arg],
                       capture_output=True, text=True, cwd=cwd, timeout=60)
    assert r.returncode == 0 and r.stderr == ""
    assert f"bash launch/{script}" in r.stdout and "set -euo" not in r.stdout
    for flag in flags:
      assert flag in r.stdout, flag


def test_sweep_print_commands_with_launchers(tmp_path):
  sweep = tmp_path / "sweep"
  for name in ("small", "big", "done"):
    (sweep / name).mkdir(parents=True)
    (sweep / name / "config.json").write_text("{}")
  (sweep / "plan.jsonl").write_text("".join(json.dumps({"name": n, "steps": 10}) + "\n"
                                            for n in ("small", "big", "done")))
  (sweep / "done" / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval_loss": 3.0}) + "\n")

  def sweep_run(*flags):
    return subprocess.run([sys.executable, "-m", "transformer_jax.sweep", "run", f"--dir={sweep}",
                           *flags], capture_output=True, text=True, cwd=REPO, timeout=60)

  r = sweep_run("--print-commands")
  assert r.stdout.splitlines() == [f"python -m transformer_jax.train --workdir={sweep}/{n}"
                                   for n in ("small", "big")]
  r = sweep_run("--print-commands", "--launcher=slurm",
                "--launcher_args=--nodes 2 --gpus-per-node 8 --dry-run")
  assert r.stdout.splitlines() == [
      f"bash launch/gpu_slurm.sh --nodes 2 --gpus-per-node 8 --dry-run -- --workdir={sweep}/{n}"
      for n in ("small", "big")]
  # each line runs as it is: here a dry run whose srun trains that workdir from its config.json
  out = subprocess.run(r.stdout.splitlines()[0], shell=True, capture_output=True, text=True,
                       cwd=REPO, timeout=60)
  assert out.returncode == 0, out.stderr
  assert f"python -m transformer_jax.train --workdir={sweep}/small" in out.stdout
  # ... after making the tokenizer that config.json names (it made the default one only)
  setup = re.search(r"flock 9 && tjax_setup gpu (.*)\) 9>", out.stdout).group(1)
  assert shlex.split(setup) == [f"--workdir={sweep}/small"]
  r = sweep_run("--print-commands", "--launcher=tpu_vm", "--launcher_args=--name t --zone z")
  assert r.stdout.splitlines()[1] == (
      f"bash launch/tpu_vm.sh --name t --zone z -- --workdir={sweep}/big")
  for flags, culprit in [(["--print-commands", "--launcher=aws"], "--launcher"),
                         (["--launcher=slurm"], "--print-commands")]:
    r = sweep_run(*flags)
    assert r.returncode == 2 and culprit in r.stderr and r.stderr.startswith("error: ")


FAKE_TRAIN = """import pathlib, signal, sys, time
got = []
signal.signal(signal.SIGTERM, lambda *_: got.append(1))
pathlib.Path(sys.argv[1] + ".started").write_text("")
while not got:
  print("step", flush=True)
  time.sleep(0.05)
time.sleep(0.3)  # (a tee killed by the same signal is gone by now)
for _ in range(5):  # the progress bar's and the save's lines
  print("saving", flush=True)
  time.sleep(0.02)
pathlib.Path(sys.argv[1]).write_text("checkpoint")
print("saved", flush=True)
sys.exit(143)
"""


# A child's SIGINT, SIGHUP and SIGTERM as a terminal or ssh session gives them (a suite run under
# nohup, or as a background job, ignores SIGHUP or SIGINT, and a shell cannot trap a signal
# ignored when it starts); coreutils' env resets them without a fork in Python.
DEFAULT_SIGNALS = ["env", "--default-signal=INT,HUP,TERM"]


def _stand_in_worker(tmp_path, **popen):
  """launch/tpu_vm.sh's on_worker around a stand-in train that saves on SIGTERM and writes
  lines while it does; returns (the shell, the checkpoint marker, the log)."""
  (tmp_path / "train.py").write_text(FAKE_TRAIN)
  mark, log = tmp_path / "ckpt", tmp_path / "worker0.log"
  script = (f"set -euo pipefail; . launch/_common.sh; "
            f"trap 'echo \"tjax: worker 0 exit $?\"' EXIT; set +e; "
            f"tjax_run_logged {log} 1 {sys.executable} {tmp_path}/train.py {mark}; rc=$?; exit $rc")
  proc = subprocess.Popen([*DEFAULT_SIGNALS, "bash", "-c", script], cwd=REPO,
                          start_new_session=True, **popen)
  for _ in range(200):
    if (tmp_path / "ckpt.started").exists():
      break
    time.sleep(0.05)
  return proc, mark, log


def test_a_signalled_or_disconnected_worker_saves_its_checkpoint_and_says_its_status(tmp_path):
  """A VM's shutdown signals every process, tee included: a dead tee failed the train's next
  write and it died without its checkpoint, and the worker said "exit 0". An ssh connection
  that drops leaves tee no reader: the same. Now the train saves, exits 143 and says so."""
  import signal  # pylint: disable=g-import-not-at-top
  with open(tmp_path / "out", "w") as out:  # every process of the worker gets SIGTERM
    proc, mark, log = _stand_in_worker(tmp_path, stdout=out, stderr=subprocess.STDOUT)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
  assert mark.read_text() == "checkpoint" and log.read_text().endswith("saved\n")
  assert (tmp_path / "out").read_text().splitlines()[-1] == "tjax: worker 0 exit 143"
  for p in (mark, log, tmp_path / "ckpt.started"):
    p.unlink()
  proc, mark, log = _stand_in_worker(tmp_path, stdout=subprocess.PIPE)  # the reader goes away
  time.sleep(0.3)
  proc.stdout.close()
  time.sleep(0.5)  # (the train goes on printing into tee)
  proc.send_signal(signal.SIGHUP)  # what the worker's shell gets when the connection drops
  proc.wait(timeout=30)  # (its last line has no reader: SIGPIPE)
  assert mark.read_text() == "checkpoint" and log.read_text().endswith("saved\n")


def test_tpu_a_failed_git_pull_stops_the_attempt_before_the_train(fake_bin):
  """--repo: a `git pull --ff-only` (or clone) that fails on the workers was ignored, and the
  train ran on stale code (the attempt then exited 0)."""
  gcloud = fake_bin / "bin" / "gcloud"
  gcloud.write_text(gcloud.read_text().replace('  *"--on-worker"*)', '  *"git -C"*) exit 1 ;;\n'
                                               '  *"--on-worker"*)', 1))
  (fake_bin / "state").write_text("READY\n")
  (fake_bin / "rcs").write_text("0\n")
  r = launch("tpu_vm.sh", "--name", "t1", "--zone", "z", "--repo", "u", "--logs",
             str(fake_bin / "logs"), "--", *TRAIN, fake=fake_bin)
  calls = (fake_bin / "calls").read_text()
  assert r.returncode == 1 and "git -C" in calls and "--on-worker" not in calls, r.stderr


def test_tpu_refuses_a_config_git_does_not_track_before_any_gcloud(fake_bin):
  """The workers get the files git tracks (a `git archive`): an untracked CONFIG passed the
  check here, then the TPU was made and every worker said the file was not found."""
  config = f"runs/test_launch_untracked_{os.getpid()}.py"  # (runs/ is git-ignored)
  open(f"{REPO}/{config}", "w").close()
  try:
    r = launch("tpu_vm.sh", *ARGS["tpu_vm.sh"], "--", config, "--workdir", "/x", fake=fake_bin)
  finally:
    os.remove(f"{REPO}/{config}")
  assert r.returncode == 2 and not (fake_bin / "calls").exists(), r
  assert r.stderr.startswith(f"error: {config} is not tracked by git") and r.stderr.count("\n") == 1


