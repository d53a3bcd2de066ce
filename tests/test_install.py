"""The package as pip installs it (not editable): it carries its own defaults; its commands and
their shared command line (cli.parse, and how a job's processes find each other); the pytest
command launch/test.sh runs in the .venv it installs."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_installed_package_fills_new_keys_of_a_saved_config(tmp_path):
  """A workdir's config.json written before a key existed gets that key's default from
  transformer_jax/config/base.py in a non-editable install run away from the checkout."""
  target, src = tmp_path / "site", tmp_path / "src"  # built from a copy: no build/ in the repo
  src.mkdir()
  shutil.copytree(os.path.join(REPO, "transformer_jax"), src / "transformer_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), src)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                  "--no-build-isolation", "--no-compile", "--target", str(target), str(src)],
                 check=True, capture_output=True, timeout=300)
  saved = tmp_path / "config.json"
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  old = json.loads(config_lib.to_json(config_lib.base.get_config()))
  del old["model"]["scan_layers"], old["mesh"]["dcn_data"]  # "newer" keys
  old["model"]["d_model"] = 96
  saved.write_text(json.dumps(old))
  code = ("import json, sys; from transformer_jax import config as c; "
          "x = c.from_json_file(sys.argv[1]); print(c.__file__); "
          "print(json.dumps([x.model.scan_layers, x.mesh.dcn_data, x.model.d_model]))")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["PYTHONPATH"] = str(target)
  out = subprocess.run([sys.executable, "-c", code, str(saved)], cwd=tmp_path, env=env,
                       check=True, capture_output=True, text=True, timeout=120).stdout.split("\n")
  assert out[0].startswith(str(target)), out  # the installed copy, not the checkout
  assert json.loads(out[1]) == [False, 1, 96]


ENTRY_POINTS = {  # command -> a flag its --help must list
    "train": "--workdir=''", "sample": "--max_new_tokens=64", "tokenizer": "--vocab_size=0",
    "aot": "--topology=''", "benchmark": "--steps=10", "convert": "export --workdir=W",
    "sweep": "predict  --fit=DIR", "evaluate": "--num_fewshot=0", "clean": "--workers=1",
    "quantize": "--mode='int8'", "inspect": "--top_k=5", "config": "--workdir=''"}


def _run(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_every_command_answers_help_and_tjax_lists_and_dispatches_them():
  """`--help` (or -h) prints the command's usage, flags and defaults, exit 0, nothing else run;
  `python -m transformer_jax` (the `tjax` console script) lists the commands and dispatches."""
  import transformer_jax.__main__ as tjax  # pylint: disable=g-import-not-at-top
  assert set(tjax.COMMANDS) == set(ENTRY_POINTS)
  for command, flag in ENTRY_POINTS.items():
    out = _run(f"transformer_jax.{command}", "--help")
    assert out.returncode == 0 and flag in out.stdout, (command, out.stdout[-500:], out.stderr)
  assert "--config.KEY=VALUE" in _run("transformer_jax.train", "--workdir", "x", "-h").stdout
  listing = _run("transformer_jax")
  assert listing.returncode == 0
  assert all(f"  {c}" in listing.stdout for c in ENTRY_POINTS), listing.stdout
  dispatched = _run("transformer_jax", "sample", "--help")
  assert dispatched.returncode == 0 and "--max_new_tokens=64" in dispatched.stdout
  assert dispatched.stdout.startswith("Generate text from a workdir")
  dispatched = _run("transformer_jax", "config", "--help")  # (an unknown command)
  assert dispatched.stdout.startswith("`python -m transformer_jax.config --config="), dispatched
  bad = _run("transformer_jax", "trian")
  assert bad.returncode == 2 and bad.stderr.strip() == (
      "error: unknown command 'trian'; commands: " + ", ".join(tjax.COMMANDS))
  with open(os.path.join(REPO, "pyproject.toml")) as f:
    assert 'tjax = "transformer_jax.__main__:main"' in f.read()


def test_the_build_needs_the_setuptools_that_reads_its_license():
  """`license = "Apache-2.0"` (an SPDX string, PEP 639) needs setuptools 77: an older one, as an
  offline `pip wheel --no-build-isolation` takes, failed on it (metadata-generation-failed)."""
  with open(os.path.join(REPO, "pyproject.toml")) as f:
    text = f.read()
  assert re.search(r'^license = "', text, re.M)
  assert int(re.search(r'^requires = \["setuptools>=(\d+)', text, re.M).group(1)) >= 77


def test_the_tokenizer_a_config_names_is_found_before_jax_is_imported(tmp_path):
  """launch/local.sh runs `tokenizer --config=... --if_missing` before every train: with the
  file there it read it in ~3 s, importing the data modules (grain, jax); now before them."""
  model = tmp_path / "tok.model"
  model.write_bytes(b"")
  code = ("import sys; from transformer_jax import tokenizer; "
          f"s = tokenizer.main(['--config={REPO}/configs/gpt2.py:tiny', "
          f"'--config.data.tokenizer={model}', '--if_missing']); "
          "print(s, 'jax' in sys.modules, 'grain' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
  assert out.stdout.split() == ["0", "False", "False"], out.stderr[-2000:]


def test_repeated_and_bare_config_overrides_are_refused_as_the_scripts_refuse_them():
  """A --config.KEY given twice with two values took the last one silently (a flag twice is
  refused); `--config.data.tokenizer --if_missing` set the tokenizer to '' silently (and
  tokenizer then asked for --config, which was given)."""
  from transformer_jax import cli  # pylint: disable=g-import-not-at-top
  from transformer_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  flags = {"workdir": "", "if_missing": False}
  assert cli.parse(["--config.train.steps=5", "--config.train.steps", "5"], flags)[1] == [
      "train.steps=5"]  # the same value twice: one override
  for argv, error in [
      (["--config.train.steps=5", "--config.train.steps=7"],
       "--config.train.steps given twice ('5', '7'); give one"),
      (["--config=c.py", "--config.data.tokenizer", "--if_missing"],
       "--config.data.tokenizer needs a value: --config.data.tokenizer=VALUE or "
       "--config.data.tokenizer VALUE")]:
    with pytest.raises(ConfigError) as e:
      cli.parse(argv, flags)
    assert str(e.value) == error


def test_how_the_processes_of_a_job_find_each_other():
  """SLURM: only a job step's processes (srun: SLURM_STEP_NODELIST, which JAX's detection
  reads) are a multi-process job; a process of the allocation itself (salloc's shell, a batch
  script's own command) runs alone (it was a 23-line JAX traceback). TJAX_* variables and the
  flags combine; TJAX_DISTRIBUTED opts out in any spelling of off."""
  from transformer_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from transformer_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  allocation = {"SLURM_JOB_ID": "5", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
                "SLURM_LOCALID": "0"}
  assert distributed.detect(environ=allocation) is None
  assert distributed.detect(environ=dict(allocation, SLURM_STEP_NODELIST="n[1-2]")) == {}
  for off in ("off", "OFF", "no", "0", "false"):
    assert distributed.detect(environ=dict(allocation, SLURM_STEP_NODELIST="n1",
                                           TJAX_DISTRIBUTED=off)) is None, off
  env = {"TJAX_COORDINATOR": "h:1", "TJAX_NUM_PROCESSES": "2"}
  assert distributed.detect(process_id=1, environ=env) == {
      "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
  for kwargs, environ, error in [
      ({"process_id": 1}, dict(env, TJAX_PROCESS_ID="0"),
       "--process_id=1 and TJAX_PROCESS_ID=0 disagree: drop one"),
      ({"process_id": 1}, {"TJAX_COORDINATOR": "h:1"}, "--num_processes (or TJAX_NUM_PROCESSES)"
       " not set (an explicit multi-process run needs all three)"),
      ({}, {"TJAX_DISTRIBUTED": "maybe"}, "TJAX_DISTRIBUTED='maybe' must be off (or no, 0, "
       "false) or auto")]:
    with pytest.raises(ConfigError) as e:
      distributed.detect(**kwargs, environ=environ)
    assert str(e.value) == error


def test_test_sh_runs_the_paths_it_is_given_and_else_the_whole_suite(tmp_path):
  """launch/test.sh passed `tests` before the arguments: `bash launch/test.sh tests/x.py` ran
  the whole suite too. Here in a stand-in checkout whose .venv's python prints its argv."""
  import hashlib  # pylint: disable=g-import-not-at-top
  venv = tmp_path / ".venv"
  (venv / "cuda_aot").mkdir(parents=True)
  (tmp_path / "launch").mkdir()
  for name in ("launch/test.sh", "launch/_venv.sh", "pyproject.toml"):
    (tmp_path / name).write_text(open(f"{REPO}/{name}").read())
  digest = hashlib.sha1((tmp_path / "pyproject.toml").read_bytes()).hexdigest()[:12]
  for name, text in [(f".installed-{digest}-test", ""), ("cuda_aot/.jax-0.0", ""),
                     ("bin/activate", f'PATH="{venv}/bin:$PATH"\n'),
                     ("bin/python", '#!/bin/sh\n[ "$1" = -c ] && echo 0.0 || echo "$@"\n')]:
    (venv / name).parent.mkdir(exist_ok=True)
    (venv / name).write_text(text)
  (venv / "bin" / "python").chmod(0o755)

  def pytest_argv(*args):
    r = subprocess.run(["bash", f"{tmp_path}/launch/test.sh", *args], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()

  # no path: pytest runs pyproject's testpaths (["tests"]) from the checkout's root
  assert pytest_argv("-ra") == ["-m", "pytest", "-q", "-n", "2", "--dist", "worksteal", "-ra"]
  assert "tests" not in pytest_argv("tests/test_launch.py::test_help", "-k", "tpu")
