"""What a compiled program runs, read from its optimized HLO (perf/hlo.py): every matmul with the
dtypes it multiplies in and where in the model it comes from, the custom calls by target (cuDNN
fused attention, with its sliding window if any; cuBLAS GEMMs; Pallas kernels), and the fusions
by kind (on GPUs a Triton GEMM fusion names its kind). `aot` prints it for a deviceless
compile, so a GPU or TPU program can be checked from a laptop: is the attention kernel there,
does any matmul run in fp32 where the config asked for bf16, how many kernels does a step
launch."""

import collections
import re

from transformer_jax.perf import hlo

_OPERANDS = re.compile(r"%([\w.\-]+)")
_KIND = re.compile(r"\bkind=(k\w+)")
_BACKEND_KIND = re.compile(r'"kind":"(\w+)"')
_WINDOW = re.compile(r'"sliding_window_length":\s*"?(\d+)')
GEMM_TARGETS = ("gemm", "matmul")  # cuBLAS (`__cublas$gemm`, `__cublas$lt$matmul...`)


def _dtype(type_text: str) -> str:
  found = hlo.arrays(type_text)
  return found[0][0] if found else "?"


def place(args: str) -> str:
  """The model-side name of an instruction: its op_name without the transforms around it,
  e.g. `layer_0/mlp` or `attention._kernel`."""
  m = hlo.OP_NAME.search(args)
  if not m:
    return "?"
  parts = [p for p in m.group(1).split("/") if p and not p.startswith(("jit(", "jvp(",
                                                                        "transpose("))]
  parts = [p for p in parts[:-1] if not re.fullmatch(r"[\w,]+->[\w,]+", p)] or parts
  return "/".join(re.sub(r"^layer_\d+$", "layer_N", p) for p in parts[-2:])


def census(text: str) -> dict:
  """{"matmuls": {"LHSxRHS->OUT": count}, "matmuls_by_place": {"LHSxRHS->OUT place": count},
  "custom_calls": {target: count}, "fusions": {kind: count}} of optimized HLO text. A cuDNN
  attention call with a sliding window counts as "TARGET window=W"."""
  comps, _ = hlo.computations(text)
  matmuls, places = collections.Counter(), collections.Counter()
  targets, fusions = collections.Counter(), collections.Counter()
  for lines in comps.values():
    types = {}
    for line in lines:
      ins = hlo.instruction(line)
      if ins is None:
        continue
      types[ins.name] = ins.result
      target = hlo.TARGET.search(ins.args) if ins.op == "custom-call" else None
      if target:
        window = _WINDOW.search(ins.args)  # cuDNN attention running its own sliding window
        window = f" window={window.group(1)}" if window and int(window.group(1)) else ""
        targets[target.group(1) + window] += 1
      if ins.op == "fusion":
        kind = _BACKEND_KIND.search(ins.args) or _KIND.search(ins.args)
        fusions[kind.group(1) if kind else "?"] += 1
      gemm = target and any(t in target.group(1).lower() for t in GEMM_TARGETS)
      if ins.op in ("dot", "convolution") or gemm:
        operands = _OPERANDS.findall(ins.args.split(")", 1)[0])[:2]
        lhs, rhs = (_dtype(types.get(o, "")) for o in operands) if len(operands) == 2 else (
            "?", "?")
        sig = f"{lhs}x{rhs}->{_dtype(ins.result)}"
        matmuls[sig] += 1
        places[f"{sig} {place(ins.args)}"] += 1
  return {"matmuls": dict(matmuls.most_common()), "matmuls_by_place": dict(places.most_common()),
          "custom_calls": dict(targets.most_common()), "fusions": dict(fusions.most_common())}


def wide_matmuls(report: dict, dtype: str) -> dict:
  """The matmuls of a census that multiply operands wider than the config's compute `dtype`
  (f32 operands where it is bfloat16), by place; {} when there are none or dtype is float32."""
  wide = collections.Counter()
  for key, n in report["matmuls_by_place"].items():
    sig, place = key.split(" ", 1)
    lhs, rest = sig.split("x", 1)
    if dtype == "bfloat16" and "f32" in (lhs, rest.split("->")[0]):
      wide[place] += n
  return dict(wide.most_common())
