"""Model FLOPs, MFU, and the metric writers (metrics.jsonl + TensorBoard).

MFU = model FLOPs per second / peak FLOPs per second of the devices used. Model FLOPs per token are
PaLM's (appendix B) 6*N + 12*L*H*K*T, where N counts the parameters that take part in matmuls
(the token table counts only when tied, as the output projection; lookups and the learned position
table do not) and T is the sequence length. The causal attention term is NOT halved (as in PaLM and
nanoGPT; MaxText and Megatron halve it, which gives lower figures). Rematerialization is not
counted: MFU measures useful model work, not hardware work.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak TFLOP/s per chip, keyed by a substring of jax's device_kind (lower case).
PEAK_TFLOPS = (
    ("v6 lite", 918.0), ("v6e", 918.0), ("v5p", 459.0), ("v5 lite", 197.0), ("v5e", 197.0),
    ("tpu v5", 459.0),  # v5p chips report device_kind "TPU v5"
    ("v4", 275.0), ("h200", 989.0), ("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h100", 989.0),
    ("a100", 312.0),
)  # the first key found in device_kind wins: H100 PCIe and NVL before the SXM part


def matmul_params(params, tie_embeddings: bool) -> int:
  """Parameters that take part in matmuls (see the module docstring)."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [getattr(k, "key", "") for k in path]
    if names[-2:] == ["embed", "positions"]:
      continue
    if names[-2:] == ["embed", "tokens"] and not tie_embeddings:
      continue
    total += int(np.prod(leaf.shape))
  return total


def flops_per_token(model_cfg, n_matmul_params: int, seq_len: int) -> float:
  c = model_cfg
  return 6.0 * n_matmul_params + 12.0 * c.num_layers * c.num_heads * c.head_dim * seq_len


def measure_cpu_peak(dtype=jnp.float32, n: int = 1536, reps: int = 10) -> float:
  """FLOP/s of one square matmul through XLA on this host's CPU (best of `reps`)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


def peak_flops_per_device(dtype=jnp.float32) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from)."""
  dev = jax.devices()[0]
  kind = dev.device_kind.lower()
  for key, tflops in PEAK_TFLOPS:
    if key in kind:
      return tflops * 1e12, f"table:{dev.device_kind}"
  if dev.platform == "cpu":
    # Forced host devices (--xla_force_host_platform_device_count) share the same cores.
    return measure_cpu_peak(dtype) / jax.local_device_count(), "measured:cpu_matmul"
  return float("nan"), f"unknown:{dev.device_kind}"


class Writer:
  """metrics.jsonl (one JSON object per line) + TensorBoard events; only process 0 writes.

  A run resumed from step `resume_step` first drops the lines (and TensorBoard events) of later
  steps, which an earlier run logged after its last checkpoint and this one replays: the file
  stays one clean history. A metrics.jsonl deleted during the run is created again."""

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    self._jsonl = self._tb = None
    self.path = os.path.join(workdir, "metrics.jsonl")
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      _drop_after(self.path, resume_step)
      self._jsonl = open(self.path, "a")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

  def write(self, step: int, values: dict):
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: (float(v) if isinstance(v, (int, float, np.number, jax.Array)) else v)
                for k, v in values.items()})
    try:
      if not os.path.exists(self.path):  # deleted under us: lines to the unlinked file are lost
        self._jsonl.close()
        self._jsonl = open(self.path, "a")
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    except OSError as e:
      from transformer_jax.training.checkpoint import WriteError  # pylint: disable=g-import-not-at-top
      raise WriteError(f"writing {self.path} failed: {e.strerror or e}; free space or fix "
                       "the workdir, then re-run the same command to resume from its latest "
                       "checkpoint") from None
    for k, v in row.items():
      if k != "step" and isinstance(v, float):
        self._tb.add_scalar(k, v, int(step))

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def last_logged(workdir: str) -> dict:
  """Each metric's last logged value in WORKDIR/metrics.jsonl (events left out)."""
  out = {}
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:  # a torn last line
          continue
        if "event" not in row:
          out.update(row)
  except OSError:
    pass
  out.pop("step", None)
  return out


def _drop_after(path: str, step: int):
  """Rewrites metrics.jsonl (atomically) without its lines of steps after `step`. A run that
  starts at step 0 (a new run in a workdir whose checkpoints were set aside or lost) keeps the
  old lines in metrics-<time>.jsonl instead."""
  if not os.path.isfile(path):
    return
  if step == 0:
    os.replace(path, path[:-len(".jsonl")] + time.strftime("-%Y%m%d-%H%M%S.jsonl"))
    return
  with open(path) as f:
    lines = f.readlines()
  keep = [line for line in lines if _step(line) <= step]
  if len(keep) == len(lines):
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def _step(line: str) -> float:
  try:
    return json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    return float("inf")  # a torn last line of a killed run: dropped
