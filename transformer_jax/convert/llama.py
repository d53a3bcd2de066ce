"""Llama (`LlamaForCausalLM`, model_type "llama") <-> DecoderLM: the config and parameter tables.

Projections are torch nn.Linear weights, [out, in] (transposed to our [in, out]); grouped-query
attention (num_key_value_heads); rotary positions in HF's rotate_half convention (each head split
in two halves, as our layers.rotary: HF's checkpoints are already permuted from Meta's interleaved
layout); RMSNorm; SwiGLU gate/up/down; untied lm_head unless tie_word_embeddings. Biases exist
only with attention_bias and mlp_bias (both, as our single model.use_bias).
"""

import math

from transformer_jax import config as config_lib
from transformer_jax.convert.tables import P

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"
BASE_PREFIX = "model."
IGNORED = (r"\.rotary_emb\.inv_freq$",)  # a buffer some old checkpoints saved

MODEL_FAMILY = "decoder"  # our model.family
FIXED = {"position": "rotary", "norm": "rmsnorm", "norm_position": "pre",
         "activation": "swiglu"}
CONFIG = (
    ("num_layers", "num_hidden_layers", 32),
    ("d_model", "hidden_size", 4096),
    ("num_heads", "num_attention_heads", 32),
    ("num_kv_heads", "num_key_value_heads", None),  # None: num_heads, as our 0
    ("head_dim", "head_dim", None),  # None: hidden_size / heads, as our 0
    ("d_ff", "intermediate_size", 11008),
    ("vocab_size", "vocab_size", 32000),
    ("max_len", "max_position_embeddings", 2048),
    ("norm_eps", "rms_norm_eps", 1e-6),
    ("init_std", "initializer_range", 0.02),
    ("tie_embeddings", "tie_word_embeddings", False),
)
REQUIRE = (
    ("hidden_act", ("silu",), "silu"),
)


# Hugging Face's rope_parameters keys -> ours, for the scalings we implement (models/layers.py).
ROPE_KEYS = {"factor": "rope_factor", "original_max_position_embeddings": "rope_original_max_len",
             "low_freq_factor": "rope_low_freq_factor", "high_freq_factor": "rope_high_freq_factor",
             "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow",
             "attention_factor": "rope_attention_factor"}
ROPE_TYPES = {"default": "none", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn",
              "llama3": "llama3"}


def read_rope(hf) -> dict:
  """Our rope_* values from config.json: transformers 5's rope_parameters, or the older
  rope_scaling with a top-level rope_theta. A config.json with both, saying different things, is
  refused (transformers reads rope_scaling then)."""
  params, scaling = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
  same = lambda r: {("rope_type" if k == "type" else k): v for k, v in r.items()
                    if k != "rope_theta"}
  if params and scaling and same(params) != same(scaling):
    raise ValueError(f"rope_parameters {params} and rope_scaling {scaling} differ; keep one")
  rope = params or scaling
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ValueError(f"rope_type={kind!r} is not supported; only {', '.join(ROPE_TYPES)}")
  if rope.get("partial_rotary_factor", 1.0) != 1.0 or rope.get("truncate", True) is False:
    raise ValueError("partial_rotary_factor != 1 or truncate=false is not supported")
  max_len = hf.get("max_position_embeddings", 2048)
  if kind in ("llama3", "yarn"):  # the pretraining length as transformers reads it: top-level
    rope = dict(rope, original_max_position_embeddings=(  # (Phi-3's), rope's, else the table's
        hf.get("original_max_position_embeddings")
        or rope.get("original_max_position_embeddings") or max_len))
  needs = {"linear": ("factor",), "dynamic": ("factor",),
           "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(kind, ())
  missing = [key for key in needs if rope.get(key) is None]
  if missing:
    raise ValueError(f"rope_type={kind!r} needs {', '.join(missing)} in rope_parameters")
  out = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
         "rope_scaling": ROPE_TYPES[kind]}
  out.update({ours: float(rope[key]) for key, ours in ROPE_KEYS.items()  # (what HF reads)
              if rope.get(key) is not None and ours in config_lib.ROPE_READS.get(out[
                  "rope_scaling"], ())})
  if kind == "yarn":
    original = rope["original_max_position_embeddings"]
    out.update(rope_factor=float(rope.get("factor") or max_len / original),
               rope_original_max_len=original)
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if rope.get("attention_factor") is None and mscale and mscale_all_dim:  # DeepSeek's form
      f = out["rope_factor"]
      m = lambda s: 0.1 * s * math.log(f) + 1.0 if f > 1 else 1.0
      out["rope_attention_factor"] = m(mscale) / m(mscale_all_dim)
  if "rope_original_max_len" in out:
    out["rope_original_max_len"] = int(out["rope_original_max_len"])
  return out


