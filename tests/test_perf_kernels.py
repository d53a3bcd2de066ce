"""perf/kernels.py reads what a compiled program runs from its optimized HLO text."""

from transformer_jax.perf import kernels

HLO = """HloModule jit__train_step, entry_computation_layout={()->f32[]}

%gemm_fusion (parameter_0: bf16[8,16], parameter_1: bf16[16,4]) -> f32[8,4] {
  %parameter_0 = bf16[8,16]{1,0} parameter(0)
  %parameter_1 = bf16[16,4]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,4]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(_train_step)/jvp(DecoderLM)/layer_3/mlp/dot_general"}
}

%wide (p0: f32[4,4], p1: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %p1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.2 = f32[4,4]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(_train_step)/transpose(jvp(DecoderLM))/layer_0/attention/attention._kernel/BTNGK,BSNK->BNGTS/dot_general"}
}

ENTRY %main (a: bf16[8,16], b: bf16[16,4], c: f32[4,4]) -> f32[] {
  %a = bf16[8,16]{1,0} parameter(0)
  %b = bf16[16,4]{1,0} parameter(1)
  %c = f32[4,4]{1,0} parameter(2)
  %fusion.1 = f32[8,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %fusion.2 = f32[4,4]{1,0} fusion(%c, %c), kind=kOutput, calls=%wide
  %fusion.3 = f32[4,4]{1,0} fusion(%c), kind=kLoop, calls=%wide
  %cublas = (bf16[8,4]{1,0}, s8[64]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(_train_step)/jvp(DecoderLM)/layer_1/attention/dot_general"}
  %fmha = (bf16[8,4]{1,0}) custom-call(%a, %b), custom_call_target="__cudnn$fmhaSoftmax"
  %fmha.1 = (bf16[8,4]{1,0}) custom-call(%a, %b), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config":{"mask_type":"CAUSAL","sliding_window_length":0}}
  %fmha.2 = (bf16[8,4]{1,0}) custom-call(%a, %b), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config":{"mask_type":"CAUSAL","sliding_window_length":512}}
  ROOT %r = f32[] constant(0)
}
"""


def test_census_counts_matmuls_by_dtypes_and_place_fusions_and_custom_calls():
  r = kernels.census(HLO)
  assert r["matmuls"] == {"bf16xbf16->f32": 1, "f32xf32->f32": 1, "bf16xbf16->bf16": 1}
  assert r["matmuls_by_place"] == {"bf16xbf16->f32 layer_N/mlp": 1,
                                   "f32xf32->f32 attention/attention._kernel": 1,
                                   "bf16xbf16->bf16 layer_N/attention": 1}
  assert r["custom_calls"] == {"__cublas$gemm": 1, "__cudnn$fmhaSoftmax": 2,
                               "__cudnn$fmhaSoftmax window=512": 1}
  assert r["fusions"] == {"__triton_nested_gemm_fusion": 1, "kOutput": 1, "kLoop": 1}
  assert kernels.wide_matmuls(r, "bfloat16") == {"attention/attention._kernel": 1}
  assert kernels.wide_matmuls(r, "float32") == {}
