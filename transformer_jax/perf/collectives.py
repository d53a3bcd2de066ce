"""The collectives of a compiled SPMD program, and an estimate of their time over the chips' links.

`collectives(hlo_text)` reads every all-gather, all-reduce, reduce-scatter (on TPU a fusion that
calls an `all-reduce-scatter` computation: an all-reduce whose result is sliced), all-to-all and
collective-permute of an optimized HLO module (`compiled.as_text()`), with the bytes of its data,
its replica groups (explicit lists, iota `[G,N]<=[...]T(...)` and `mesh[...] {axes}` forms) and
how often it runs. A multi-slice program is compiled per slice; what crosses slices appears as
host `send`s to the megascale runtime, tagged with the collective they carry
(`_xla_megascale_transfer_type`), and its replica groups number one slice's devices in the mesh's
order (not the whole mesh's: with mesh.dcn_expert, say, the mesh interleaves the slices).

`link_time` prices them on a torus: each collective's per-chip traffic, the bandwidth-optimal
(ring) amount — all-gather (n-1)/n of the gathered bytes, reduce-scatter (n-1)/n of its input,
all-reduce twice that, a permute its bytes — over the links its group spans: along a torus
dimension where the group covers 2 coordinates, one link; 3 or more, two (a ring both ways),
unless the slice has no wraparound links there (`wraps`: a v5p slice smaller than a 4x4x4 cube):
then one, as a ring folded onto a line uses each link both ways; a
permute (a shift to the neighbours) two: XLA:TPU's windowed einsums shift both ways at once, so a
shift is priced as half of such a pair (a lone shift in one direction would take twice as long).
An all-to-all (an MoE layer's dispatch and combine) sends a distinct (n-1)/n of its operand to
the other members, not to neighbours: each byte crosses as many links as the member it goes to is
hops away (dimension-ordered routing; the shorter way round where the group covers a wrapping
dimension of 3 or more whole, the straight way along part of one or a line), so its traffic is
(n-1)/n of the operand times the mean hops to the others (a ring of 8: 16/7; 2x2x2: 12/7), spread
evenly over the links.
A group that spans slices, and every megascale send, goes over the data-center network at the
chip's DCN bandwidth instead (a send carries the chip's piece: an all-gather moves it to the
n - 1 other slices; an all-to-all's send carries its whole operand, of which the share bound for
the group's members in other slices crosses, `Collective.remote`). The collectives are summed as
if none
overlapped another; XLA overlaps them with compute, so this is a term of a max(), not an addition
to the step. Latency and contention are left out and every link runs at its full one-way
bandwidth: a lower bound.

A collective inside a while loop (a windowed einsum's ring shifts, a microbatch scan's steps)
counts once per trip: the loop's `known_trip_count`, else the bound its condition compares the
counter with (`i < N`). Computations reached through calls, fusions and branches count as often
as their callers run (both branches of a conditional are counted: an upper bound for the anomaly
guard's skipped update). A collective XLA:TPU overlaps with other work is spread over fusions
that each repeat it under one channel_id (the fusions an `async-collective-start` and `-done`
call, and `async_collective_fusion` continuations): it counts once per run of its start and
done, and once where a loop body holds only its continuations (one collective spread over the
trips). Other collective instructions count alone, even where two share a channel_id.
"""

import dataclasses
import math
import re

import numpy as np

from transformer_jax.perf import hlo

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_MEGASCALE = {"ALL_GATHER": "all-gather", "ALL_REDUCE": "all-reduce",
              "REDUCE_SCATTER": "reduce-scatter", "ALL_TO_ALL": "all-to-all"}


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str  # one of KINDS
  bytes: int  # all-gather: the gathered result; reduce-scatter: its input; else the operand
  groups: tuple  # tuples of device ids (indices into the program's devices); () = all
  dcn: bool = False  # a megascale send: across slices, `bytes` being what this chip sends
  count: float = 1  # times it runs per program execution (loop trips)
  remote: float | None = None  # a megascale all-to-all: its group's share in other slices


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