def write_rope(cfg) -> dict:
  """rope_parameters for our resolved ModelConfig."""
  kind = {v: k for k, v in ROPE_TYPES.items()}[cfg.rope_scaling]
  out = {"rope_type": kind, "rope_theta": cfg.rope_theta}
  keys = {"linear": ("factor",), "dynamic": ("factor",),
          "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                     "original_max_position_embeddings"),
          "yarn": ("factor", "beta_fast", "beta_slow", "original_max_position_embeddings",
                   "attention_factor")}.get(kind, ())
  for key in keys:
    value = getattr(cfg, ROPE_KEYS[key])
    if key == "original_max_position_embeddings":
      value = value or cfg.max_len
    if value or key != "attention_factor":  # 0 = HF's own default
      out[key] = value
  return out


def read(hf):
  bias = hf.get("attention_bias", False)
  if bias != hf.get("mlp_bias", False):
    raise ValueError("attention_bias != mlp_bias: our model.use_bias covers both")
  window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
  if window:  # e.g. a Mistral checkpoint read with --family=llama
    raise ValueError(f"sliding_window={window}: Llama attends to every position (import it as "
                     f"mistral)")
  return {"use_bias": bool(bias), **read_rope(hf)}


def write(cfg):
  return {"attention_bias": cfg.use_bias, "mlp_bias": cfg.use_bias, "attention_dropout": 0.0,
          "rope_parameters": write_rope(cfg)}


GLOBAL = (
    P("embed/tokens", "model.embed_tokens.weight", 1, vocab=0),
    P("final_norm/scale", "model.norm.weight"),
    P("embed/logits", "lm_head.weight", 1, linear=True, vocab=1, when="untied"),
)
ATTENTION = (  # {i}: the layer index; the norms included (Mixtral and Qwen2-MoE reuse them)
    P("attention_norm/scale", "model.layers.{i}.input_layernorm.weight"),
    P("attention/query", "model.layers.{i}.self_attn.q_proj.weight", 1, linear=True),
    P("attention/key", "model.layers.{i}.self_attn.k_proj.weight", 1, linear=True),
    P("attention/value", "model.layers.{i}.self_attn.v_proj.weight", 1, linear=True),
    P("attention/out", "model.layers.{i}.self_attn.o_proj.weight", 2, linear=True),
    P("attention/query_bias", "model.layers.{i}.self_attn.q_proj.bias", when="qkv_bias"),
    P("attention/key_bias", "model.layers.{i}.self_attn.k_proj.bias", when="qkv_bias"),
    P("attention/value_bias", "model.layers.{i}.self_attn.v_proj.bias", when="qkv_bias"),
    P("attention/out_bias", "model.layers.{i}.self_attn.o_proj.bias", when="bias"),
    P("mlp_norm/scale", "model.layers.{i}.post_attention_layernorm.weight"),
)
MLP = (
    P("mlp/gate", "model.layers.{i}.mlp.gate_proj.weight", 1, linear=True),
    P("mlp/up", "model.layers.{i}.mlp.up_proj.weight", 1, linear=True),
    P("mlp/down", "model.layers.{i}.mlp.down_proj.weight", 1, linear=True),
    P("mlp/gate_bias", "model.layers.{i}.mlp.gate_proj.bias", when="bias"),
    P("mlp/up_bias", "model.layers.{i}.mlp.up_proj.bias", when="bias"),
    P("mlp/down_bias", "model.layers.{i}.mlp.down_proj.bias", when="bias"),
)
LAYER = ATTENTION + MLP
