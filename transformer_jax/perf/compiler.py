"""XLA compiler options the training and evaluation steps are compiled with, per platform: each
measured by a benchmark (benchmarks/RESULTS.md, "XLA:CPU oneDNN dots").

  cpu (x86-64)  `train.cpu_onednn=True` (off by default): every dot of the step runs as its own
                oneDNN matmul (xla_cpu_use_onednn with oneDNN library fusions of type
                INDIVIDUAL_DOT) instead of XLA's YNNPACK or Eigen dots: attention's small batched
                dots about twice as fast alone, a gpt2.py:bench_cpu step 1.09x faster. The
                cost: XLA cannot serialize a oneDNN fusion ("ToProto is not implemented"), so the
                step is left out of the persistent compilation cache (perf/caches.py) and
                compiled at every start; worth it for a long CPU run, not for a smoke run. The
                wider type DOT, which also fuses a sum of dots into one oneDNN graph, kills the
                process with SIGILL ("partition compile failed") on the backward of separate q,
                k and v projections: not used.

The options go to jax.jit(compiler_options=...), so they reach those steps only (and the
benchmark's peak and matmul timings, so that MFU and the matmul floor use the same matmuls). An
option that XLA_FLAGS names already is the user's: then none of the group is set.
"""

import os
import platform as host
import warnings

ONEDNN = {"xla_cpu_use_onednn": True,
          "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
X86 = ("x86_64", "amd64")


def options(config, platform: str, environ=None) -> dict | None:
  """The compiler options for a step of `config` compiled for `platform` (None: XLA's
  defaults)."""
  if platform != "cpu" or not config.train.cpu_onednn or host.machine().lower() not in X86:
    return None
  flags = (os.environ if environ is None else environ).get("XLA_FLAGS", "")
  if any(f"--{key}" in flags for key in ONEDNN):
    return None
  # JAX warns at every compile that it could not store the step; the docstring says why.
  warnings.filterwarnings("ignore", message=r"Error writing persistent compilation cache entry"
                          r".*onednn")
  return dict(ONEDNN)
