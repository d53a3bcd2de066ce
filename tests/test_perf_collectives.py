"""perf/collectives.py: reading an SPMD program's collectives and pricing them over a torus's links.

The HLO lines below are in the forms XLA:TPU prints them (libtpu 0.0.42); tests/test_aot.py checks
the same code on programs compiled for TPU slices.
"""

import dataclasses

import pytest

from transformer_jax.perf import collectives as co

HLO = """\
HloModule jit__train_step

%all-reduce-scatter (input: f32[8192,64]) -> f32[8192,16] {
  %input = f32[8192,64]{0,1:T(8,128)} parameter(0)
  %all-reduce.193 = f32[8192,64]{0,1:T(8,128)} all-reduce(%input), channel_id=143, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add.1.clone
  ROOT %dynamic-slice.137 = f32[8192,16]{0,1:T(8,128)} dynamic-slice(%all-reduce.193, %c, %m), dynamic_slice_sizes={8192,16}
}

ENTRY %main.1 (p0: bf16[16,64]) -> f32[8192,16] {
  %p0 = bf16[16,64]{1,0} parameter(0)
  %all-gather.6 = bf16[64,64]{1,0:T(4,128)(2,1)} all-gather(%p0), channel_id=98, replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=1] {'axis_0'}, dimensions={0}, use_global_device_ids=true
  %all-gather.7 = bf16[32,64]{1,0} all-gather(%p0), channel_id=99, replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=2], device_ids=([2,2]T(1,0)) {'axis_0'}, dimensions={0}, use_global_device_ids=true
  %all-reduce.205 = (f32[]{:T(128)}, f32[]{:T(128)}) all-reduce(%a, %b), channel_id=7, replica_groups=[2,2]<=[4], use_global_device_ids=true, to_apply=%add
  %all-to-all.1 = f32[4,128]{1,0} all-to-all(%x), channel_id=8, replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}
  %collective-permute-start.1 = (f32[256]{0}, f32[256]{0}, u32[], u32[]) collective-permute-start(%y), channel_id=9, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %collective-permute-done.1 = f32[256]{0} collective-permute-done(%collective-permute-start.1)
  ROOT %fusion = f32[8192,16]{0,1:T(8,128)} fusion(%z), kind=kCustom, calls=%all-reduce-scatter
}
"""


def test_reads_every_form_of_collective_and_group():
  found = co.collectives(HLO)
  kinds = [c.kind for c in found]
  # The all-reduce inside the reduce-scatter fusion is not counted apart; -done ops not at all.
  assert kinds == ["all-gather", "all-gather", "all-reduce", "all-to-all", "collective-permute",
                   "reduce-scatter"]
  gather, gather2, reduce, a2a, permute, scatter = found
  assert gather.bytes == 64 * 64 * 2 and gather.groups == ((0, 1, 2, 3),)
  # devices arranged [[0, 2], [1, 3]] as a 2x1x2 mesh; groups along axis_0
  assert gather2.bytes == 32 * 64 * 2 and gather2.groups == ((0, 1), (2, 3))
  assert reduce.bytes == 8 and reduce.groups == ((0, 1), (2, 3))
  assert a2a.groups == ((0, 2), (1, 3))
  assert permute.bytes == 256 * 4
  assert scatter.bytes == 8192 * 64 * 4 and scatter.groups == ((0, 1, 2, 3),)


def test_mesh_groups_over_several_axes_and_plain_reduce_scatter():
  line = ("  %r = f32[8,16]{1,0} reduce-scatter(%x), replica_groups=mesh['axis_0'=2,'axis_1'=2,"
          "'axis_2'=2] {'axis_0','axis_2'}, dimensions={0}\n")
  (c,) = co.collectives("ENTRY %m () -> f32[8,16] {\n" + line + "}\n")
  assert c.groups == ((0, 1, 4, 5), (2, 3, 6, 7))
  assert c.bytes == 8 * 16 * 4 * 4  # the input: the result times the group size


@dataclasses.dataclass
class Dev:
  id: int
  coords: tuple
  slice_index: int = 0


