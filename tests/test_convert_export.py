"""`convert export` beyond the weights: the special ids config.json, generation_config.json and
the tokenizer agree on, a SentencePiece tokenizer framed and read as training and `sample` did,
an encoder-decoder's decoder start, and the refusals (a model no family holds, an --hf_dir that
is not empty)."""

import json
import os
import pickle

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position,protected-access
from tests.conftest import REPO, model_config, tiny_overrides
from transformer_jax import config as config_lib
from transformer_jax import sample
from transformer_jax.config import ConfigError
from transformer_jax.convert import __main__ as convert_cli
from transformer_jax.convert.hf import to_hf
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import objectives
from transformer_jax.data import tokenization
from transformer_jax.models import families


def _random_params(model):
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: rng.normal(0, 0.02, a.shape).astype(a.dtype),
                      families.abstract_params(model))


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


def test_an_export_names_the_ids_of_the_tokenizer_it_writes(tiny_data, tmp_path, capsys):
  """A workdir imported from a checkpoint (bos 1, eos 2, 320 ids) but trained with its own
  SentencePiece model (bos 2, eos 3, pad 0; 300 pieces) exports that tokenizer's ids in
  config.json and generation_config.json (they kept the checkpoint's, so generate stopped at
  <s>); quantized training's float weights are exported with a note; an --hf_dir holding
  anything is refused before anything is written."""
  config = config_lib.load(f"{REPO}/configs/llama.py:tiny", tiny_overrides(
      tiny_data, **{"model.quantization": "int8", "model.num_layers": 1}))
  workdir, out = tmp_path / "w", tmp_path / "hf"
  workdir.mkdir()
  imported = {"model_type": "llama", "vocab_size": 320, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 7}
  (workdir / convert_cli.HF_CONFIG).write_text(json.dumps(imported))
  model = families.build_model(config)
  convert_cli._save_step0(config, _random_params(model), str(workdir))
  out.mkdir()
  (out / "special_tokens_map.json").write_text("{}")  # (a user's, or an older export's)
  with pytest.raises(ConfigError, match=r"^--hf_dir=.* already holds special_tokens_map.json; "
                     r"export to a new or empty folder$"):
    convert_cli.main(["export", f"--workdir={workdir}", f"--hf_dir={out}"])
  assert os.listdir(out) == ["special_tokens_map.json"]
  os.remove(out / "special_tokens_map.json")
  capsys.readouterr()
  convert_cli.main(["export", f"--workdir={workdir}", f"--hf_dir={out}"])
  printed = capsys.readouterr().out
  assert "note: model.quantization=int8: exported the float weights" in printed
  theirs = transformers.AutoTokenizer.from_pretrained(str(out))
  ids = (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
  assert ids == (2, 3, 0)
  for name in ("config.json", "generation_config.json"):
    written = json.loads((out / name).read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == ids
  assert json.loads((out / "config.json").read_text())["vocab_size"] == 320


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


def test_an_imported_checkpoints_decoder_start_is_kept_beside_its_tokenizer(special_sp, tmp_path):
  """A T5 checkpoint whose tokenizer has a bos but whose decoder starts from pad (0): the
  import's copy of the tokenizer keeps that start, which training, sampling (decoder_start)
  and export use; bos was used, and export wrote 0 back."""
  hf_dir, workdir = tmp_path / "hf", tmp_path / "w"
  hf_dir.mkdir()
  convert_cli._export_tokenizer(config_lib.load(f"{REPO}/configs/t5.py:tiny", [
      f"data.tokenizer={special_sp}"]), str(hf_dir))  # a tokenizer.json with bos <s> (2)
  hf = {"model_type": "t5", "decoder_start_token_id": 0, "vocab_size": 448}
  (hf_dir / "config.json").write_text(json.dumps(hf))
  copied = convert_cli._copy_tokenizer(str(hf_dir), str(workdir / convert_cli.TOKENIZER_DIR))
  convert_cli._keep_decoder_start(str(hf_dir), hf, copied)
  tok = tokenization.load(copied)
  assert tok.bos_id == 2 and objectives.decoder_start(tok) == 0
  assert objectives.Vocab.from_tokenizer(pickle.loads(pickle.dumps(tok))).start_id == 0
  (workdir / convert_cli.HF_CONFIG).write_text(json.dumps(hf))
  config = config_lib.load(f"{REPO}/configs/t5.py:tiny", [f"data.tokenizer={copied}"])
  assert convert_cli._export_hf_config(str(workdir), config)["decoder_start_token_id"] == 0
  config = config_lib.load(f"{REPO}/configs/t5.py:tiny", [f"data.tokenizer={special_sp}"])
  exported = convert_cli._export_hf_config(str(workdir), config)  # another tokenizer: its bos
  assert (exported["decoder_start_token_id"], exported["eos_token_id"]) == (2, 3)
