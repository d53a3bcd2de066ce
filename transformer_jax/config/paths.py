"""Workdir paths, local or on Cloud Storage (`gs://BUCKET/PATH`), through one abstraction:
`etils.epath` (which Orbax and TFDS use too; gcsfs serves gs:// when TensorFlow is absent).

What an object store lacks, and what the training code does instead on gs:// (local paths keep the
file-system behaviour they always had):
- atomic rename: an object is written whole or not at all, so files are written in place (locally
  a temporary file is renamed over the target, as before);
- directories: nothing is created (mkdir on gs:// could create a missing bucket); a "folder" exists
  while objects are under it;
- append: metrics.jsonl and the TensorBoard events are buffered and each rewritten as one object
  once per window (training/metrics.py), never once per line;
- flock: the workdir lock is an object with a heartbeat (training/lock.py).

A local GCS emulator is named by STORAGE_EMULATOR_HOST=http://HOST:PORT, the variable Google's
clients and gcsfs honour. `use_emulator` (run at import, and again before each gs:// access, so a
variable set later counts) passes it on to TensorStore, which writes Orbax's checkpoints:
TENSORSTORE_GCS_HTTP_URL (unless set) and its testing token GOOGLE_AUTH_TOKEN_FOR_TESTING, and
to the Google Cloud C++ client that ArrayRecord reads gs:// shards with:
CLOUD_STORAGE_EMULATOR_ENDPOINT (unless set); it also turns off gcsfs's bucket-type probe
(GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false), an API emulators lack. `python -m
transformer_jax.config.paths DIR` checks that a workdir is writable (the launch scripts run it):
exit 0, or one `error:` line and exit 2. `upload` and `download` copy files between a local folder
and a gs:// one (for what reads or writes local files only: ArrayRecord's writer, safetensors);
`local_folder` gives such a writer a local folder for a gs:// one.
"""

import contextlib
import json
import os
import posixpath
import shutil
import sys
import tempfile
import uuid


def use_emulator(environ=None):
  """With STORAGE_EMULATOR_HOST set: TensorStore's and ArrayRecord's endpoints, TensorStore's
  token, gcsfs's probe off."""
  env = os.environ if environ is None else environ
  host = env.get("STORAGE_EMULATOR_HOST", "")
  if not host:
    return
  if not env.get("TENSORSTORE_GCS_HTTP_URL"):
    env["TENSORSTORE_GCS_HTTP_URL"] = host if "://" in host else f"http://{host}"
    env.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
  if not env.get("CLOUD_STORAGE_EMULATOR_ENDPOINT"):
    env["CLOUD_STORAGE_EMULATOR_ENDPOINT"] = host if "://" in host else f"http://{host}"
  env.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


use_emulator()


def is_remote(p) -> bool:
  """A URL (gs://...) rather than a local path."""
  return "://" in os.fspath(p)


def orbax_refusal(p) -> str:
  """Why Orbax cannot keep checkpoints under `p`, or "": its storage (TensorStore) reads a gs://
  path as a URL, so a '#' or '?' in it ends the name (the arrays went outside the workdir, and
  the save never finished)."""
  cut = [c for c in "#?" if c in os.fspath(p)] if is_remote(p) else []
  return (f"{p} holds {cut[0]!r}, which Orbax's storage (TensorStore) reads as the end of a "
          f"gs:// name: choose a path without '#' or '?'") if cut else ""


def abspath(p) -> str:
  """Local paths made absolute; URLs as they are."""
  p = os.fspath(p)
  return p if is_remote(p) else os.path.abspath(p)


def join(p, *parts) -> str:
  p = os.fspath(p)
  return posixpath.join(p, *parts) if is_remote(p) else os.path.join(p, *parts)


def dirname(p) -> str:
  p = os.fspath(p).rstrip("/")
  return posixpath.dirname(p) if is_remote(p) else os.path.dirname(p)


def bucket(p) -> str:
  """The bucket of a gs:// URL."""
  return os.fspath(p).split("://", 1)[1].split("/", 1)[0]


