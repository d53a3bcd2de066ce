"""Where a train step's device time goes, read from a JAX profiler trace (`benchmark --profile`).

The steps run under `jax.profiler`, each inside a `tjax_step` annotation. Every op the trace shows
on the first device is put in a class by the compiled program's own HLO (the op's instruction:
its opcode, what its fusion or async wrapper computes, its custom-call target and the model scope
in its metadata):

  matmul      dots and convolutions, and the fusions and library calls built round one (cuBLAS,
              Triton GEMM, cuDNN GEMM fusions, XNNPACK)
  attention   the attention kernel: a fused one (cuDNN, Pallas), or the reference's scores,
              softmax and context; everything under the model's `attention._kernel`, backward too
  collective  all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, send/recv
  copy        copies and transposes, and memcpys between or within devices
  optimizer   the optimizer's update (the `optimizer` scope of training/step.py)
  fusion      everything else: elementwise and reduction fusions (norms, activations, the loss,
              gradient norms)
  idle        time in a step's span (its first op's start to its last op's end) in which no op
              of it ran: launch gaps, host syncs, loop control

Per class: milliseconds per step, summed over the ops (ops that overlap, on a GPU's streams or a
CPU's threads, are each counted, so the classes can add up to more than the busy time), and the
top ops by time. The device side is read as each backend writes it: on a GPU the kernels of the
`Stream` lines of `/device:GPU:N` (an op's name in their `hlo_op` stat, or in an
`#hlo_op=...#` annotation); on a TPU the `XLA Ops` line; on a CPU the XLA thunks of `/host:CPU`'s
threads, those of device 0.
"""

import collections
import dataclasses
import glob
import os
import re

from transformer_jax.perf import hlo, kernels

STEP = "tjax_step"  # the host-side annotation round each profiled step
CLASSES = ("matmul", "attention", "collective", "copy", "optimizer", "fusion")
OPTIMIZER_SCOPE = "optimizer"  # the jax.named_scope of the update in training/step.py
ATTENTION_SCOPE = "attention._kernel"  # the flax method every attention call goes through
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                "collective-broadcast", "send", "recv", "ragged-all-to-all")
_CONTROL = ("while", "conditional", "call")  # containers: their ops are counted, not they
_FREE = ("parameter", "constant", "tuple", "get-tuple-element", "bitcast")  # no kernel
_COPIES = ("copy", "copy-start", "copy-done", "transpose")
_MOVES = ("reshape", "broadcast", "slice", "concatenate", "dynamic-slice", "dynamic-update-slice",
          "pad", "reverse", "fusion", "async-start", "async-done", "async-update")
_ATTENTION_TARGETS = ("fmha", "flash", "splash", "attention")
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
_MODULE = re.compile(r"^HloModule ([\w.\-]+)", re.M)
_ANNOTATED = re.compile(r"hlo_op=([^#,]+)")
_IN_MODULE = re.compile(r"hlo_module=([^#,]+)")


def _base(op: str) -> str:
  return op.removesuffix("-start").removesuffix("-done").removesuffix("-update")


def op_classes(text: str) -> dict:
  """{instruction name: (class, its place in the model, e.g. `layer_N/mlp`)} for every
  instruction of optimized HLO `text` (control-flow containers are left out)."""
  comps, _ = hlo.computations(text)
  parsed = {name: [i for i in map(hlo.instruction, lines) if i] for name, lines in comps.items()}
  memo = {}

  def inner(comp: str) -> set:
    """The classes that a fusion's or async op's computation holds, nested ones included."""
    if comp not in memo:
      memo[comp] = set()
      memo[comp] = {c for ins in parsed.get(comp, ()) for c in own(ins)}
    return memo[comp]

  def own(ins) -> set:
    found = set()
    target = hlo.TARGET.search(ins.args) if ins.op == "custom-call" else None
    target = target.group(1).lower() if target else ""
    if _base(ins.op) in _COLLECTIVES or "nccl" in target:
      found.add("collective")
    if any(t in target for t in _ATTENTION_TARGETS):
      found.add("attention")
    if ins.op in ("dot", "convolution") or any(t in target for t in kernels.GEMM_TARGETS):
      found.add("matmul")
    if ins.op in _COPIES:
      found.add("copy")
    elif ins.op not in _MOVES and ins.op not in _FREE:
      found.add("compute")
    for callee in _CALLS.findall(ins.args) if ins.op not in _CONTROL else ():
      found |= inner(callee)
    return found

  def place(ins) -> str:
    """Where in the model: the instruction's op_name, else the first one in its fusion."""
    named = [ins] + [i for c in _CALLS.findall(ins.args) for i in parsed.get(c, ())]
    return next((kernels.place(i.args) for i in named if hlo.OP_NAME.search(i.args)), "?")

  out = {}
  for instructions in parsed.values():
    for ins in instructions:
      if ins.op in _CONTROL or ins.op in _FREE:
        continue
      found = own(ins)
      scope = hlo.OP_NAME.search(ins.args)
      scope = scope.group(1) if scope else ""
      if "collective" in found:
        cls = "collective"
      elif "attention" in found or ATTENTION_SCOPE in scope:
        cls = "attention"
      elif f"/{OPTIMIZER_SCOPE}/" in scope:
        cls = "optimizer"
      elif "matmul" in found:
        cls = "matmul"
      elif "copy" in found and "compute" not in found:  # moves data, computes nothing
        cls = "copy"
      else:
        cls = "fusion"
      out[ins.name] = (cls, place(ins))
  return out


