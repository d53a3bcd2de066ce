"""The one reader of optimized HLO module text (`compiled.as_text()`): its computations, their
instructions (name, result type, op, operands and attributes) and the arrays of a type.
collectives.py and matmuls.py read programs through it."""

import dataclasses
import math
import re

BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
         "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
         "c128": 16}
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][a-z\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\](?:\{([\d,]*)[^}]*\})?")
_HEAD = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
TARGET = re.compile(r'custom_call_target="([^"]+)"')  # a custom call's, in its attributes
OP_NAME = re.compile(r'op_name="([^"]+)"')  # the JAX name stack in an instruction's metadata


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  result: str  # the result's type, e.g. `f32[8,2]{1,0}` or a tuple `(f32[8], s32[])`
  op: str  # e.g. `dot`, `all-gather-start`, `fusion`
  args: str  # what follows `op(`: operands, then attributes


def instruction(line: str) -> Instruction | None:
  m = _INSTR.match(line)
  return Instruction(*m.groups()) if m else None


def computations(text: str) -> tuple[dict, str | None]:
  """({computation name: its instruction lines}, the ENTRY computation's name)."""
  comps, name, entry = {}, None, None
  for line in text.splitlines():
    head = _HEAD.match(line)
    if head:
      name = head.group(2)
      entry = name if head.group(1) else entry
      comps[name] = []
    elif name is not None:
      comps[name].append(line)
  return comps, entry


def arrays(type_text: str) -> list[tuple]:
  """(dtype, dims, minor-to-major layout or None) of each array in an HLO type."""
  return [(dtype, tuple(int(d) for d in dims.split(",") if d),
           tuple(int(d) for d in layout.split(",") if d) if layout is not None else None)
          for dtype, dims, layout in ((m.group(1), m.group(2), m.group(3))
                                      for m in _ARRAY.finditer(type_text)) if dtype in BYTES]


def shape_bytes(type_text: str) -> list[int]:
  """Bytes of each array in an HLO type, e.g. `(f32[8,2]{1,0}, bf16[4])` -> [64, 8]."""
  return [BYTES[dtype] * math.prod(dims) for dtype, dims, _ in arrays(type_text)]
