"""`convert export` beyond the weights: the special ids config.json, generation_config.json and
the tokenizer agree on, a SentencePiece tokenizer framed and read as training and `sample` did,
an encoder-decoder's decoder start, and the refusals (a model no family holds, an --hf_dir that
is not empty)."""

import os

import pytest

# pylint: disable=g-import-not-at-top,wrong-import-position,protected-access
from tests.conftest import model_config
from transformer_jax.config import ConfigError
from transformer_jax.convert.hf import to_hf


def test_export_refuses_models_transformers_cannot_hold(tmp_path):
  """One line; a model no family holds names what the closest families need changed."""
  window = dict(position="rotary", norm="rmsnorm", activation="swiglu", use_bias=False,
                attention_window=8)
  for cfg, words in ((model_config(position="sinusoidal"), "no Hugging Face family"),
                     (model_config(**window, global_tokens=2),
                      r"no Hugging Face family .*closest: mistral: global_tokens=2 \(needs 0\)"),
                     (model_config(**window, window_pattern="LG"),
                      r"closest: llama: attention_window=8 \(needs 0\); mistral: "
                      r"window_pattern='LG' \(needs ''\)"),
                     (model_config(num_heads=4, num_kv_heads=2), "grouped-query")):
    with pytest.raises(ConfigError, match=words) as e:
      to_hf(cfg, {}, str(tmp_path))
    assert "\n" not in str(e.value)
  assert not os.listdir(tmp_path)