"""`benchmark --profile` (transformer_jax/perf/profile.py): where a step's device time goes, by
kernel class. A GPU program's classes from its HLO, a GPU trace's layout (streams, a derived line,
memcpys, another program's kernels) from a hand-made XSpace, and a real CPU step traced here."""

import glob
import os

import jax
import pytest
from jax import profiler

from transformer_jax import benchmark
from transformer_jax import config as config_lib
from transformer_jax.perf import hlo as hlo_lib
from transformer_jax.perf import profile

SCOPE = 'metadata={op_name="jit(_train_step)/%s"}'
MLP = SCOPE % "jvp(DecoderLM)/layer_0/mlp/dot_general"
ATTN = SCOPE % "transpose(jvp(DecoderLM))/layer_1/attention/attention._kernel/select_n"
ADAM = SCOPE % "cond/branch_0_fun/optimizer/mul"

# A GPU train step's kinds of kernel, as XLA writes them (names shortened; an instruction is one
# line there: the lines continued here are joined).
GPU_HLO = f"""HloModule jit__train_step, is_scheduled=true

%triton_gemm (p0: bf16[64,64], p1: bf16[64,64]) -> bf16[64,64] {{
  %p0 = bf16[64,64]{{1,0}} parameter(0)
  %p1 = bf16[64,64]{{1,0}} parameter(1)
  ROOT %dot.1 = bf16[64,64]{{1,0}} dot(%p0, %p1), lhs_contracting_dims={{1}}, {MLP}
}}

%fused_scores (p0: bf16[64,64], p1: bf16[64,64]) -> f32[64,64] {{
  %p0.1 = bf16[64,64]{{1,0}} parameter(0)
  %p1.1 = bf16[64,64]{{1,0}} parameter(1)
  ROOT %dot.2 = f32[64,64]{{1,0}} dot(%p0.1, %p1.1), lhs_contracting_dims={{1}}, {ATTN}
}}

%fused_transpose (p0: bf16[64,64]) -> bf16[64,64] {{
  %p0.2 = bf16[64,64]{{1,0}} parameter(0)
  %bitcast.1 = bf16[64,64]{{1,0}} bitcast(%p0.2)
  ROOT %transpose.1 = bf16[64,64]{{0,1}} transpose(%bitcast.1), dimensions={{1,0}}
}}

%fused_transpose_scale (p0: bf16[64,64]) -> bf16[64,64] {{
  %p0.5 = bf16[64,64]{{1,0}} parameter(0)
  %transpose.2 = bf16[64,64]{{0,1}} transpose(%p0.5), dimensions={{1,0}}
  ROOT %multiply.2 = bf16[64,64]{{0,1}} multiply(%transpose.2, %transpose.2)
}}

%fused_adam (p0: f32[64], p1: f32[64]) -> f32[64] {{
  %p0.3 = f32[64]{{0}} parameter(0)
  %p1.3 = f32[64]{{0}} parameter(1)
  ROOT %multiply.1 = f32[64]{{0}} multiply(%p0.3, %p1.3), {ADAM}
}}

%add_f32 (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%a, %b)
}}

%async_gather (p0: bf16[8,64]) -> bf16[64,64] {{
  %p0.4 = bf16[8,64]{{1,0}} parameter(0)
  ROOT %all-gather.1 = bf16[64,64]{{1,0}} all-gather(%p0.4), dimensions={{0}}
}}

%body (t: (s32[], bf16[64,64])) -> (s32[], bf16[64,64]) {{
  %t = (s32[], bf16[64,64]{{1,0}}) parameter(0)
  %x = bf16[64,64]{{1,0}} get-tuple-element(%t), index=1
  %gemm_fusion_dot.2 = bf16[64,64]{{1,0}} fusion(%x, %x), kind=kCustom, calls=%triton_gemm, {MLP}
  %i = s32[] get-tuple-element(%t), index=0
  ROOT %tuple.1 = (s32[], bf16[64,64]{{1,0}}) tuple(%i, %gemm_fusion_dot.2)
}}

%cond (t: (s32[], bf16[64,64])) -> pred[] {{
  %t.1 = (s32[], bf16[64,64]{{1,0}}) parameter(0)
  %i.1 = s32[] get-tuple-element(%t.1), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}}

ENTRY %main (x: bf16[64,64], g: f32[64], t: (s32[], bf16[64,64])) -> f32[] {{
  %x.1 = bf16[64,64]{{1,0}} parameter(0)
  %g = f32[64]{{0}} parameter(1)
  %t.2 = (s32[], bf16[64,64]{{1,0}}) parameter(2)
  %gemm_fusion_dot.1 = bf16[64,64]{{1,0}} fusion(%x.1, %x.1), kind=kCustom, calls=%triton_gemm,
    backend_config={{"fusion_backend_config":{{"kind":"__triton_gemm"}}}}, {MLP}
  %cublas-gemm.1 = (bf16[64,64]{{1,0}}, s8[8]{{0}}) custom-call(%x.1, %x.1),
    custom_call_target="__cublas$gemm", {MLP}
  %fmha.1 = (bf16[64,64]{{1,0}}, u8[0]{{0}}) custom-call(%x.1, %x.1, %x.1),
    custom_call_target="__cudnn$fmhaSoftmax", {ATTN}
  %scores_fusion = f32[64,64]{{1,0}} fusion(%x.1, %x.1), kind=kCustom, calls=%fused_scores, {ATTN}
  %transpose_fusion = bf16[64,64]{{0,1}} fusion(%x.1), kind=kLoop, calls=%fused_transpose
  %scale_fusion = bf16[64,64]{{0,1}} fusion(%x.1), kind=kLoop, calls=%fused_transpose_scale
  %copy-start.1 = (bf16[64,64]{{1,0}}, bf16[64,64]{{1,0}}, u32[]) copy-start(%x.1)
  %copy-done.1 = bf16[64,64]{{1,0}} copy-done(%copy-start.1)
  %all-reduce-start.1 = f32[64]{{0}} all-reduce-start(%g), replica_groups={{}},
    to_apply=%add_f32, {ADAM}
  %all-reduce-done.1 = f32[64]{{0}} all-reduce-done(%all-reduce-start.1)
  %async-start.1 = ((bf16[8,64]{{1,0}}), bf16[64,64]{{1,0}}) async-start(%x.1), calls=%async_gather
  %adam_fusion = f32[64]{{0}} fusion(%g, %all-reduce-done.1), kind=kLoop, calls=%fused_adam, {ADAM}
  %while.1 = (s32[], bf16[64,64]{{1,0}}) while(%t.2), condition=%cond, body=%body
  %zero = f32[] constant(0)
  ROOT %reduce.1 = f32[] reduce(%adam_fusion, %zero), dimensions={{0}}, to_apply=%add_f32
}}
""".replace(",\n    ", ", ")


