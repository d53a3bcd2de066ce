"""T5 v1.1 (`T5ForConditionalGeneration`, model_type "t5", feed_forward_proj "gated-gelu",
untied lm_head) <-> EncoderDecoder: the config and parameter tables.

Pre-norm RMSNorm (no bias), no dense biases, unscaled attention logits (query_scale 1), inner
width num_heads * d_kv (our head_dim = d_kv), gated GELU (tanh approximation: wi_0 is the gate,
wi_1 the up projection). The relative position bias [buckets, heads] lives in block 0's
SelfAttention of each stack (our encoder/ and decoder/relative_bias). One shared token table
serves both stacks; lm_head is our embed/logits, unscaled (the untied case). The decoder starts
from decoder_start_token_id: pad (0) in Google's checkpoints, whose tokenizer has no bos; an
export writes the start its training used (objectives.decoder_start: an import's, else bos,
else pad; hf.py).
"""

from transformer_jax.convert.tables import P

MODEL_TYPE = "t5"
ARCHITECTURE = "T5ForConditionalGeneration"
BASE_PREFIX = ""  # names are saved whole
# Both stacks' embed_tokens are the shared table (older checkpoints save the copies).
IGNORED = (r"^(encoder|decoder)\.embed_tokens\.weight$",)

MODEL_FAMILY = "encdec"
FIXED = {"position": "relative", "norm": "rmsnorm", "norm_position": "pre", "activation": "geglu",
         "use_bias": False, "tie_embeddings": False, "query_scale": 1.0}
CONFIG = (
    ("num_layers", "num_layers", 6),
    ("num_decoder_layers", "num_decoder_layers", None),  # None: num_layers, as our 0
    ("d_model", "d_model", 512),
    ("num_heads", "num_heads", 8),
    ("num_kv_heads", "num_heads", 8),
    ("head_dim", "d_kv", 64),
    ("d_ff", "d_ff", 2048),
    ("vocab_size", "vocab_size", 32128),
    ("relative_buckets", "relative_attention_num_buckets", 32),
    ("relative_max_distance", "relative_attention_max_distance", 128),
    ("norm_eps", "layer_norm_epsilon", 1e-6),
)
REQUIRE = (
    ("feed_forward_proj", ("gated-gelu",), "gated-gelu"),
    ("is_encoder_decoder", (True,), True),
)
# What T5Config assumes when config.json lacks a key (REQUIRE's absent = accepted would be wrong).
HF_DEFAULTS = {"feed_forward_proj": "relu", "tie_word_embeddings": True}


def complete(tensors: dict) -> dict:
  """A checkpoint that transformers >= 5 saved itself has no lm_head.weight: that version ties
  lm_head to the shared table (tie_word_embeddings true) and says whether it scales the decoder
  output apart (scale_decoder_outputs); unscaled, the head it ran is the shared table, which we
  import as an untied copy."""
  if "lm_head.weight" not in tensors and "shared.weight" in tensors:
    return {**tensors, "lm_head.weight": tensors["shared.weight"]}
  return tensors


def read(hf):
  for key, default in HF_DEFAULTS.items():
    if key not in hf:
      raise ValueError(f"config.json lacks {key} (T5Config's default {default!r} is not "
                       f"supported)")
  # transformers < 5 scaled the decoder output by d_model**-0.5 exactly when the head was tied.
  if hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", False)):
    raise ValueError("the decoder output is scaled by d_model**-0.5 (T5 v1.0's tied head); "
                     "supported: scale_decoder_outputs=false / tie_word_embeddings=false")
  return {"init_std": float(hf.get("initializer_factor", 1.0)) * hf.get("d_model", 512) ** -0.5,
          "max_len": int(hf.get("n_positions", 512))}


def write(cfg):
  if cfg.num_kv_heads != cfg.num_heads:
    raise ValueError("T5 has no grouped-query attention")
  return {"num_decoder_layers": cfg.num_decoder_layers or cfg.num_layers,
          "dropout_rate": cfg.dropout_rate, "dense_act_fn": "gelu_new", "is_gated_act": True,
          "n_positions": cfg.max_len,
          "tie_word_embeddings": False, "scale_decoder_outputs": False}


GLOBAL = (
    P("embed/tokens", "shared.weight", 1, vocab=0),
    P("embed/logits", "lm_head.weight", 1, linear=True, vocab=1),
    P("encoder/relative_bias",
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 1),
    P("encoder/final_norm/scale", "encoder.final_layer_norm.weight"),
    P("decoder/relative_bias",
      "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", 1),
    P("decoder/final_norm/scale", "decoder.final_layer_norm.weight"),
)


def _attention(ours, hf):
  return tuple(P(f"{ours}/{o}", f"{hf}.{h}.weight", 2 if o == "out" else 1, linear=True)
               for o, h in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")))


def _mlp(hf):
  return (P("mlp/gate", f"{hf}.DenseReluDense.wi_0.weight", 1, linear=True),
          P("mlp/up", f"{hf}.DenseReluDense.wi_1.weight", 1, linear=True),
          P("mlp/down", f"{hf}.DenseReluDense.wo.weight", 1, linear=True),
          P("mlp_norm/scale", f"{hf}.layer_norm.weight"))


_E, _D = "encoder.block.{i}.layer", "decoder.block.{i}.layer"
ENCODER_LAYER = (
    P("attention_norm/scale", _E + ".0.layer_norm.weight"),
    *_attention("attention", _E + ".0.SelfAttention"),
    *_mlp(_E + ".1"),
)
DECODER_LAYER = (
    P("attention_norm/scale", _D + ".0.layer_norm.weight"),
    *_attention("attention", _D + ".0.SelfAttention"),
    P("cross_attention_norm/scale", _D + ".1.layer_norm.weight"),
    *_attention("cross_attention", _D + ".1.EncDecAttention"),
    *_mlp(_D + ".2"),
)
# (our layer path, how many, rows): the layers of each stack ({i}: the layer index).
STACKS = (
    ("encoder/layer_{i}", lambda c: c.num_layers, ENCODER_LAYER),
    ("decoder/layer_{i}", lambda c: c.num_decoder_layers or c.num_layers, DECODER_LAYER),
)