def module_name(text: str) -> str | None:
  m = _MODULE.search(text)
  return m.group(1) if m else None


@dataclasses.dataclass(frozen=True)
class Op:
  name: str  # the HLO instruction (or, without one, the event's own name)
  start_ns: float
  end_ns: float


def _device_ops(planes, module: str | None) -> tuple[str, list]:
  """(where, the ops of the first device in time order) of a trace's planes."""
  devices = sorted((p for p in planes if re.match(r"/device:(GPU|TPU):\d+$", p.name)),
                   key=lambda p: int(p.name.rsplit(":", 1)[1]))
  if devices:
    plane = devices[0]
    lines = [ln for ln in plane.lines if ln.name.startswith("Stream")] or [
        ln for ln in plane.lines if ln.name == "XLA Ops"]
    where = plane.name
  else:  # CPU: XLA's thunks on the host's threads, tagged with their device
    plane = next((p for p in planes if p.name == "/host:CPU"), None)
    lines, where = (plane.lines if plane else []), "/host:CPU device 0"
  ops, seen = [], set()
  for line in lines:
    for e in line.events:
      stats = dict(e.stats)
      name, program = stats.get("hlo_op"), stats.get("hlo_module")
      if name is None:  # a GPU kernel's annotation: `NAME:#hlo_op=OP,hlo_module=MODULE#`
        note = next((v for v in stats.values() if isinstance(v, str) and "hlo_op=" in v), "")
        name = _ANNOTATED.search(note).group(1) if note else (e.name if devices else None)
        program = _IN_MODULE.search(note).group(1) if _IN_MODULE.search(note) else None
      if name is None or stats.get("device_ordinal", 0) not in (0, "0"):
        continue
      if module and program not in (None, module):
        continue
      key = (e.start_ns, e.duration_ns, name)
      if key not in seen:  # the same kernel on two lines
        seen.add(key)
        ops.append(Op(str(name), float(e.start_ns), float(e.start_ns + e.duration_ns)))
  return where, sorted(ops, key=lambda o: o.start_ns)


def _busy(ops) -> float:
  """ns covered by at least one of `ops` (sorted by start)."""
  total, end = 0.0, float("-inf")
  for o in ops:
    if o.end_ns > end:
      total += o.end_ns - max(o.start_ns, end)
      end = o.end_ns
  return total


def _class_of(name: str, classes: dict) -> tuple | None:
  """(class, place) of a device op: its instruction's, or, for an op no instruction names (a
  memcpy, a library's kernel), by its name."""
  if name in classes:
    return classes[name]
  low = name.lower()
  for cls, words in (("copy", ("memcpy", "memset")), ("collective", ("nccl",)),
                     ("matmul", ("gemm", "cublas", "cutlass", "xmma", "nvjet")),
                     ("attention", ("fmha", "sdpa", "flash"))):
    if any(w in low for w in words):
      return cls, "?"
  return None  # a control-flow container, or an op of another program: not counted