def path(p):
  """An `etils.epath.Path` for a local path or URL."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  if is_remote(p):
    use_emulator()
    _no_listing_cache()
  return epath.Path(os.fspath(p))


def _no_listing_cache():
  """gcsfs caches folder listings, which other writers (TensorStore, the other processes of a
  job, another run's lock) make stale: every listing and existence check asks the server."""
  import fsspec  # pylint: disable=g-import-not-at-top
  for protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


def exists(p) -> bool:
  return path(p).exists()


def isfile(p) -> bool:
  q = path(p)
  return q.exists() and not q.is_dir()


def not_a_file(p) -> str:
  """Why `p` cannot be read as a file: a folder is named as one (it said "does not exist")."""
  return "is a folder, not a file" if isdir(p) else "does not exist"


def isdir(p) -> bool:
  return path(p).is_dir()


def listdir(p) -> list[str]:
  """The names in a folder ([] when it does not exist)."""
  q = path(p)
  return sorted(c.name for c in q.iterdir()) if q.is_dir() else []


def read_text(p) -> str:
  return path(p).read_text()


def write_text(p, text: str):
  """Writes `text` atomically: readers see the old content or the new, never half of it (a local
  temporary file renamed over `p`, removed when the write fails; an object store's single
  write)."""
  write_texts({p: text})


def write_texts(texts: dict):
  """Writes each {path: text} as write_text does; locally every temporary file is written
  before any is renamed over its target, so a write that fails (a full disk) changes none of
  them and leaves no temporary file behind."""
  if any(is_remote(p) for p in texts):
    for p, text in texts.items():
      path(p).write_text(text)
    return
  tmps = {p: f"{p}.tmp-{os.getpid()}" for p in map(os.fspath, texts)}
  try:
    for (p, tmp), text in zip(tmps.items(), texts.values()):
      with open(tmp, "w") as f:
        f.write(text)
  except BaseException:
    for tmp in tmps.values():
      with contextlib.suppress(OSError):
        os.remove(tmp)
    raise
  for p, tmp in tmps.items():
    os.replace(tmp, p)


def remove(p, missing_ok: bool = True):
  try:
    path(p).unlink()
  except FileNotFoundError:
    if not missing_ok:
      raise


def rmtree(p):
  """Deletes a folder and everything under it (nothing when it does not exist)."""
  if not exists(p):
    return
  if is_remote(p):
    filesystem(p).rm(os.fspath(p), recursive=True)
  else:
    shutil.rmtree(os.fspath(p))


def makedirs(p):
  """Creates a local folder (and its parents); nothing on an object store."""
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)


def move(src, dst):
  """Moves a file or folder (on an object store: server-side copies, then deletes)."""
  src, dst = os.fspath(src), os.fspath(dst)
  if not is_remote(src):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.move(src, dst)
    return
  # epath's rename wants the destination's folder to exist; gcsfs's mv tries a moveTo API first
  # (which emulators lack): copy (server-side) and delete.
  fs = filesystem(src)
  fs.copy(src, dst, recursive=True)
  fs.rm(src, recursive=True)


def filesystem(url):
  """The fsspec file system of a URL (gcsfs for gs://), with the emulator's variables and no
  listing cache."""
  import fsspec  # pylint: disable=g-import-not-at-top
  path(url)  # the emulator's variables, no listing cache
  return fsspec.core.url_to_fs(url)[0]


def upload(local_dir, url, last=()):
  """Copies the files under a local folder to the folder `url` (gs://...), each file whole; the
  names in `last` (at any depth) go after all the others, in that order, so that a reader that
  waits for them finds everything else in place."""
  local_dir = os.fspath(local_dir)
  files = sorted(os.path.relpath(os.path.join(root, name), local_dir)
                 for root, _, names in os.walk(local_dir) for name in names)

  def order(rel):
    name = os.path.basename(rel)
    return last.index(name) if name in last else -1, rel
  fs = filesystem(url)
  for rel in sorted(files, key=order):
    fs.put_file(os.path.join(local_dir, rel),
                posixpath.join(os.fspath(url), rel.replace(os.sep, "/")))


@contextlib.contextmanager
def local_folder(out):
  """A local folder to write the files of the folder `out` in: `out` itself (made), or for a
  gs:// `out` a temporary one, uploaded to it when the block ends without an error (for what
  writes local files only: matplotlib, json.dump)."""
  if not is_remote(out):
    os.makedirs(out, exist_ok=True)
    yield os.fspath(out)
    return
  with tempfile.TemporaryDirectory(prefix="out-") as tmp:
    yield tmp
    upload(tmp, out)