def torus(x, y, z=1, slices=1):
  """Devices of `slices` x*y*z slices, numbered in order, with their torus coordinates."""
  n = x * y * z
  return [Dev(s * n + i, (i % x, i // x % y, i // (x * y)), s)
          for s in range(slices) for i in range(n)]


def test_link_time_is_ring_traffic_over_the_links_the_group_spans():
  devices = torus(2, 2)  # v5p-8: 2x2x1, one link along each of two dims
  gb = 1e9
  every = tuple(range(4))
  gather = co.Collective("all-gather", 4 * gb, (every,))
  t = co.link_time([gather], devices, link_gbps=100, dcn_gbps=6.25)
  # 3/4 of the gathered bytes over 2 links of 100 GB/s
  assert t["ici_bytes"] == pytest.approx(3 * gb)
  assert t["ici_s"] == pytest.approx(3 / 200)
  # an all-reduce moves twice that; a pair along one dim has one link
  reduce = co.Collective("all-reduce", 4 * gb, ((0, 1), (2, 3)))
  t = co.link_time([reduce], devices, 100, 6.25)
  assert t["ici_bytes"] == pytest.approx(4 * gb) and t["ici_s"] == pytest.approx(4 / 100)
  # four chips in a row (v5e 1x4): two links (a ring both ways)
  row = co.link_time([gather], torus(1, 4), 50, 3.0)
  assert row["ici_s"] == pytest.approx(3 / 100)
  # groups across slices go over the DCN at its per-chip bandwidth
  two = torus(2, 2, slices=2)
  across = co.Collective("all-reduce", 2 * gb, ((0, 4),))
  t = co.link_time([across], two, 100, 6.25)
  assert t["dcn_bytes"] == pytest.approx(2 * gb) and t["dcn_s"] == pytest.approx(2 / 6.25)
  assert t["ici_s"] == 0 and t["by_kind_s"] == {"all-reduce": pytest.approx(2 / 6.25)}


def test_a_group_of_one_moves_nothing():
  t = co.link_time([co.Collective("all-reduce", 10 ** 9, ((0,), (1,)))], torus(2, 1), 100, 6)
  assert t["ici_bytes"] == 0 and t["ici_s"] == 0


def test_megascale_sends_are_priced_over_the_dcn():
  """A multi-slice program is one slice's: what crosses slices is a host send per collective."""
  tag = ('is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name='
         '"xla_megascale_runtime",_xla_megascale_target="{1,2}x{0:3}",'
         '_xla_megascale_transfer_type="TYPE"}')
  hlo = ("ENTRY %m () -> f32[] {\n"
         "  %send.2 = (f32[128,8,128]{2,1,0}, u32[], token[]) send(%g, %a), channel_id=7, "
         + tag.replace("TYPE", "ALL_REDUCE") + "\n"
         "  %send.3 = (f32[1,64,64]{2,1,0}, u32[], token[]) send(%p, %a), channel_id=9, "
         + tag.replace("TYPE", "ALL_GATHER") + "\n"
         "  %recv.3 = (f32[2,64,64]{2,1,0}, u32[], token[]) recv(%a), channel_id=8, "
         + tag.replace("TYPE", "ALL_GATHER") + "\n}\n")
  reduce, gather = co.collectives(hlo)
  assert (reduce.kind, reduce.bytes, reduce.dcn) == ("all-reduce", 128 * 8 * 128 * 4, True)
  assert (gather.kind, gather.bytes, gather.dcn) == ("all-gather", 64 * 64 * 4, True)
  for slices in (2, 4):
    t = co.link_time([reduce, gather], torus(2, 2, slices=slices), 100, 6.25)
    n = slices
    want = 2 * (n - 1) / n * reduce.bytes + (n - 1) * gather.bytes
    assert t["dcn_bytes"] == pytest.approx(want) and t["ici_bytes"] == 0
    assert t["dcn_s"] == pytest.approx(want / 6.25e9)


LOOP = """\
%cond (p: (u32[], f32[256])) -> pred[] {
  %p = (u32[], f32[256]) parameter(0)
  %constant.7 = u32[]{:T(128)} constant(16)
  %i = u32[] get-tuple-element(%p), index=0
  ROOT %compare.1 = pred[]{:T(512)} compare(%i, %constant.7), direction=LT
}

%async_collective_fusion.3 (q: bf16[64,64]) -> bf16[256,64] {
  %q = bf16[64,64]{1,0} parameter(0)
  ROOT %all-gather.9 = bf16[256,64]{1,0} all-gather(%q), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
}

%body (p: (u32[], f32[256])) -> (u32[], f32[256]) {
  %p = (u32[], f32[256]) parameter(0)
  %x = f32[256]{0} get-tuple-element(%p), index=1
  %collective-permute.4 = f32[256]{0} collective-permute(%x), channel_id=4, source_target_pairs={{0,1},{1,2},{2,3},{3,0}}
  %fusion.5 = bf16[256,64]{1,0} fusion(%y), kind=kCustom, calls=%async_collective_fusion.3
  ROOT %t = (u32[], f32[256]) tuple(%i, %collective-permute.4)
}

%body2 (p: (u32[], f32[256])) -> (u32[], f32[256]) {
  %p = (u32[], f32[256]) parameter(0)
  %all-reduce.6 = f32[256]{0} all-reduce(%x), channel_id=6, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %t = (u32[], f32[256]) tuple(%i, %all-reduce.6)
}

ENTRY %main (a: f32[256]) -> f32[256] {
  %while.1 = (u32[], f32[256]) while(%init), condition=%cond, body=%body
  %while.2 = (u32[], f32[256]) while(%init), condition=%cond, body=%body2, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = f32[256]{0} get-tuple-element(%while.2), index=1
}
"""


def test_collectives_in_loops_count_once_per_trip():
  counts = {c.kind: c.count for c in co.collectives(LOOP)}
  # `i < 16` in the condition; the known trip count wins over the condition; a collective XLA
  # sank into the loop as an async_collective_fusion is one collective, counted once.
  assert counts == {"collective-permute": 16, "all-reduce": 3, "all-gather": 1}
  t = co.link_time(co.collectives(LOOP), torus(2, 2), 100, 6.25)
  assert t["ici_bytes"] == pytest.approx(16 * 1024 + 3 * 2 * 3 / 4 * 1024 + 3 / 4 * 256 * 64 * 2)


def _split_all_gather(caller: str) -> str:
  """One all-gather as XLA:TPU overlaps it with other work: a start fusion, continuations
  (async_collective_fusion) and a done fusion, each repeating it under channel 5, in `caller`."""
  gather = ("all-gather(%p), channel_id=5, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={1}, "
            "use_global_device_ids=true")
  names = ("fused_computation.11", "async_collective_fusion.12", "async_collective_fusion.13",
           "fused_computation.14")
  comps = "".join(f"%{name} (p: bf16[1024,8]) -> bf16[1024,64] {{\n  %p = bf16[1024,8]{{1,0}} "
                  f"parameter(0)\n  ROOT %all-gather.{k} = bf16[1024,64]{{0,1}} {gather}\n}}\n\n"
                  for k, name in enumerate(names))
  callers = ("async-collective-start.1", "fusion.2", "fusion.3", "async-collective-done.1")
  calls = "".join(f"  %{at} = bf16[1024,64]{{0,1}} fusion(%x), kind=kCustom, calls=%{name}\n"
                  for at, name in zip(callers, names))
  return comps + caller.replace("CALLS\n", calls)


def test_a_collective_split_over_async_fusions_counts_once():
  """Its pieces share a channel: one all-gather, run as often as its start and done (at the top
  level once, in a loop body once per trip). Each piece counted alone made an FSDP step's
  all-gathers 4-28 times too many."""
  top = _split_all_gather("ENTRY %main (x: bf16[1024,8]) -> bf16[1024,64] {\n  %x = "
                          "bf16[1024,8]{1,0} parameter(0)\nCALLS\n  ROOT %r = bf16[1024,64]{0,1} "
                          "copy(%async-collective-done.1)\n}\n")
  assert co.collectives(top) == [co.Collective("all-gather", 1024 * 64 * 2, (tuple(range(8)),))]
  looped = _split_all_gather(LOOP.split("%body2")[0].replace(
      "%body (p: (u32[], f32[256])) -> (u32[], f32[256]) {\n",
      "%body (p: (u32[], f32[256])) -> (u32[], f32[256]) {\nCALLS\n")
      + "ENTRY %main (a: f32[256]) -> f32[256] {\n  %while.1 = (u32[], f32[256]) "
      "while(%init), condition=%cond, body=%body\n}\n")
  counts = sorted((c.kind, c.bytes, c.count) for c in co.collectives(looped))
  assert counts == [("all-gather", 256 * 64 * 2, 1), ("all-gather", 1024 * 64 * 2, 16),
                    ("collective-permute", 256 * 4, 16)]
  # two collectives of their own under one channel_id (a scanned layer's two ring shifts): two
  twin = LOOP.replace("  ROOT %t = (u32[], f32[256]) tuple(%i, %collective-permute.4)",
                      "  %collective-permute.5 = f32[256]{0} collective-permute(%x), channel_id=4, "
                      "source_target_pairs={{0,1},{1,2},{2,3},{3,0}}\n"
                      "  ROOT %t = (u32[], f32[256]) tuple(%i, %collective-permute.4)")
  assert [c.count for c in co.collectives(twin) if c.kind == "collective-permute"] == [16, 16]


def test_a_shift_is_priced_as_half_of_a_two_way_pair():
  shift = co.Collective("collective-permute", 10 ** 9, ())
  t = co.link_time([shift, shift], torus(4, 4), 50, 3)
  assert t["ici_bytes"] == 2 * 10 ** 9 and t["ici_s"] == pytest.approx(2 * 10 ** 9 / (2 * 50e9))


def test_an_all_to_all_crosses_as_many_links_as_its_members_are_hops_away():
  """Each member gets its own (n-1)/n share: a byte bound 3 hops away loads 3 links."""
  gb = 1e9
  ring = co.Collective("all-to-all", 8 * gb, (tuple(range(8)),))
  # a whole ring of 8 (the shorter way round): hops 1,1,2,2,3,3,4 -> mean 16/7; two links
  assert co.mean_hops(tuple(range(8)), torus(8, 1), (8, 1, 1)) == pytest.approx(16 / 7)
  t = co.link_time([ring], torus(8, 1), 100, 6.25)
  assert t["ici_bytes"] == pytest.approx(7 / 8 * 8 * gb * 16 / 7)  # twice the operand
  assert t["ici_s"] == pytest.approx(16 * gb / (2 * 100e9))
  assert t["by_kind_s"] == {"all-to-all": pytest.approx(t["ici_s"])}
  # 2x2x2: three at 1 hop, three at 2, one at 3 -> 12/7, over three links
  cube = co.link_time([co.Collective("all-to-all", 8 * gb, (tuple(range(8)),))],
                      torus(2, 2, 2), 100, 6.25)
  assert cube["ici_bytes"] == pytest.approx(7 / 8 * 8 * gb * 12 / 7)
  assert cube["ici_s"] == pytest.approx(12 * gb / (3 * 100e9))
  # part of a ring of 4 goes the straight way: 0-1, 1-2 one hop, 0-2 two -> 8/6
  assert co.mean_hops((0, 1, 2), torus(4, 1), (4, 1, 1)) == pytest.approx(8 / 6)
  # a pair is one hop: as priced for an all-gather of the same bytes
  pair = [co.Collective(k, gb, ((0, 1), (2, 3))) for k in ("all-to-all", "all-gather")]
  a2a, gather = (co.link_time([c], torus(2, 2), 100, 6.25) for c in pair)
  assert a2a["ici_s"] == pytest.approx(gather["ici_s"]) and a2a["ici_bytes"] == gb / 2


def test_an_all_to_all_across_slices_sends_the_other_slices_share_over_the_dcn():
  """As a group spanning slices, or as XLA:TPU compiles it for an expert axis with dcn_expert: a
  megascale send of the whole operand, its group listed (slice * 100000 + device)."""
  gb = 1e9
  two = torus(2, 2, slices=2)
  t = co.link_time([co.Collective("all-to-all", 4 * gb, ((0, 1, 4, 5), (2, 3, 6, 7)))], two,
                   100, 6.25)
  assert t["dcn_bytes"] == pytest.approx(2 * gb) and t["ici_bytes"] == 0
  hlo = ("ENTRY %m () -> f32[] {\n  %send.3 = (f32[4,1,40,64]{3,2,1,0:T(8,128)}, u32[], token[]) "
         "send(%x, %a), channel_id=10, is_host_transfer=true, frontend_attributes={"
         '_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous='
         '"all_to_all.48_0",_xla_megascale_target={{100000,100001,200000,200001},{100002,100003,'
         '200002,200003}},_xla_megascale_transfer_type="ALL_TO_ALL"}\n}\n')
  (a2a,) = co.collectives(hlo)
  assert (a2a.kind, a2a.dcn, a2a.bytes, a2a.remote) == ("all-to-all", True, 40960, 0.5)
  # half of the group is in the other slice, however many slices the program has
  for slices in (2, 4):
    t = co.link_time([a2a], torus(2, 2, slices=slices), 100, 6.25)
    assert t["dcn_bytes"] == pytest.approx(40960 / 2) and t["ici_bytes"] == 0
    assert t["dcn_s"] == pytest.approx(40960 / 2 / 6.25e9)


def test_a_multi_slice_programs_groups_number_one_slices_devices_in_mesh_order():
  """XLA:TPU compiles a multi-slice program per slice: its replica groups number that slice's
  devices in the mesh's order. With a DCN part inside a mesh axis (mesh.dcn_expert) the mesh's
  order interleaves the slices; group (1, 2) is still two chips of one slice, over the ICI."""
  a, b = torus(2, 2), torus(2, 2, slices=2)[4:]
  mesh_order = [a[0], a[1], b[0], b[1], a[2], a[3], b[2], b[3]]
  t = co.link_time([co.Collective("all-gather", 4 * 10 ** 9, ((1, 2), (0, 3)))], mesh_order,
                   100, 6.25)
  assert t["dcn_bytes"] == 0 and t["ici_bytes"] == pytest.approx(2e9)
  everyone = co.link_time([co.Collective("all-reduce", 4 * 10 ** 9, ())], mesh_order, 100, 6.25)
  assert everyone["dcn_bytes"] == 0 and everyone["ici_bytes"] == pytest.approx(6e9)


def test_slices_without_wraparound_links_drive_one_link_per_dimension():
  """A v5p slice smaller than a 4x4x4 cube has no wraparound links: a ring folded onto a line of
  4 uses each link both ways (one link's bandwidth, not two), and an all-to-all's bytes go the
  straight way. Whole cubes, and v5e/v6e, wrap."""
  from transformer_jax.perf import hardware  # pylint: disable=g-import-not-at-top
  v5p, v5e = hardware.CHIPS["v5p"], hardware.CHIPS["v5e"]
  assert v5p.wraps((2, 4, 4)) == (False,) * 3 and v5p.wraps((4, 4, 8)) == (True,) * 3
  assert v5p.wraps((4, 4, 4)) == (True,) * 3 and v5e.wraps((4, 4, 1)) == (True,) * 3
  gb = 1e9
  line = torus(2, 4, 4)  # v5p-64
  row = tuple(i for i, d in enumerate(line) if d.coords[0] == 0 and d.coords[2] == 0)
  gather = co.Collective("all-gather", 4 * gb, (row,))
  folded = co.link_time([gather], line, 100, 6.25, v5p.wraps)
  assert folded["ici_s"] == pytest.approx(3 * gb / 100e9)
  assert co.link_time([gather], line, 100, 6.25)["ici_s"] == pytest.approx(3 * gb / 200e9)
  a2a = co.Collective("all-to-all", 4 * gb, (row,))
  # 0-1, 1-2, 2-3 one hop, 0-2, 1-3 two, 0-3 three: 20/12 (the ring's shorter way: 16/12)
  assert co.mean_hops(row, line, (2, 4, 4), (False,) * 3) == pytest.approx(20 / 12)
  straight = co.link_time([a2a], line, 100, 6.25, v5p.wraps)
  assert straight["ici_bytes"] == pytest.approx(3 * gb * 20 / 12)
  assert straight["ici_s"] == pytest.approx(3 * gb * 20 / 12 / 100e9)
  cube = torus(4, 4, 4)
  row = tuple(i for i, d in enumerate(cube) if d.coords[1] == 0 and d.coords[2] == 0)
  ring = co.link_time([co.Collective("all-gather", 4 * gb, (row,))], cube, 100, 6.25, v5p.wraps)
  assert ring["ici_s"] == pytest.approx(3 * gb / 200e9)
