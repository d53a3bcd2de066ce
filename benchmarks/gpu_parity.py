"""Attention kernels against the fp32 reference on this machine's accelerator (step 04 of
benchmarks/gpu_h200.sh): packed bf16 rows, causal, with and without a sliding window (cuDNN runs
the window itself, models/attention.py), values and gradients; one JSON line per case with the
largest error relative to the largest reference value. `python benchmarks/gpu_parity.py IMPL`
(cudnn on a GPU; dot_product anywhere, the script's own check)."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.models import attention


def case(impl: str, t: int, window: int, cuts: int = 3, seed: int = 0):
  rng = np.random.default_rng(seed)
  b, n, g, k = 2, 4, 2, 64
  def normal(*shape):
    return jnp.asarray(rng.normal(size=shape), jnp.float32)

  q, kk, v = normal(b, t, n, g, k) * k ** -0.5, normal(b, t, n, k), normal(b, t, n, k)
  ends = np.sort(rng.choice(np.arange(1, t), cuts, replace=False))
  seg = jnp.asarray(np.stack([np.searchsorted(ends, np.arange(t), side="right") + 1] * b))
  mask = attention.mask(seg, seg, True)
  w = normal(b, t, n, g, k)

  def run(fn, dtype):
    def outputs(q, kk, v, mask, w):
      out, vjp = jax.vjp(lambda *a: fn(*(x.astype(dtype) for x in a), mask).astype(jnp.float32),
                         q, kk, v)
      return [out, *vjp(w)]
    return jax.jit(outputs)(q, kk, v, mask, w)

  want = run(lambda *a: attention.reference(
      *a[:3], a[3] & attention.window_mask(t, t, window)[None]), jnp.float32)
  got = run(lambda *a: attention.attend(impl, *a, causal=True, window=window), jnp.bfloat16)
  errors = [float(jnp.abs(x - y).max() / jnp.abs(y).max()) for x, y in zip(got, want)]
  windowed = mask & attention.window_mask(t, t, window)[None] if window else mask
  return {"impl": impl, "t": t, "window": window, "segments": cuts + 1,
          # the share of the (query, key) pairs that the window removes: > 0, or it tests nothing
          "window_removes": round(1 - float(windowed.sum() / mask.sum()), 4),
          "max_rel_error": dict(zip(("out", "dq", "dk", "dv"), errors)),
          "ok": max(errors) < 2e-2}


if __name__ == "__main__":
  print(jax.devices())
  for t, window, cuts in ((256, 0, 3), (256, 64, 3), (1024, 128, 3), (1024, 384, 1)):
    print(json.dumps(case(sys.argv[1] if len(sys.argv) > 1 else "cudnn", t, window, cuts)),
          flush=True)
