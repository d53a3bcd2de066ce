"""A quantized workdir: WORKDIR/config.json (the source's), WORKDIR/quantization.json (mode, group
size, source step and workdir, the arrays' fingerprint: training/integrity.py) and
WORKDIR/quantized/ (an Orbax PyTree checkpoint of ptq.py's stored tree). Readers dequantize on
load: `restore_params` serves both kinds of workdir."""

import json
import os

import orbax.checkpoint as ocp

from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from transformer_jax.training import checkpoint
from transformer_jax.training import integrity

MANIFEST = "quantization.json"
ARRAYS = "quantized"
COPIED = ("config.json", "tokenizer.sha256")  # what a reader of the source workdir needs


def is_quantized(workdir: str) -> bool:
  return paths.isfile(paths.join(workdir, MANIFEST))


def save(out: str, source: str, stored: dict, manifest: dict):
  """Writes the quantized workdir `out` (its source workdir's config beside it; either may be
  gs://...): the manifest last, so a workdir that has one is complete."""
  paths.makedirs(out)
  ocp.PyTreeCheckpointer().save(paths.join(paths.abspath(out), ARRAYS), stored)
  manifest = {**manifest, integrity.KEY: integrity.fingerprint(stored)}
  for name in COPIED:
    if paths.isfile(paths.join(source, name)):
      paths.write_text(paths.join(out, name), paths.read_text(paths.join(source, name)))
  paths.write_text(paths.join(out, MANIFEST), json.dumps(manifest, indent=1))


def load(workdir: str) -> tuple[dict, dict]:
  """(manifest, stored tree) of a quantized workdir, as numpy arrays; a damaged one is one
  ConfigError line (it was orbax's traceback)."""
  try:
    manifest = json.loads(paths.read_text(paths.join(workdir, MANIFEST)))
  except ValueError as e:  # (a copy cut short: JSONDecodeError or bad UTF-8)
    raise ConfigError(f"{paths.join(workdir, MANIFEST)} is unreadable "
                      f"({checkpoint.first_line(e)}): quantize the source workdir again") from None
  arrays = paths.join(paths.abspath(workdir), ARRAYS)
  checkpoint.drop_closed_loop_reports()
  try:
    stored = ocp.PyTreeCheckpointer().restore(arrays)
    if name := integrity.mismatch(manifest.get(integrity.KEY), stored):
      raise ValueError(f"its array {name} is not the one saved: its checksum differs")
    return manifest, stored
  except Exception as e:  # pylint: disable=broad-except
    if checkpoint.out_of_memory(e):  # nothing wrong with them: this host cannot hold them
      raise
    raise ConfigError(f"the quantized weights in {arrays} are unreadable "
                      f"({checkpoint.first_line(e)}): quantize the source workdir "
                      f"{manifest.get('source', '')} again") from None


def disk_bytes(workdir: str) -> int:
  """Bytes of the files under WORKDIR/quantized (the arrays and Orbax's metadata)."""
  arrays = paths.join(workdir, ARRAYS)
  if paths.is_remote(arrays):
    import fsspec  # pylint: disable=g-import-not-at-top
    fs, _ = fsspec.core.url_to_fs(arrays)
    return int(fs.du(arrays))
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(arrays)
             for f in files)


def restore_params(workdir: str, ckpt_cfg, model, abstract):
  """(step, params) of a workdir's latest checkpoint, or of a quantized workdir (dequantized to
  `abstract`'s shapes and dtypes); (None, None) when it has neither."""
  if not is_quantized(workdir):
    return checkpoint.Checkpoints(workdir, ckpt_cfg, read_only=True).restore_params(abstract)
  # Here, not at the top: ptq imports qwix (~0.7 s), which a training run's start never needs.
  from transformer_jax.quant import ptq  # pylint: disable=g-import-not-at-top
  manifest, stored = load(workdir)
  return manifest["step"], ptq.dequantize_tree(stored, abstract, ptq.axis_names(model))
