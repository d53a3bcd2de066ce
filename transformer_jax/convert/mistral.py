"""Mistral (`MistralForCausalLM`, model_type "mistral") <-> DecoderLM: Llama's tables with a
sliding window on every layer (config.json's sliding_window; null = none, absent = 4096 as
MistralConfig's default) and no biases."""

from transformer_jax.convert import llama

MODEL_TYPE = "mistral"
ARCHITECTURE = "MistralForCausalLM"
BASE_PREFIX, IGNORED, MODEL_FAMILY = llama.BASE_PREFIX, llama.IGNORED, llama.MODEL_FAMILY
FIXED = {**llama.FIXED, "use_bias": False, "window_pattern": ""}
READS = ("attention_window",)
REQUIRE, GLOBAL, LAYER = llama.REQUIRE, llama.GLOBAL, llama.LAYER
# MistralConfig's defaults where they are not Llama's.
DEFAULTS = {"num_key_value_heads": 8, "intermediate_size": 14336,
            "max_position_embeddings": 4096 * 32}
CONFIG = tuple((ours, key, DEFAULTS.get(key, default)) for ours, key, default in llama.CONFIG)


def read(hf):
  return {"attention_window": int(hf.get("sliding_window", 4096) or 0), **llama.read_rope(hf)}


def write(cfg):
  return {"sliding_window": cfg.attention_window or None, "attention_dropout": 0.0,
          "rope_parameters": llama.write_rope(cfg)}
