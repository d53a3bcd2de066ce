"""`train.microbatches=0`: the fewest microbatches whose train step fits the device's memory.

A recipe's batch is its published one (GPT-2 small: 512 rows of 1024 tokens); how many rows a
device can take at once depends on the device, its memory and the mesh. With 0, the run compiles
its train step at a microbatch count and reads the compiled program's memory (XLA's buffer
assignment: arguments + outputs - aliased + temporaries + code, perf/roofline.hbm). It compares
that with what the device's allocator may hand out (`memory_stats()["bytes_limit"]`; on a GPU,
XLA_PYTHON_CLIENT_MEM_FRACTION of it, the share `aot --topology=GPU` checks against), less
HEADROOM for what runs beside the step. It starts at 1 (the whole batch); while a count does not
fit, the next is the first that a fit of the figures so far predicts to fit, bytes(m) = F + A / m
(activations shrink with the count; the state, gradients and optimizer temporaries stay). Counts
are the divisors of the batch that leave each microbatch divisible by the batch shards. A
compiler that refuses a program for memory (XLA:TPU) gives the needed bytes in its message.

The chosen count's compiled step is the one training runs (jit keeps it), so a batch that fits
costs no extra compile (the search's seconds are the first metrics line's microbatch_search_s,
beside its compile_s); each count that did not fit cost a whole one (on a GPU, with its
autotuning; the persistent cache keeps them for the next start), and the line that says the
choice names the count to pin. A CPU has no such limit: 1, nothing compiled. The choice holds for
this run only: config.json keeps 0, so a resume on other devices chooses again (microbatches
change how the batch's gradient sum is formed: the same loss to rounding, though dropout's masks
and an MoE's balance statistics are drawn per microbatch).
"""

import math
import sys
import time
from typing import Any, NamedTuple

import jax

from transformer_jax.config import ConfigError
from transformer_jax.perf import roofline

# The share of the device's memory left free beside the step: the next batch on its way in, the
# evaluation's program between steps, the runtime's own buffers (a GPU's cuBLAS workspaces, whose
# autotuned choices a compile without the device does not see), the allocator's fragmentation.
HEADROOM = 0.05
MIB = 2**20  # processes exchange figures in MiB: int32s (JAX without x64 has no int64)


