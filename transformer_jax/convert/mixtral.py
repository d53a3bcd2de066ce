"""Mixtral (`MixtralForCausalLM`, model_type "mixtral") <-> DecoderLM with an MoE FFN in every
layer: Mistral's attention, norms, embeddings and sliding window (llama.ATTENTION; absent
sliding_window = none, as MixtralConfig's default) and the experts' rows (experts.py).

Every layer routes each token to num_experts_per_tok of num_local_experts SwiGLU experts, each
intermediate_size wide (our expert_d_ff, and d_ff), by a softmax router whose top-k weights are
renormalised (our router_renormalize), dropless as transformers computes them (our
expert_capacity_factor=0, the default; a capacity is a training choice the import leaves free).
Checkpoints name the FFN `block_sparse_moe` with one w1 (gate), w3 (up), w2 (down) per expert;
transformers' fused `mlp.experts` tensors are read too.
"""

from transformer_jax.convert import experts
from transformer_jax.convert import llama
from transformer_jax.convert import mistral

MODEL_TYPE = "mixtral"
ARCHITECTURE = "MixtralForCausalLM"
BASE_PREFIX, IGNORED, MODEL_FAMILY = llama.BASE_PREFIX, llama.IGNORED, llama.MODEL_FAMILY
FIXED = {**mistral.FIXED, "moe_every": 1, "num_shared_experts": 0, "router_renormalize": True}
READS = mistral.READS
# MixtralConfig's defaults where they are not Llama's.
DEFAULTS = {"num_key_value_heads": 8, "intermediate_size": 14336,
            "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5}
CONFIG = tuple((ours, key, DEFAULTS.get(key, default)) for ours, key, default in llama.CONFIG) + (
    ("num_experts", "num_local_experts", 8),
    ("experts_per_token", "num_experts_per_tok", 2),
)
REQUIRE = llama.REQUIRE
NAMES = {"gate": "w1", "up": "w3", "down": "w2"}  # the checkpoints' per-expert tensors


def read(hf):
  if not hf.get("num_local_experts", 8):
    raise ValueError("num_local_experts=0 (a dense model: import it as mistral)")
  # MixtralConfig's default theta, and no window where config.json names none
  return {**mistral.read({"rope_theta": 1e6, "sliding_window": None, **hf}),
          "expert_d_ff": hf.get("intermediate_size", DEFAULTS["intermediate_size"]),
          **experts.read_aux_loss(hf, hf.get("num_experts_per_tok", 2))}


def write(cfg):
  if not cfg.num_experts:
    raise ValueError("model.num_experts=0 (a dense model: export it as mistral or llama)")
  return {**mistral.write(cfg), "intermediate_size": cfg.expert_d_ff or cfg.d_ff,
          **experts.write_aux_loss(cfg)}


def complete(tensors: dict) -> dict:
  return experts.fuse({k.replace(".block_sparse_moe.", ".mlp."): v for k, v in tensors.items()},
                      NAMES)


def to_checkpoint(tensors: dict) -> dict:
  return {k.replace(".mlp.", ".block_sparse_moe."): v
          for k, v in experts.split(tensors, NAMES).items()}


GLOBAL = llama.GLOBAL
LAYER = llama.ATTENTION + experts.rows("model.layers.{i}.mlp")
