"""A quantized workdir: WORKDIR/config.json (the source's), WORKDIR/quantization.json (mode, group
size, source step and workdir) and WORKDIR/quantized/ (an Orbax PyTree checkpoint of ptq.py's
stored tree). Readers dequantize on load: `restore_params` serves both kinds of workdir."""

import json
import os
import shutil

import orbax.checkpoint as ocp

from transformer_jax.quant import ptq
from transformer_jax.training import checkpoint

MANIFEST = "quantization.json"
ARRAYS = "quantized"
COPIED = ("config.json", "tokenizer.sha256")  # what a reader of the source workdir needs


def is_quantized(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, MANIFEST))


def save(out: str, source: str, stored: dict, manifest: dict):
  """Writes the quantized workdir `out` (its source workdir's config beside it)."""
  os.makedirs(out, exist_ok=True)
  ocp.PyTreeCheckpointer().save(os.path.join(os.path.abspath(out), ARRAYS), stored)
  for name in COPIED:
    if os.path.isfile(os.path.join(source, name)):
      shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
  with open(os.path.join(out, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)


def load(workdir: str) -> tuple[dict, dict]:
  """(manifest, stored tree) of a quantized workdir, as numpy arrays."""
  with open(os.path.join(workdir, MANIFEST)) as f:
    manifest = json.load(f)
  return manifest, ocp.PyTreeCheckpointer().restore(os.path.join(os.path.abspath(workdir), ARRAYS))


def disk_bytes(workdir: str) -> int:
  """Bytes of the files under WORKDIR/quantized (the arrays and Orbax's metadata)."""
  total = 0
  for root, _, files in os.walk(os.path.join(workdir, ARRAYS)):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def restore_params(workdir: str, ckpt_cfg, model, abstract):
  """(step, params) of a workdir's latest checkpoint, or of a quantized workdir (dequantized to
  `abstract`'s shapes and dtypes); (None, None) when it has neither."""
  if not is_quantized(workdir):
    return checkpoint.Checkpoints(workdir, ckpt_cfg, read_only=True).restore_params(abstract)
  manifest, stored = load(workdir)
  return manifest["step"], ptq.dequantize_tree(stored, abstract, ptq.axis_names(model))