def test_a_gpu_programs_kernels_are_classed_by_what_they_compute():
  classes = profile.op_classes(GPU_HLO)
  launched = {n: classes[n] for n in (
      "gemm_fusion_dot.1", "gemm_fusion_dot.2", "cublas-gemm.1", "fmha.1", "scores_fusion",
      "transpose_fusion", "scale_fusion", "copy-start.1", "copy-done.1", "all-reduce-start.1",
      "all-reduce-done.1", "async-start.1", "adam_fusion", "reduce.1")}
  assert launched == {
      "gemm_fusion_dot.1": ("matmul", "layer_N/mlp"),
      "gemm_fusion_dot.2": ("matmul", "layer_N/mlp"),  # inside a while loop's body
      "cublas-gemm.1": ("matmul", "layer_N/mlp"),
      "fmha.1": ("attention", "attention/attention._kernel"),  # cuDNN
      "scores_fusion": ("attention", "attention/attention._kernel"),  # the reference's dot
      "transpose_fusion": ("copy", "?"),
      "scale_fusion": ("fusion", "?"),  # a transpose, and a multiply: it computes
      "copy-start.1": ("copy", "?"), "copy-done.1": ("copy", "?"),
      # a collective wins over the scope it is in
      "all-reduce-start.1": ("collective", "branch_0_fun/optimizer"),
      "all-reduce-done.1": ("collective", "?"),
      "async-start.1": ("collective", "?"),  # an async wrapper: by what it wraps
      "adam_fusion": ("optimizer", "branch_0_fun/optimizer"),
      "reduce.1": ("fusion", "?")}
  # Containers and what launches no kernel are not classed: their ops are.
  for name in ("while.1", "t.2", "zero", "tuple.1", "bitcast.1"):
    assert name not in classes
  assert profile.module_name(GPU_HLO) == "jit__train_step"


def _xspace(planes: str, names: list) -> str:
  """An XSpace text proto; `names` are the event and stat names, by metadata id from 1."""
  meta = "".join(f"  event_metadata {{ key: {i} value {{ id: {i} name: \"{n}\" }} }}\n"
                 f"  stat_metadata {{ key: {i} value {{ id: {i} name: \"{n}\" }} }}\n"
                 for i, n in enumerate(names, 1))
  return planes.replace("META", meta)