def megascale_remote(attrs: str) -> float | None:
  """The share of a megascale all-to-all's group in other slices than the sender's, from its
  `_xla_megascale_target={{100000,100001,200000,200001},...}` (slice * 100000 + device: the
  first group's members in the first member's slice are local), or None when not listed."""
  m = re.search(r"_xla_megascale_target=\{\{([\d,]+)\}", attrs)
  if not m:
    return None
  group = _ints(m.group(1))
  local = sum(i // 100000 == group[0] // 100000 for i in group)
  return 1 - local / len(group)


def _trip_count(attrs: str, comps: dict) -> int:
  """Iterations of a while loop: its known_trip_count, else N of its condition's `i < N`."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
  if known:
    return int(known.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", attrs)
  lines = comps.get(cond.group(1), []) if cond else []
  consts = dict(re.findall(r"%([\w.\-]+) = [su]\d+\[\]\S* constant\((\d+)\)", "\n".join(lines)))
  for line in lines:
    m = re.search(r"ROOT .* compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT", line)
    if m and m.group(1) in consts:
      return int(consts[m.group(1)])
  return 1


def _multiplicity(comps: dict, entry: str) -> dict:
  """How many times each computation runs per execution of `entry` (loops multiply)."""
  calls = {}
  for comp, lines in comps.items():
    edges = []
    for line in lines:
      trips = _trip_count(line, comps) if re.search(r" while\(", line) else 1
      for key, callee in re.findall(r"\b(calls|body|condition|true_computation|"
                                    r"false_computation)=%?([\w.\-]+)", line):
        edges.append((callee, trips if key in ("body", "condition") else 1))
      for branches in re.findall(r"branch_computations=\{([^}]*)\}", line):
        edges += [(b, 1) for b in re.findall(r"%?([\w.\-]+)", branches)]
    calls[comp] = edges
  runs = {entry: 1}
  order, seen = [], set()
  def visit(comp):  # callers before callees (the call graph is a DAG)
    if comp in seen:
      return
    seen.add(comp)
    for callee, _ in calls.get(comp, ()):
      visit(callee)
    order.append(comp)
  visit(entry)
  for comp in reversed(order):
    for callee, factor in calls.get(comp, ()):
      runs[callee] = runs.get(callee, 0) + runs.get(comp, 0) * factor
  return runs


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of an optimized HLO module, with how often it runs (see the module doc)."""
  comps, entry = hlo.computations(hlo_text)
  runs = _multiplicity(comps, entry) if entry else {}
  scatter = {}  # all-reduce-scatter computations: their all-reduce's (input bytes, groups, channel)
  for comp, lines in comps.items():
    if comp.startswith("all-reduce-scatter"):
      for line in lines:
        i = hlo.instruction(line)
        if i and i.op in ("all-reduce", "all-reduce-start"):
          scatter[comp] = (sum(hlo.shape_bytes(i.result)), replica_groups(i.args),
                           _channel(i.args))
  # the computations XLA:TPU spreads an overlapped collective over: its continuations and the
  # fusions its async-collective-start and -done call
  pieces = {comp for comp in comps if comp.startswith("async_collective_fusion")}
  found = []  # (computation, shape, (channel, Collective))
  for comp, lines in comps.items():
    if comp in scatter:
      continue
    for line in lines:
      i = hlo.instruction(line)
      if not i:
        continue
      if i.op == "fusion" and re.match(r"async-collective-(start|done)", i.name):
        called = re.search(r"calls=%?([\w.\-]+)", i.args)
        pieces |= {called.group(1)} if called else set()
      c = _collective(i, runs.get(comp, 1), scatter)
      if c:
        found.append((comp, re.sub(r"\{[^}]*\}", "", i.result), c))
  return _once_per_piece(found, pieces)


def _channel(attrs: str) -> int | None:
  m = re.search(r"\bchannel_id=(\d+)", attrs)
  return int(m.group(1)) if m else None


def _collective(i, count: float, scatter: dict) -> tuple | None:
  """(channel id, Collective) of instruction `i`, or None where it is no collective."""
  result, op, attrs = i.result, i.op, i.args
  if op == "fusion":
    called = re.search(r"calls=%?([\w.\-]+)", attrs)
    if called and called.group(1) in scatter:
      size, groups, channel = scatter[called.group(1)]
      return channel, Collective("reduce-scatter", size, groups, count=count)
    return None
  transfer = re.search(r'_xla_megascale_transfer_type="(\w+)"', attrs)
  if op == "send" and transfer:
    kind = _MEGASCALE.get(transfer.group(1), "collective-permute")
    return None, Collective(kind, hlo.shape_bytes(result)[0], (), dcn=True, count=count,
                            remote=megascale_remote(attrs))
  kind = op[:-len("-start")] if op.endswith("-start") else op
  if kind not in KINDS:
    return None
  sizes, groups = hlo.shape_bytes(result), replica_groups(attrs)
  if op.endswith("-start"):  # (operands..., results...) or the result itself: the largest
    size = max(sizes)
  elif kind == "reduce-scatter":  # the result is one n-th of the input
    size = sum(sizes) * (len(groups[0]) if groups else 1)
  else:
    size = sum(sizes)
  return _channel(attrs), Collective(kind, size, groups, count=count)


def _once_per_piece(found: list, pieces: set) -> list[Collective]:
  """One collective per set of async pieces (the computations in `pieces`, repeating it under
  one channel, kind and shape): it runs as often as its start and done do; one sunk into a loop
  body as continuations alone (started and finished outside) once. Any other collective
  instruction counts alone (two of them may share a channel_id: a scanned layer's two ring
  shifts do)."""
  by_key, out = {}, []
  for comp, shape, (channel, c) in found:
    sunk = comp.startswith("async_collective_fusion")
    if comp in pieces and channel is not None:
      by_key.setdefault((channel, c.kind, shape), []).append((sunk, c))
    else:
      out.append(dataclasses.replace(c, count=1) if sunk else c)
  for parts in by_key.values():
    ends = [c for sunk, c in parts if not sunk]
    out.append(dataclasses.replace(ends[0], count=max(c.count for c in ends)) if ends
               else dataclasses.replace(parts[0][1], count=1))
  return out


def traffic(c: Collective, n: int) -> float:
  """Bytes one chip sends over its links for collective `c` in a group of `n` (ring-optimal)."""
  if c.kind == "collective-permute":
    return float(c.bytes)
  if n <= 1:
    return 0.0
  share = c.bytes * (n - 1) / n
  return 2 * share if c.kind == "all-reduce" else share


def links_spanned(group, devices, wraps=None) -> tuple[int, bool]:
  """(torus links one chip of `group` can drive, whether the group spans slices); `wraps`: which
  dimensions have wraparound links (default: all)."""
  members = [devices[i] for i in group if i < len(devices)]
  if len({getattr(d, "slice_index", 0) for d in members}) > 1:
    return 0, True
  coords = [tuple(getattr(d, "coords", (d.id,))) for d in members]
  links = 0
  for dim in range(len(coords[0]) if coords else 0):
    spread = len({c[dim] for c in coords})
    ring = wraps is None or wraps[dim]
    links += 0 if spread <= 1 else 1 if spread == 2 or not ring else 2
  return links, False


def mean_hops(group, devices, extent, wraps=None) -> float:
  """Mean torus hops from a member of `group` to each other member (see the module doc);
  `extent`: the slice's size along each torus dimension, `wraps`: which of them wrap (all)."""
  coords = np.array([tuple(getattr(devices[i], "coords", (devices[i].id,)))
                     for i in group if i < len(devices)])
  n = len(coords)
  if n < 2:
    return 1.0
  hops = 0
  for dim, size in enumerate(extent):
    delta = np.abs(coords[:, None, dim] - coords[None, :, dim])
    ring = size >= 3 and (wraps is None or wraps[dim]) and len(set(coords[:, dim])) == size
    if ring:  # the whole ring: the shorter way round
      delta = np.minimum(delta, size - delta)
    hops += int(delta.sum())
  return hops / (n * (n - 1))


def _remote_share(group, devices) -> float:
  """The share of `group` in other slices than its first member's."""
  slice_of = [getattr(devices[i], "slice_index", 0) for i in group if i < len(devices)]
  return sum(s != slice_of[0] for s in slice_of) / len(slice_of)


def _chip_traffic(c: Collective, group, devices, slices: int, extent,
                  wraps) -> tuple[float, int, bool]:
  """(bytes one chip sends for one run of `c`, the links it drives, whether over the DCN)."""
  if c.dcn:
    if c.kind == "all-to-all" and c.remote is not None:
      return c.bytes * c.remote, 0, True
    piece = c.kind == "all-gather"  # the send is this chip's piece of the gathered result
    return traffic(dataclasses.replace(c, bytes=c.bytes * slices if piece else c.bytes),
                   slices), 0, True
  if c.kind == "collective-permute":  # to the neighbours, both ways at once: two links
    return traffic(c, len(group)), 2, False
  links, across = links_spanned(group, devices, wraps)
  if c.kind != "all-to-all":
    return traffic(c, len(group)), links, across
  if across:  # what is bound for the other slices' members
    return c.bytes * _remote_share(group, devices), 0, True
  return traffic(c, len(group)) * mean_hops(group, devices, extent, wraps), links, False


def link_time(found: list[Collective], devices, link_gbps: float, dcn_gbps: float,
              wraps=None) -> dict:
  """Seconds and bytes per chip of the collectives over ICI links (`link_gbps`: one link, one
  way, GB/s) and the DCN (`dcn_gbps`: per chip), with the seconds of each kind. `wraps(extent)`:
  which dimensions of a slice of that extent have wraparound links (default: all)."""
  out = {"ici_s": 0.0, "dcn_s": 0.0, "ici_bytes": 0.0, "dcn_bytes": 0.0,
         "by_kind_s": {}, "count": len(found)}
  slice_of = lambda d: getattr(d, "slice_index", 0)
  slices = len({slice_of(d) for d in devices})
  # A multi-slice program's groups number one slice's devices (see the module doc); a group
  # with ids past a slice's count numbers them all.
  local = [d for d in devices if slice_of(d) == slice_of(devices[0])] if devices else []
  coords = np.array([tuple(getattr(d, "coords", (d.id,))) for d in devices])
  extent = tuple(coords.max(axis=0) + 1) if len(coords) else ()
  closed = wraps(extent) if wraps else None
  for c in found:
    group = c.groups[0] if c.groups else tuple(range(len(local)))
    pool = local if max(group, default=0) < len(local) else devices
    sent, links, across = _chip_traffic(c, group, pool, slices, extent, closed)
    sent *= c.count
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
