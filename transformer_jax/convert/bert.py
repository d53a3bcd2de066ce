"""BERT (`BertForMaskedLM` or `BertForPreTraining`, model_type "bert") <-> EncoderLM: the config
and parameter tables.

Post-norm LayerNorm blocks, learned positions, token-type embeddings and a LayerNorm after the
embedding sum; projections are torch nn.Linear weights ([out, in], transposed to our [in, out]);
the MLM head is dense + GELU + LayerNorm, then the tied token table with an output bias
(cls.predictions.bias). hidden_act "gelu" is the exact erf GELU (our activation "gelu_exact");
"gelu_new" / "gelu_pytorch_tanh" the tanh approximation (our "gelu"). A BertForPreTraining
checkpoint (architectures in config.json) also brings its pooler and next-sentence head: our
model.sentence_head; exporting a model with one writes BertForPreTraining.
"""

from transformer_jax.convert.tables import P

MODEL_TYPE = "bert"
ARCHITECTURE = "BertForMaskedLM"
PRETRAINING = "BertForPreTraining"  # + pooler and next-sentence head (model.sentence_head)
BASE_PREFIX = "bert."
HEAD_PREFIXES = ("cls.",)  # names of the MLM head (the rest gain BASE_PREFIX when saved without)
# The position-id buffer of old checkpoints, the pooler and NSP head (unless the model has a
# sentence head), and the decoder weight / bias tied to the token table and cls.predictions.bias.
IGNORED = (r"\.position_ids$", r"^bert\.pooler\.", r"^cls\.seq_relationship\.",
           r"^cls\.predictions\.decoder\.")
TIED_HEAD = "cls.predictions.decoder.weight"  # (checked equal to the token table)

MODEL_FAMILY = "encoder"
FIXED = {"position": "learned", "norm": "layernorm", "norm_position": "post", "use_bias": True,
         "embed_norm": True, "tie_embeddings": True}
CONFIG = (
    ("num_layers", "num_hidden_layers", 12),
    ("d_model", "hidden_size", 768),
    ("num_heads", "num_attention_heads", 12),
    ("num_kv_heads", "num_attention_heads", 12),
    ("d_ff", "intermediate_size", 3072),
    ("vocab_size", "vocab_size", 30522),
    ("max_len", "max_position_embeddings", 512),
    ("type_vocab_size", "type_vocab_size", 2),
    ("norm_eps", "layer_norm_eps", 1e-12),
    ("init_std", "initializer_range", 0.02),
)
REQUIRE = (
    ("position_embedding_type", ("absolute",), "absolute"),
    ("is_decoder", (False,), False),
    ("add_cross_attention", (False,), False),
    ("tie_word_embeddings", (True,), True),
)
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}


def read(hf):
  act = hf.get("hidden_act", "gelu")
  if act not in ACTIVATIONS:
    raise ValueError(f"hidden_act={act!r}; supported: {', '.join(map(repr, ACTIVATIONS))}")
  return {"activation": ACTIVATIONS[act], "head_dim": 0,
          "sentence_head": PRETRAINING in (hf.get("architectures") or [])}


def write(cfg):
  if cfg.activation not in ("gelu", "gelu_exact"):
    raise ValueError(f"model.activation={cfg.activation!r}: BERT has gelu or gelu_exact")
  if cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.d_model:
    raise ValueError("BERT has neither grouped-query attention nor head_dim != d_model / "
                     "num_heads")
  if cfg.type_vocab_size < 1:
    raise ValueError("BERT needs token types (model.type_vocab_size >= 1)")
  p = cfg.dropout_rate
  return {"hidden_act": "gelu" if cfg.activation == "gelu_exact" else "gelu_new",
          "hidden_dropout_prob": p, "attention_probs_dropout_prob": 0.0,
          "architectures": [PRETRAINING if cfg.sentence_head else ARCHITECTURE]}


GLOBAL = (
    P("embed/tokens", "bert.embeddings.word_embeddings.weight", 1, vocab=0),
    P("embed/positions", "bert.embeddings.position_embeddings.weight", 1),
    P("embed/types", "bert.embeddings.token_type_embeddings.weight", 1),
    P("embed/norm/scale", "bert.embeddings.LayerNorm.weight"),
    P("embed/norm/bias", "bert.embeddings.LayerNorm.bias"),
    P("mlm_dense", "cls.predictions.transform.dense.weight", 1, linear=True),
    P("mlm_dense_bias", "cls.predictions.transform.dense.bias"),
    P("mlm_norm/scale", "cls.predictions.transform.LayerNorm.weight"),
    P("mlm_norm/bias", "cls.predictions.transform.LayerNorm.bias"),
    P("mlm_bias", "cls.predictions.bias", vocab=0),
    P("pooler", "bert.pooler.dense.weight", 1, linear=True, when="sentence"),
    P("pooler_bias", "bert.pooler.dense.bias", when="sentence"),
    P("sentence", "cls.seq_relationship.weight", 1, linear=True, when="sentence"),
    P("sentence_bias", "cls.seq_relationship.bias", when="sentence"),
)
_L = "bert.encoder.layer.{i}."
LAYER = (
    P("attention/query", _L + "attention.self.query.weight", 1, linear=True),
    P("attention/query_bias", _L + "attention.self.query.bias"),
    P("attention/key", _L + "attention.self.key.weight", 1, linear=True),
    P("attention/key_bias", _L + "attention.self.key.bias"),
    P("attention/value", _L + "attention.self.value.weight", 1, linear=True),
    P("attention/value_bias", _L + "attention.self.value.bias"),
    P("attention/out", _L + "attention.output.dense.weight", 2, linear=True),
    P("attention/out_bias", _L + "attention.output.dense.bias"),
    P("attention_norm/scale", _L + "attention.output.LayerNorm.weight"),
    P("attention_norm/bias", _L + "attention.output.LayerNorm.bias"),
    P("mlp/up", _L + "intermediate.dense.weight", 1, linear=True),
    P("mlp/up_bias", _L + "intermediate.dense.bias"),
    P("mlp/down", _L + "output.dense.weight", 1, linear=True),
    P("mlp/down_bias", _L + "output.dense.bias"),
    P("mlp_norm/scale", _L + "output.LayerNorm.weight"),
    P("mlp_norm/bias", _L + "output.LayerNorm.bias"),
)