def test_a_gpu_trace_is_read_from_its_streams_per_step():
  """Two steps on /device:GPU:0: kernels on two streams (overlapping), a memcpy with no HLO op,
  kernels of another program (by stat and by annotation), the batch's host-to-device copy before
  the step's first op (it opens no idle time), and the derived `XLA Ops` line XProf adds (not
  counted twice); /device:GPU:1 is another device's."""
  names = ["tjax_step", "hlo_op", "hlo_module", "jit__train_step", "jit_other",
           "sm90_xmma_gemm", "cudnn_fmha", "ncclDevKernel", "MemcpyDtoD", "annotation",
           "gemm_fusion_dot.1", "fmha.1", "all-reduce-start.1", "adam_fusion", "MemcpyHtoD",
           "gemm_fusion_dot.1:#hlo_op=gemm_fusion_dot.1,hlo_module=jit_other#",
           "gemm_fusion_dot.1:#hlo_op=gemm_fusion_dot.1,hlo_module=jit__train_step#"]
  ids = {n: i for i, n in enumerate(names, 1)}
  ms = 10**9  # ps per ms

  def ev(name, start_ms, dur_ms, op=None, module="jit__train_step", annotated=False):
    stats = ""
    if op and not annotated:
      stats += f"stats {{ metadata_id: {ids['hlo_op']} ref_value: {ids[op]} }} "
      stats += f"stats {{ metadata_id: {ids['hlo_module']} ref_value: {ids[module]} }} "
    if annotated:  # no hlo_op stat: the op is named in the kernel's annotation
      note = names[-1] if module == "jit__train_step" else names[-2]
      stats += f"stats {{ metadata_id: {ids['annotation']} ref_value: {ids[note]} }} "
    return (f"events {{ metadata_id: {ids[name]} offset_ps: {int(start_ms * ms)} "
            f"duration_ps: {int(dur_ms * ms)} {stats}}}")

  step = lambda t: [  # one step's kernels, from t ms
      ("Stream #7(compute)", ev("sm90_xmma_gemm", t + 1, 2, "gemm_fusion_dot.1")),
      ("Stream #7(compute)", ev("cudnn_fmha", t + 3, 1, "fmha.1")),
      ("Stream #13(nccl)", ev("ncclDevKernel", t + 2, 3, "all-reduce-start.1")),
      ("Stream #7(compute)", ev("MemcpyDtoD", t + 6, 0.5)),
      ("Stream #7(compute)", ev("sm90_xmma_gemm", t + 7, 1, "gemm_fusion_dot.1",
                                module="jit_other")),
      ("Stream #7(compute)", ev("sm90_xmma_gemm", t + 6.5, 0.25, annotated=True)),
      ("Stream #7(compute)", ev("sm90_xmma_gemm", t + 6.75, 2, annotated=True,
                                module="jit_other")),
      ("Stream #7(compute)", ev("MemcpyHtoD", t + 0.2, 0.3)),
      ("XLA Ops", ev("adam_fusion", t + 1, 5))]
  lines = {}
  for t in (0, 20):
    for line, e in step(t):
      lines.setdefault(line, []).append(e)
  gpu0 = "".join(f"  lines {{ id: {i} name: \"{n}\" timestamp_ns: 0 {' '.join(es)} }}\n"
                 for i, (n, es) in enumerate(lines.items(), 1))
  gpu1 = f"  lines {{ id: 1 name: \"Stream #7\" {ev('cudnn_fmha', 1, 9, 'fmha.1')} }}\n"
  host = (f"  lines {{ id: 1 name: \"python\" timestamp_ns: 0 {ev('tjax_step', 0, 10)} "
          f"{ev('tjax_step', 20, 10)} }}\n")
  text = _xspace(f"planes {{ id: 1 name: \"/device:GPU:1\"\n{gpu1}META}}\n"
                 f"planes {{ id: 2 name: \"/device:GPU:0\"\n{gpu0}META}}\n"
                 f"planes {{ id: 3 name: \"/host:CPU\"\n{host}META}}\n", names)
  report = profile.breakdown(profiler.ProfileData.from_text_proto(text).planes, GPU_HLO)
  # Per step: ops from 1 to 6.75 ms; busy [1, 5] and [6, 6.75]; the other program's kernel at
  # 7 ms is not this step's.
  assert report["where"] == "/device:GPU:0" and report["steps"] == 2
  assert report["window_ms"] == pytest.approx(5.75)
  assert report["busy_ms"] == pytest.approx(4.75)
  assert report["idle_ms"] == pytest.approx(1.0)
  assert report["classes_ms"] == pytest.approx({
      "matmul": 2.25, "attention": 1.0, "collective": 3.0, "copy": 0.5, "optimizer": 0.0,
      "fusion": 0.0})
  assert report["top"][0] == ["all-reduce-start.1", "collective", "branch_0_fun/optimizer",
                              3.0, 1.0]
  assert ["gemm_fusion_dot.1", "matmul", "layer_N/mlp", 2.25, 2.0] in report["top"]
  assert ["MemcpyDtoD", "copy", "?", 0.5, 1.0] in report["top"]
  assert report["places"][:2] == [["branch_0_fun/optimizer", "collective", 3.0],
                                  ["layer_N/mlp", "matmul", 2.25]]
  assert "profile: 2 step(s) on /device:GPU:0" in profile.table(report)


