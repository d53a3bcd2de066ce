"""Quantized training: `model.quantization=int8|fp8` runs the dense and attention projections
(ops.dense with `quant=`) through qwix's quantized dot_general, forward and backward.

Forward: the activations (per row) and the weights (per output column) are quantized with
absmax scales and multiplied as int8 (int32 accumulation) or fp8 (e4m3); backward: the incoming
gradient is quantized too (int8, or fp8 e5m2) and multiplied with the forward's quantized
operands, as qwix's QtProvider does for a QtRule(weight_qtype=act_qtype=bwd_qtype). The fp32
master weights, the optimizer and the checkpoint layout are unchanged: a checkpoint trained
either way loads with quantization on or off. fp8 has no fp8 matmul on CPU (XLA computes it in
fp32 after rounding the operands to fp8): numerics as on hardware, no speed-up. A known limit
of the backward pass (qwix's, int8): a weight column or activation row of exact zeros gets the
scale 1, which the gradient is multiplied by before it is quantized, so that entry swamps its
row's absmax (a zero weight column: input-gradient error 40 % instead of 0.9 %); training from
a random init makes none, a pruned or imported checkpoint could.
"""

import jax.numpy as jnp

# mode -> (forward operands' type, backward gradient's type)
QTYPES = {"int8": (jnp.int8, jnp.int8), "fp8": (jnp.float8_e4m3fn, jnp.float8_e5m2)}
MODES = ("none",) + tuple(QTYPES)

_MATMUL = (((1,), (0,)), ((), ()))  # [rows, in] x [in, out]


def _qt():
  # QtProvider's own building block: qwix applies it through module interception, which would
  # also catch the attention kernels' and the MoE experts' dots; here it is applied to exactly
  # the projections that ask for it. Imported on first use: qwix takes ~0.7 s to import, which
  # every unquantized run's start would pay.
  from qwix._src.core import dot_general_qt  # pylint: disable=g-import-not-at-top
  return dot_general_qt


def config(mode: str):
  """qwix's forward-and-backward configuration (DotGeneralQtConfig) for `mode` (int8 | fp8)."""
  if mode not in QTYPES:
    raise ValueError(f"quantization {mode!r} is not one of {', '.join(MODES)}")
  fwd, bwd = QTYPES[mode]
  return _qt().DotGeneralQtConfig(lhs_qtype=fwd, rhs_qtype=fwd, dlhs_grad_qtype=bwd,
                                   drhs_grad_qtype=bwd)


def matmul(x_RI, w_IO, mode: str):
  """x @ w with both operands (and, in the backward pass, the gradient) quantized by `mode`;
  the result in x's dtype."""
  y = _qt().dot_general_qt(x_RI, w_IO, _MATMUL, config(mode))
  return y.astype(x_RI.dtype)
