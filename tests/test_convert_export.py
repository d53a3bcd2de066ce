"""`convert export` beyond the weights: the special ids config.json, generation_config.json and
the tokenizer agree on, a SentencePiece tokenizer framed and read as training and `sample` did,
an encoder-decoder's decoder start, and the refusals (a model no family holds, an --hf_dir that
is not empty)."""

import os

import pytest

transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position,protected-access
from tests.conftest import REPO, model_config
from transformer_jax import config as config_lib
from transformer_jax import sample
from transformer_jax.config import ConfigError
from transformer_jax.convert import __main__ as convert_cli
from transformer_jax.convert.hf import to_hf
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import tokenization


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


@pytest.fixture(scope="module")
def special_sp(tiny_data, tmp_path_factory):
  texts = [t for _, t in corpus_lib.iter_documents(tiny_data["corpus"])]
  return tokenization.train(texts, 400, str(tmp_path_factory.mktemp("sp") / "special.model"),
                            special="mask,sentinels:100")


def test_an_exported_sentencepiece_model_frames_and_reads_prompts_as_training_and_sample(
    special_sp, tmp_path):
  """T5's exported tokenizer adds the source eos that span corruption's sources ended with (it
  added bos alone); [MASK] and <extra_id_N> in a text are those tokens (they were text:
  transformers' fill-mask pipeline found no mask), as `sample` reads a prompt."""
  tok = tokenization.load(special_sp)
  for recipe in ("t5", "bert"):
    config = config_lib.load(f"{REPO}/configs/{recipe}.py:tiny", [
        f"data.tokenizer={special_sp}", "model.vocab_size=448"])
    convert_cli._export_tokenizer(config, str(tmp_path / recipe))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / recipe))
    prompt = "x = [MASK] + 1" if recipe == "bert" else "def f(<extra_id_0>): return <extra_id_1>"
    ours = (sample.source(config, tok, prompt) if recipe == "t5"
            else [tok.bos_id] + tokenization.with_control_pieces(tok, prompt))  # (fill_mask's)
    assert theirs(prompt)["input_ids"] == ours, recipe
    # (the fill-mask pipeline looks for mask_token_id in the ids)
    assert ours[-1] == tok.eos_id if recipe == "t5" else theirs.mask_token_id in ours