"""The matmuls of a compiled program, each timed on its own: a floor for the program's step time.

`dots(hlo_text)` reads every `dot` instruction of an optimized HLO module (`compiled.as_text()`),
fusions included, with its operands' shapes, physical layouts and dimension numbers, and groups
identical ones. `time_dots` runs each group's dot alone, as a jitted `lax.dot_general` on random
operands laid out as in the program, and returns its median time. The sum over groups of count ×
time is what the program's matmuls cost at the speed this machine's matmul kernels reach on those
shapes; the rest of a step (element-wise passes, copies, reductions, the optimizer) comes on top.

What it cannot see: a dot inside a while loop (e.g. `model.scan_layers`) runs once per trip but
appears once in the text, so programs with loops are refused; and a dot's output layout is the
one XLA picks for the dot alone.
"""

import dataclasses
import re
import statistics
import time

import jax
import numpy as np

from transformer_jax.perf import hlo

_DTYPES = {"f32": np.float32, "bf16": jax.numpy.bfloat16, "f16": np.float16, "f64": np.float64}


@dataclasses.dataclass(frozen=True)
class Dot:
  """One dot's operands in physical (row-major) order and its dimension numbers over them."""
  lhs: tuple
  rhs: tuple
  dtype: str
  lhs_contract: tuple
  rhs_contract: tuple
  lhs_batch: tuple
  rhs_batch: tuple

  @property
  def flops(self) -> int:
    free = lambda shape, used: int(np.prod([d for i, d in enumerate(shape) if i not in used]))
    contract = int(np.prod([self.lhs[i] for i in self.lhs_contract]))
    batch = int(np.prod([self.lhs[i] for i in self.lhs_batch]))
    return 2 * batch * contract * free(self.lhs, self.lhs_contract + self.lhs_batch) * free(
        self.rhs, self.rhs_contract + self.rhs_batch)

  def describe(self) -> str:
    return (f"{self.dtype}{list(self.lhs)} x {list(self.rhs)} contract {list(self.lhs_contract)}"
            f"/{list(self.rhs_contract)} batch {list(self.lhs_batch)}/{list(self.rhs_batch)}")


def _dims(attrs: str, key: str) -> tuple:
  m = re.search(key + r"=\{([\d,]*)\}", attrs)
  return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


def dots(hlo_text: str) -> dict:
  """{Dot: count} for every dot instruction of an optimized HLO module's text."""
  if re.search(r"\bwhile\(", hlo_text):
    raise ValueError("the program has a while loop (e.g. model.scan_layers=True), whose dots run "
                     "once per trip: unroll it to count its matmuls")
  shapes = {}  # instruction name -> (dtype, logical dims, minor-to-major layout)
  found = []
  for line in hlo_text.splitlines():
    i = hlo.instruction(line)
    if not i or i.result.startswith("("):  # tuples hold no dot operand
      continue
    (dtype, dims, layout), = hlo.arrays(i.result) or [(None, (), ())]
    shapes[i.name] = (dtype, dims, layout or tuple(reversed(range(len(dims)))))
    if i.op == "dot":
      operands = re.match(r"\s*%?([\w.\-]+), %?([\w.\-]+)\)", i.args)
      found.append((operands.group(1), operands.group(2), i.args))
  counts = {}
  for lhs_name, rhs_name, attrs in found:
    (dtype, lhs, lhs_layout), (_, rhs, rhs_layout) = shapes[lhs_name], shapes[rhs_name]
    lhs_pos, rhs_pos = _physical(lhs_layout), _physical(rhs_layout)
    dot = Dot(lhs=tuple(lhs[i] for i in reversed(lhs_layout)),
              rhs=tuple(rhs[i] for i in reversed(rhs_layout)), dtype=dtype,
              lhs_contract=tuple(lhs_pos[i] for i in _dims(attrs, "lhs_contracting_dims")),
              rhs_contract=tuple(rhs_pos[i] for i in _dims(attrs, "rhs_contracting_dims")),
              lhs_batch=tuple(lhs_pos[i] for i in _dims(attrs, "lhs_batch_dims")),
              rhs_batch=tuple(rhs_pos[i] for i in _dims(attrs, "rhs_batch_dims")))
    counts[dot] = counts.get(dot, 0) + 1
  return counts


def _physical(layout) -> dict:
  """Logical dimension -> its position in row-major (major-to-minor) physical order."""
  return {d: i for i, d in enumerate(reversed(layout))}


def time_dots(counts: dict, reps: int = 10, options=None) -> list:
  """[(Dot, count, median seconds of one run)], each dot jitted (with the step's compiler
  `options`, perf/compiler.py) and timed alone."""
  rng = np.random.default_rng(0)
  out = []
  for dot, count in counts.items():
    dtype = _DTYPES[dot.dtype]
    a = jax.device_put(rng.standard_normal(dot.lhs, np.float32).astype(dtype))
    b = jax.device_put(rng.standard_normal(dot.rhs, np.float32).astype(dtype))
    dims = ((dot.lhs_contract, dot.rhs_contract), (dot.lhs_batch, dot.rhs_batch))
    f = jax.jit(lambda x, y, dims=dims: jax.lax.dot_general(x, y, dims), compiler_options=options)
    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(f(a, b))
      times.append(time.perf_counter() - t)
    out.append((dot, count, statistics.median(times)))
  return out