def _own_span(ops, classes: dict) -> list:
  """A step's ops from the first to the last of its program's own (an HLO instruction's), so
  that a name-only event outside them (the batch's host-to-device copy) opens no idle time."""
  own = [i for i, o in enumerate(ops) if o.name in classes]
  if not own:
    return []
  last_end = max(ops[i].end_ns for i in own)
  return [o for o in ops[own[0]:] if o.start_ns <= last_end and _class_of(o.name, classes)]


def summarize(trace_dir: str, hlo_text: str, top: int = 12) -> dict:
  """breakdown() of the newest profile (.xplane.pb) under `trace_dir`."""
  from jax import profiler  # pylint: disable=g-import-not-at-top
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise ValueError(f"no .xplane.pb under {trace_dir}")
  return breakdown(profiler.ProfileData.from_file(max(files, key=os.path.getmtime)).planes,
                   hlo_text, top)


def breakdown(planes, hlo_text: str, top: int = 12) -> dict:
  """Per step, of the program `hlo_text` (its compiled HLO) in a trace's `planes`:
  {"where", "steps", "window_ms" (first op's start to last op's end), "busy_ms" (some op
  running), "classes_ms": {class: ms}, "idle_ms", "top": [[op, class, place, ms, runs], ...],
  "places": [[place, class, ms], ...]} (the ops summed by where in the model they come from;
  every place, largest first: `top` limits the ops only)."""
  planes = list(planes)
  classes = op_classes(hlo_text)
  where, ops = _device_ops(planes, module_name(hlo_text))
  spans = sorted((e.start_ns, e.start_ns + e.duration_ns) for p in planes
                 if p.name.startswith("/host:") for ln in p.lines for e in ln.events
                 if e.name == STEP)
  if not spans:
    raise ValueError(f"the trace has no {STEP!r} annotation: run each step inside "
                     f"jax.profiler.StepTraceAnnotation({STEP!r}, step_num=i)")
  per_step = [_own_span([o for o in ops if s <= o.start_ns <= e], classes) for s, e in spans]
  per_step = [s for s in per_step if s]
  if not per_step:
    raise ValueError(f"the trace has no op of {module_name(hlo_text)} on {where}")
  n = len(per_step)
  window = sum(max(o.end_ns for o in s) - s[0].start_ns for s in per_step)  # s: by start
  busy = sum(_busy(s) for s in per_step)
  by_class, by_op, runs = collections.Counter(), collections.Counter(), collections.Counter()
  by_place = collections.Counter()
  for step in per_step:
    for o in step:
      cls, where_ = _class_of(o.name, classes)
      by_class[cls] += o.end_ns - o.start_ns
      by_place[(where_, cls)] += o.end_ns - o.start_ns
      by_op[o.name] += o.end_ns - o.start_ns
      runs[o.name] += 1
  ms = lambda ns: round(ns / n / 1e6, 3)
  return {"where": where, "steps": n, "window_ms": ms(window), "busy_ms": ms(busy),
          "classes_ms": {c: ms(by_class[c]) for c in CLASSES}, "idle_ms": ms(window - busy),
          "top": [[op, *_class_of(op, classes), ms(t), round(runs[op] / n, 2)]
                  for op, t in by_op.most_common(top)],
          "places": [[where_, cls, ms(t)] for (where_, cls), t in by_place.most_common()]}


def table(report: dict) -> str:
  """The breakdown as printed lines."""
  w = report["window_ms"] or 1.0
  lines = [f"profile: {report['steps']} step(s) on {report['where']}, per step: "
           f"span {report['window_ms']:.2f} ms, busy {report['busy_ms']:.2f} ms",
           f"  {'class':<11} {'ms/step':>9} {'% span':>7}"]
  for c, v in [*report["classes_ms"].items(), ("idle", report["idle_ms"])]:
    lines.append(f"  {c:<11} {v:9.2f} {100 * v / w:7.1f}")
  lines.append(f"  {'top ops':<32} {'class':<11} {'ms/step':>9} {'runs':>6}  place")
  lines += [f"  {op[:32]:<32} {cls:<11} {t:9.3f} {r:6.1f}  {where}"
            for op, cls, where, t, r in report["top"]]
  lines.append(f"  {'top places':<32} {'class':<11} {'ms/step':>9}")
  lines += [f"  {where[:32]:<32} {cls:<11} {t:9.3f}"
            for where, cls, t in report["places"][:len(report["top"])]]
  return "\n".join(lines)
