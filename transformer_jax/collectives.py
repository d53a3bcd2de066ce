"""The collectives of a compiled SPMD program and a lower bound on their time over the chips' links.

`collectives(hlo_text)` reads every all-gather, all-reduce, reduce-scatter (on TPU a fusion that
calls an `all-reduce-scatter` computation: an all-reduce whose result is sliced), all-to-all and
collective-permute of an optimized HLO module (`compiled.as_text()`), with the bytes of its data
and its replica groups (explicit lists, iota `[G,N]<=[...]T(...)` and `mesh[...] {axes}` forms).
A multi-slice program is compiled per slice; what crosses slices appears as host `send`s to the
megascale runtime, tagged with the collective they carry (`_xla_megascale_transfer_type`).

`link_time` prices them on a torus: each collective's per-chip traffic, the bandwidth-optimal
(ring) amount — all-gather and all-to-all (n-1)/n of the gathered bytes, reduce-scatter (n-1)/n of
its input, all-reduce twice that, a permute its bytes — over the links its group spans: along a
torus dimension where the group covers 2 coordinates, one link; 3 or more, two (a ring both ways).
A group that spans slices, and every megascale send, goes over the data-center network at the
chip's DCN bandwidth instead (a send carries the chip's piece: an all-gather moves it to the n - 1
other slices).
The collectives are summed as if none overlapped another (XLA may overlap them with compute, so
this is a term of a max(), not an addition to the step). It is a lower bound: no latency, no
contention, every link at its full one-way bandwidth.

What it cannot see: a collective inside a while loop runs once per trip but appears once in the
text (aot.py counts scanned layers from unrolled compiles for this reason).
"""

import dataclasses
import math
import re

import numpy as np

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
          "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}
_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_MEGASCALE = {"ALL_GATHER": "all-gather", "ALL_REDUCE": "all-reduce",
              "REDUCE_SCATTER": "reduce-scatter", "ALL_TO_ALL": "all-to-all"}