def device_memory(devices) -> int | None:
  """Bytes a program may take on one of `devices` (this process's; in a job of several, the
  smallest of every process's), or None on a platform without a limit (a CPU)."""
  if devices[0].platform == "cpu":  # (every process's: one platform per job)
    return None
  limit = int((devices[0].memory_stats() or {}).get("bytes_limit") or 0)
  if jax.process_count() > 1:
    limits = _gathered(limit // MIB)
    limit = int(limits.min()) * MIB if limits.all() else 0
  return limit or None


def _gathered(value: int):
  """Every process's `value` (an int32), as a numpy array in process order."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.int32(value)))


def room_for_step(capacity: int) -> int:
  """The bytes of `capacity` a step may take: all but HEADROOM."""
  return capacity - int(capacity * HEADROOM)


def counts(config, batch_shards: int) -> list[int]:
  """The microbatch counts the batch allows: divisors m of train.batch_size whose microbatch
  rows split evenly over the batch shards, ascending."""
  b = config.train.batch_size
  return [m for m in range(1, b + 1) if b % m == 0 and (b // m) % batch_shards == 0]


class Compiled(NamedTuple):
  program: Any  # the compiled train step; None when the compiler refused it for memory
  needed: float | None  # bytes per device (None: a refusal that gave no figure)
  available: float | None = None  # what the refusal says the device has
  refusal: str = ""  # the compiler's message


class NoFit(ConfigError):
  """The train step fits at no microbatch count; `count`: the largest, `result`: its compile."""

  def __init__(self, count: int, result: Compiled, message: str):
    super().__init__(message)
    self.count, self.result = count, result


def compile_step(trainer) -> Compiled:
  """The train step compiled (trainer.lower_train_step), or the compiler's refusal for memory
  (XLA:TPU refuses a program past the HBM, with figures in its message)."""
  return _compile(trainer.lower_train_step(), trainer.abstract_state)


def compile_eval(trainer) -> Compiled:
  """compile_step's for the evaluation step (the parameters and one validation batch)."""
  return _compile(trainer.lower_eval_step(), trainer.abstract_state.params)


def resolve(trainer, say=None, compile_fn=None) -> int:
  """The count `trainer` runs: with train.microbatches=0, chosen once (choose) against the
  memory of this process's devices (`say`: stderr by default)."""
  if trainer.config.train.microbatches or trainer.microbatches_chosen:
    return trainer.microbatches
  say = say or (lambda msg: print(msg, file=sys.stderr))
  return choose(trainer, device_memory(trainer.mesh.local_devices), say, compile_fn)


def for_evaluation(trainer, say=None) -> int:
  """resolve for a trainer that evaluates without training (`evaluate`, `quantize`): the
  fewest microbatches whose evaluation step fits (compile_eval)."""
  return resolve(trainer, say, compile_eval)


def _compile(lowered, abstract) -> Compiled:
  """`lowered` compiled; `abstract`: its arguments' abstract values (a refusal counts them)."""
  try:
    program = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
      raise
    needed, available = roofline.parse_oom(message, roofline.argument_bytes_per_chip(
        jax.tree.leaves(abstract)))
    return Compiled(None, needed, available, message)
  return Compiled(program, roofline.hbm(program.memory_analysis(), 0)["hbm_per_chip_bytes"])


def choose(trainer, capacity: int | None, say=print, compile_fn=None) -> int:
  """Leaves `trainer` running the fewest microbatches whose train step fits `capacity` bytes
  per device (None: 1, nothing compiled) and returns that count. A batch that fits at no count
  is a NoFit (a ConfigError) naming the least it needed. `compile_fn`: compile_step's kind."""
  trainer.microbatches_chosen = True
  compile_fn = compile_fn or compile_step
  if not capacity:
    trainer.use_microbatches(1)
    say("train.microbatches=0: 1 (no device memory limit here to fit)")
    return 1
  start = time.perf_counter()
  sizes = trainer.mesh.shape
  shards = math.prod(sizes.get(axis, 1) for axis in ("data", "fsdp", "expert"))
  allowed, tried = counts(trainer.config, shards), {}
  m = allowed[0]
  while True:
    trainer.use_microbatches(m)
    result = compile_fn(trainer)
    needed, available = _agreed(result.needed), result.available
    capacity = int(available or capacity)
    budget = room_for_step(capacity)
    if result.program is not None and needed is not None and needed <= budget:
      break
    tried[m] = needed
    m = _next(allowed, tried, budget)
    if m is None:
      worst = max(tried)  # (the count the trainer is left at, and `result` is of)
      need = _gib(tried[worst]) if tried[worst] else (
          f"more (the compiler: {result.refusal.strip().splitlines()[0][:200]})"
          if result.refusal.strip() else "more")
      raise NoFit(worst, result, (
          f"train.microbatches=0: the train step fits {_gib(budget)} (of the device's "
          f"{_gib(capacity)}) at no microbatch count: {worst} microbatches of "
          f"{trainer.config.train.batch_size // worst} rows need {need}; shard the model over "
          f"more devices (mesh.fsdp, mesh.tensor), model.remat=full or train.loss_chunk, or a "
          f"shorter data.seq_len"))
  trainer.microbatch_search_s = time.perf_counter() - start
  rows = trainer.config.train.batch_size // m
  say(f"train.microbatches=0: {m} microbatch{'es' if m > 1 else ''} of {rows} rows (the step "
      f"needs {_gib(needed)} of the {_gib(budget)} it may take of the device's "
      f"{_gib(capacity)}"
      + "".join(f"; {k}: {_gib(v) if v else 'more'}" for k, v in sorted(tried.items())) + ")"
      + (f"; train.microbatches={m} skips the search" if tried else ""))
  return m


def _agreed(needed: float | None) -> float | None:
  """In a job of several processes, the largest process's figure (None if any has none), so
  that every process takes the same count."""
  if jax.process_count() == 1:
    return needed
  figures = _gathered(-1 if needed is None else -(-int(needed) // MIB))  # (MiB, rounded up)
  return None if (figures < 0).any() else int(figures.max()) * MIB


def _next(allowed: list[int], tried: dict, budget: int) -> int | None:
  """The next count to compile: the first allowed above every failed one that the fit bytes(m)
  = F + A / m through the last two known figures predicts to fit; else the first above them
  (figures missing: twice the last). With one figure F = 0, which understates every larger
  count's bytes (by F (1 - m1 / m)): the count it names is never past the fewest that fit."""
  above = [m for m in allowed if m > max(tried)]
  if not above:
    return None
  known = [(m, b) for m, b in sorted(tried.items()) if b]
  if not known:
    return next((m for m in above if m >= 2 * max(tried)), above[-1])
  if len(known) == 1:
    (m1, b1), = known
    fixed, per = 0.0, b1 * m1
  else:
    (m1, b1), (m2, b2) = known[-2:]
    per = (b1 - b2) / (1 / m1 - 1 / m2)
    fixed = b1 - per / m1
  if per <= 0 or fixed >= budget:
    return above[-1]
  want = math.ceil(per / (budget - fixed))
  return next((m for m in above if m >= want), above[-1])


def _gib(b) -> str:
  return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
