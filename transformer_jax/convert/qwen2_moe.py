"""Qwen2-MoE (`Qwen2MoeForCausalLM`, model_type "qwen2_moe") <-> DecoderLM: Llama's attention,
norms and embeddings (llama.ATTENTION), Llama's dense FFN in the dense layers and, in the MoE
ones, the experts' rows (experts.py) with a shared expert behind a sigmoid gate.

A layer has the MoE FFN where (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers:
our moe_every (a pattern that is not every k-th layer is refused). Dense layers are
intermediate_size wide (our d_ff), experts moe_intermediate_size (our expert_d_ff), the shared
expert shared_expert_intermediate_size = num_shared_experts x expert_d_ff (a width that is not a
multiple of the experts' is refused). norm_topk_prob is our router_renormalize, qkv_bias
(biases on q/k/v, not o_proj: Qwen1.5-MoE's default) our model.qkv_bias. Sliding-window layers
are refused.
"""

from transformer_jax.convert import experts
from transformer_jax.convert import llama

MODEL_TYPE = "qwen2_moe"
ARCHITECTURE = "Qwen2MoeForCausalLM"
BASE_PREFIX, IGNORED, MODEL_FAMILY = llama.BASE_PREFIX, llama.IGNORED, llama.MODEL_FAMILY
FIXED = {**llama.FIXED, "use_bias": False, "shared_expert_gate": True}
READS = ("qkv_bias",)  # read() sets it (tables.PLAIN keeps the other families' False)
# Qwen2MoeConfig's defaults where they are not Llama's.
DEFAULTS = {"num_hidden_layers": 24, "hidden_size": 2048, "num_attention_heads": 16,
            "num_key_value_heads": 16, "intermediate_size": 5632, "vocab_size": 151936,
            "max_position_embeddings": 32768}
CONFIG = tuple((ours, key, DEFAULTS.get(key, default)) for ours, key, default in llama.CONFIG) + (
    ("num_experts", "num_experts", 60),
    ("experts_per_token", "num_experts_per_tok", 4),
    ("router_renormalize", "norm_topk_prob", False),
)
REQUIRE = llama.REQUIRE + (
    ("use_sliding_window", (False,), False),
)
NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}  # per-expert tensors


def moe_every(hf) -> int:
  """Our moe_every for the checkpoint's MoE layers (see the module docstring)."""
  n, step = hf.get("num_hidden_layers", 24), hf.get("decoder_sparse_step", 1)
  if step < 1:
    raise ValueError(f"decoder_sparse_step={step} (must be >= 1)")
  dense = set(hf.get("mlp_only_layers") or ())
  theirs = [i not in dense and (i + 1) % step == 0 for i in range(n)]
  if not any(theirs) or not hf.get("num_experts", 60):  # (model.moe_every past the layers)
    raise ValueError(f"num_experts={hf.get('num_experts', 60)}, decoder_sparse_step={step} and "
                     f"mlp_only_layers={sorted(dense)} leave none of the {n} layers an MoE "
                     f"layer: a dense model, which a Qwen2-MoE import does not take")
  for every in range(1, n + 1):
    if theirs == [(i + 1) % every == 0 for i in range(n)]:
      return every
  raise ValueError(f"mlp_only_layers={sorted(dense)} with decoder_sparse_step={step} leaves MoE "
                   f"layers that are not every k-th layer (our model.moe_every)")


def read(hf):
  sliding = sorted({t for t in hf.get("layer_types") or () if t != "full_attention"})
  if sliding:
    raise ValueError(f"layer_types {', '.join(sliding)} is not supported (only full_attention)")
  f = hf.get("moe_intermediate_size", 1408)
  shared = hf.get("shared_expert_intermediate_size", 5632)
  if shared <= 0 or shared % f:
    raise ValueError(f"shared_expert_intermediate_size={shared} is not a positive multiple of "
                     f"moe_intermediate_size={f} (model.num_shared_experts x model.expert_d_ff)")
  return {"expert_d_ff": f, "num_shared_experts": shared // f, "moe_every": moe_every(hf),
          "qkv_bias": bool(hf.get("qkv_bias", True)),
          **experts.read_aux_loss(hf, hf.get("num_experts_per_tok", 4)), **llama.read_rope(hf)}


def write(cfg):
  if not cfg.num_experts or not cfg.num_shared_experts:
    raise ValueError(f"Qwen2-MoE has experts and a shared expert (model.num_experts="
                     f"{cfg.num_experts}, model.num_shared_experts={cfg.num_shared_experts})")
  f = cfg.expert_d_ff or cfg.d_ff
  return {"moe_intermediate_size": f, "shared_expert_intermediate_size": cfg.num_shared_experts * f,
          "decoder_sparse_step": cfg.moe_every, "mlp_only_layers": [], "qkv_bias": cfg.qkv_bias,
          "attention_dropout": 0.0, "rope_parameters": llama.write_rope(cfg),
          **experts.write_aux_loss(cfg)}


def complete(tensors: dict) -> dict:
  return experts.fuse(tensors, NAMES)


def to_checkpoint(tensors: dict) -> dict:
  return experts.split(tensors, NAMES)


_FFN = "model.layers.{i}.mlp"
GLOBAL = llama.GLOBAL
LAYER = (llama.ATTENTION + tuple(p._replace(when="dense") for p in llama.MLP if not p.when)
         + experts.rows(_FFN) + experts.shared_rows(_FFN))