def test_a_real_cpu_step_is_accounted_for(tmp_path):
  """gpt2.py:tiny traced here: every op of the step's program on device 0 has a class, the
  classes the step must have are there, and the ops' span lies within the host's steps."""
  config = config_lib.load("configs/gpt2.py:tiny", ["model.num_layers=2"])
  # As benchmark runs: compiled here, not loaded from the suite's persistent cache, whose key
  # leaves out the metadata the classes read (an entry from before a scope was added lacks it).
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    runner = benchmark.JaxRunner(config)
  finally:
    jax.config.update("jax_enable_compilation_cache", True)
  report = benchmark._profile(runner, 2, str(tmp_path))  # pylint: disable=protected-access
  hlo = runner.trainer.lower_train_step().compile().as_text()
  classes = profile.op_classes(hlo)
  (trace,) = glob.glob(os.path.join(tmp_path, "**", "*.xplane.pb"), recursive=True)
  unclassed, host_ns = set(), []
  for plane in profiler.ProfileData.from_file(trace).planes:
    for line in plane.lines:
      for e in line.events:
        stats = dict(e.stats)
        if e.name == profile.STEP:
          host_ns.append(e.duration_ns)
        if stats.get("hlo_module") == "jit__train_step" and stats.get("device_ordinal") == 0:
          unclassed.add(stats["hlo_op"])
  containers = {i.name for i in map(hlo_lib.instruction, hlo.splitlines())
                if i and i.op in ("while", "conditional", "call")}
  assert unclassed and not unclassed - set(classes) - containers
  c = report["classes_ms"]
  assert report["steps"] == 2
  assert c["matmul"] > 0 and c["attention"] > 0 and c["optimizer"] > 0 and c["fusion"] > 0
  assert (c["collective"] > 0) == (runner.trainer.mesh.size > 1)  # the gradients' all-reduce
  assert report["busy_ms"] + report["idle_ms"] == pytest.approx(report["window_ms"], abs=0.01)
  assert report["busy_ms"] <= sum(c.values()) + 0.01
  assert len(host_ns) == 2 and report["window_ms"] <= sum(host_ns) / 2 / 1e6  # within the steps
  top = [t[3] for t in report["top"]]
  assert top == sorted(top, reverse=True) and len(top) == 12
  places = {(p, cls): t for p, cls, t in report["places"]}
  assert places[("layer_N/mlp", "matmul")] > 0  # both layers' MLP matmuls, summed


def test_a_steps_span_ends_with_its_last_op_to_end():
  """A long collective on one stream and a short kernel starting later on another: the span is
  the collective's, and no idle time goes negative."""
  names = ["tjax_step", "hlo_op", "nccl", "gemm", "all-reduce-start.1", "gemm_fusion_dot.1"]
  ms = 10**9
  ev = lambda name, op, start, dur: (
      f"events {{ metadata_id: {names.index(name) + 1} offset_ps: {start * ms} "
      f"duration_ps: {dur * ms} stats {{ metadata_id: 2 ref_value: {names.index(op) + 1} }} }}")
  text = _xspace(
      f"planes {{ id: 1 name: \"/device:GPU:0\"\n"
      f"  lines {{ id: 1 name: \"Stream #1\" {ev('nccl', 'all-reduce-start.1', 0, 10)} }}\n"
      f"  lines {{ id: 2 name: \"Stream #2\" {ev('gemm', 'gemm_fusion_dot.1', 1, 1)} }}\n"
      f"META}}\n"
      f"planes {{ id: 2 name: \"/host:CPU\"\n  lines {{ id: 1 name: \"python\" "
      f"events {{ metadata_id: 1 offset_ps: 0 duration_ps: {20 * ms} }} }}\nMETA}}\n", names)
  report = profile.breakdown(profiler.ProfileData.from_text_proto(text).planes, GPU_HLO)
  assert (report["window_ms"], report["busy_ms"], report["idle_ms"]) == (10.0, 10.0, 0.0)
  assert report["classes_ms"]["collective"] == 10.0 and report["classes_ms"]["matmul"] == 1.0