_INSTR = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z][a-z\-]*)\((.*)$")
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str  # one of _KINDS
  bytes: int  # all-gather: the gathered result; reduce-scatter: its input; else the operand
  groups: tuple  # tuples of device ids (indices into the program's devices); () = all
  dcn: bool = False  # a megascale send: across slices, `bytes` being what this chip sends


def shape_bytes(text: str) -> list[int]:
  """Bytes of each array in an HLO type, e.g. `(f32[8,2]{1,0}, bf16[4])` -> [64, 8]."""
  return [_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
          for dtype, dims in _SHAPE.findall(text) if dtype in _BYTES]


def _ints(text: str | None) -> list[int]:
  return [int(x) for x in text.split(",") if x] if text else []


def _iota(dims, reshape, perm):
  """XLA's iota tile assignment: arange reshaped to `reshape`, transposed by `perm`, as `dims`."""
  ids = np.arange(math.prod(reshape)).reshape(reshape)
  return ids.transpose(perm or range(len(reshape))).reshape(dims)


def replica_groups(attrs: str) -> tuple:
  """The replica groups named in an instruction's attributes, as tuples of ids; () if none."""
  m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
  if m:
    return tuple(tuple(_ints(g)) for g in re.findall(r"\{([\d,]*)\}", m.group(1)))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
  if m:
    dims = _ints(m.group(1))
    ids = _iota(dims, _ints(m.group(2)), _ints(m.group(3)))
    return tuple(tuple(int(i) for i in row) for row in ids.reshape(-1, dims[-1]))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?"
                r"\))? \{([^}]*)\}", attrs)
  if m:
    axes = [(name, int(size)) for name, size in re.findall(r"'(\w+)'=(\d+)", m.group(1))]
    sizes = [s for _, s in axes]
    ids = (_iota(sizes, _ints(m.group(2)), _ints(m.group(3))) if m.group(2)
           else np.arange(math.prod(sizes)).reshape(sizes))
    names = [n for n, _ in axes]
    over = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
    keep = [i for i in range(len(axes)) if i not in over]
    size = math.prod(sizes[i] for i in over)
    return tuple(tuple(int(i) for i in row)
                 for row in ids.transpose(keep + over).reshape(-1, size))
  return ()


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of an optimized HLO module, once per instruction in the text."""
  comps, name = {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      name = head.group(1)
      comps[name] = []
    elif name is not None:
      comps[name].append(line)
  scatter = {}  # all-reduce-scatter computations: (input bytes, groups) of their all-reduce
  for comp, lines in comps.items():
    if comp.startswith("all-reduce-scatter"):
      for line in lines:
        m = _INSTR.match(line)
        if m and m.group(2) in ("all-reduce", "all-reduce-start"):
          scatter[comp] = (sum(shape_bytes(m.group(1))), replica_groups(m.group(3)))
  found = []
  for comp, lines in comps.items():
    if comp in scatter:
      continue
    for line in lines:
      m = _INSTR.match(line)
      if not m:
        continue
      result, op, attrs = m.groups()
      if op == "fusion":
        called = re.search(r"calls=%?([\w.\-]+)", attrs)
        if called and called.group(1) in scatter:
          size, groups = scatter[called.group(1)]
          found.append(Collective("reduce-scatter", size, groups))
        continue
      transfer = re.search(r'_xla_megascale_transfer_type="(\w+)"', attrs)
      if op == "send" and transfer:
        kind = _MEGASCALE.get(transfer.group(1), "collective-permute")
        found.append(Collective(kind, shape_bytes(result)[0], (), dcn=True))
        continue
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind not in _KINDS:
        continue
      sizes = shape_bytes(result)
      if op.endswith("-start"):  # (operands..., results...) or the result itself: the largest
        size = max(sizes)
      elif kind == "reduce-scatter":  # the result is one n-th of the input
        groups = replica_groups(attrs)
        size = sum(sizes) * (len(groups[0]) if groups else 1)
      else:
        size = sum(sizes)
      found.append(Collective(kind, size, replica_groups(attrs)))
  return found


def traffic(c: Collective, n: int) -> float:
  """Bytes one chip sends over its links for collective `c` in a group of `n` (ring-optimal)."""
  if c.kind == "collective-permute":
    return float(c.bytes)
  if n <= 1:
    return 0.0
  share = c.bytes * (n - 1) / n
  return 2 * share if c.kind == "all-reduce" else share


def links_spanned(group, devices) -> tuple[int, bool]:
  """(torus links one chip of `group` can drive, whether the group spans slices)."""
  members = [devices[i] for i in group if i < len(devices)]
  if len({getattr(d, "slice_index", 0) for d in members}) > 1:
    return 0, True
  coords = [tuple(getattr(d, "coords", (d.id,))) for d in members]
  links = 0
  for dim in range(len(coords[0]) if coords else 0):
    spread = len({c[dim] for c in coords})
    links += 0 if spread <= 1 else 1 if spread == 2 else 2
  return links, False


def link_time(found: list[Collective], devices, link_gbps: float, dcn_gbps: float) -> dict:
  """Seconds and bytes per chip of the collectives over ICI links (`link_gbps`: one link, one
  way, GB/s) and the DCN (`dcn_gbps`: per chip), with the seconds of each kind."""
  out = {"ici_s": 0.0, "dcn_s": 0.0, "ici_bytes": 0.0, "dcn_bytes": 0.0,
         "by_kind_s": {}, "count": len(found)}
  everyone = tuple(range(len(devices)))
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  for c in found:
    group = c.groups[0] if c.groups else everyone
    if c.dcn:
      links, across = 0, True
      piece = c.kind == "all-gather"  # the send is this chip's piece of the gathered result
      sent = traffic(dataclasses.replace(c, bytes=c.bytes * slices if piece else c.bytes), slices)
    else:
      links, across = (1, False) if c.kind == "collective-permute" else links_spanned(group, devices)
      sent = traffic(c, len(group))
    if not sent:
      continue
    if across:
      seconds = sent / (dcn_gbps * 1e9)
      out["dcn_s"] += seconds
      out["dcn_bytes"] += sent
    else:
      seconds = sent / (max(links, 1) * link_gbps * 1e9)
      out["ici_s"] += seconds
      out["ici_bytes"] += sent
    out["by_kind_s"][c.kind] = out["by_kind_s"].get(c.kind, 0.0) + seconds
  return out
