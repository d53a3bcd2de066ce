"""A workdir's history survives interruptions and refused updates: a params start cut short at
any point, a diverged run's saves, a checkpoint deleted while it is read, a full disk at start,
Ctrl-C before the first step."""

import errno
import os

import jax
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.training import checkpoint as ckpt_lib
from transformer_jax.training import resume
from tests.conftest import REPO, tiny_overrides

ONE = lambda: jax.devices()[:1]  # pylint: disable=unnecessary-lambda-assignment


def _config(tiny_data, **extra):
  return config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data, **extra))


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