def download(url, names, local_dir):
  """Copies the files `names` (relative to the folder `url`, gs://...) into the local folder
  `local_dir`; returns `local_dir`."""
  local_dir = os.fspath(local_dir)
  fs = filesystem(url)
  for name in names:
    target = os.path.join(local_dir, *name.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fs.get_file(posixpath.join(os.fspath(url), name), target)
  return local_dir


def missing_bucket(p) -> str:
  """For a gs:// `p` whose bucket does not exist: one line saying so; else "". Raises the
  storage's error when it cannot be asked (its server out of reach)."""
  if not is_remote(p) or path(f"gs://{bucket(p)}").exists():
    return ""
  return f"bucket gs://{bucket(p)} does not exist (or these credentials cannot see it)"


def why(e: BaseException, p=None) -> str:
  """One line saying why a storage operation failed: an OSError's reason, a gs:// bucket that
  does not exist, a storage server that cannot be reached (its own first line)."""
  if p is not None and is_remote(p) and isinstance(e, FileNotFoundError):
    try:
      missing = missing_bucket(p)
    except Exception:  # pylint: disable=broad-except
      missing = ""
    if missing:
      return missing
  text = getattr(e, "strerror", None) if isinstance(e, OSError) else None
  text = text or (str(e).strip().splitlines() or [type(e).__name__])[0]
  if "Cannot connect to host" in text or "Connect call failed" in text:
    return f"cannot reach the storage server ({text})"
  if str(e).startswith("Cannot connect to host"):  # aiohttp's, whose strerror is the DNS's
    return f"cannot reach the storage server ({str(e).splitlines()[0][:300]})"
  return text[:300]


@contextlib.contextmanager
def storage_errors(p, what: str, error=OSError):
  """For a gs:// `p`: a failure of the storage in the block (its server out of reach, a bucket
  these credentials cannot read) is raised as one line, error(f"{what}: {why(e, p)}"), not the
  client's traceback. An `error` raised in the block, and a local path's errors, pass as they
  are."""
  try:
    yield
  except error:
    raise
  except Exception as e:  # pylint: disable=broad-except  # (the storage client's own errors)
    if not is_remote(p):
      raise
    raise error(f"{what}: {why(e, p)}") from None


def read_generation(p):
  """(text, generation) of the gs:// object `p`, or None where there is none. The generation
  is read first: a write conditional on it (write_if_generation) fails if the text read is
  newer, never the other way round."""
  fs = filesystem(p)
  try:
    info = fs.info(p)
    if info.get("type") != "file":
      return None
    generation = int(info["generation"])
    return fs.cat_file(p).decode("utf-8", errors="replace"), generation
  except FileNotFoundError:
    return None


def _object(fs, p):
  """(the gs:// object's bucket, its name)."""
  return tuple(fs.split_path(p)[:2])


def write_if_generation(p, text: str, generation: int) -> int:
  """Writes the gs:// object `p` only while its generation is `generation` (0: only while there
  is none), a precondition the store checks (ifGenerationMatch): it refuses with
  FileExistsError when another writer came first. Returns the new generation. (A multipart
  upload, as gcsfs's own; the emulator checks the precondition on those.)"""
  fs = filesystem(p)
  name, key = _object(fs, p)
  meta = json.dumps({"name": key})
  body = (f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n--==0==\n"
          f"Content-Type: application/octet-stream\n\n{text}\n--==0==--").encode()
  upload = fs.base.replace("/storage/v1/", "/upload/storage/v1/")
  out = fs.call("POST", upload + "b/{}/o", name, uploadType="multipart", data=body,
                headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                json_out=True, ifGenerationMatch=str(int(generation)))
  return int(out["generation"])


def remove_if_generation(p, generation: int) -> bool:
  """Deletes the gs:// object `p` only while its generation is `generation`; whether it did."""
  fs = filesystem(p)
  try:
    fs.call("DELETE", "b/{}/o/{}", *_object(fs, p), ifGenerationMatch=str(int(generation)))
  except (FileNotFoundError, FileExistsError):
    return False
  return True


def check_writable(directory):
  """Creates (local) and writes, reads back and deletes a probe in `directory`; raises the
  storage's error (OSError, or a client's own) when it cannot."""
  directory = os.fspath(directory)
  makedirs(directory)
  probe = join(directory, f".write_test-{uuid.uuid4().hex[:12]}")
  q = path(probe)
  try:
    q.write_text("ok")
    read_back = q.read_text()
  except BaseException:  # (a full disk creates the file, then fails to write it)
    with contextlib.suppress(Exception):
      q.unlink(missing_ok=True)
    raise
  q.unlink()
  if read_back != "ok":
    raise OSError(f"{probe} did not read back what was written")


def main(argv) -> int:
  """`python -m transformer_jax.config.paths DIR [--need=NAME]`: DIR is writable (and holds
  NAME)."""
  args = [a for a in argv if not a.startswith("--need=")]
  need = [a[len("--need="):] for a in argv if a.startswith("--need=")]
  if len(args) != 1:
    print("usage: python -m transformer_jax.config.paths DIR [--need=NAME]", file=sys.stderr)
    return 2
  directory = args[0]
  try:
    check_writable(directory)
  except Exception as e:  # pylint: disable=broad-except
    print(f"error: workdir {directory} is not writable: {why(e, directory)}", file=sys.stderr)
    return 2
  for name in need:
    if not isfile(join(directory, name)):
      print(f"error: {join(directory, name)} not found (give CONFIG[:ARG] after --)",
            file=sys.stderr)
      return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
