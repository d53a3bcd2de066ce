"""Hugging Face round trip: logits parity with transformers' own models (random small configs,
no downloads), exact export/import, scanned = unrolled, vocabulary padding, the import CLI into a
workdir that trains, and refusal of pickled checkpoints."""

import dataclasses
import json
import os
import pickle
import re

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position
from safetensors.numpy import load_file, save_file

from tests.conftest import tiny_overrides
from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.convert.hf import from_hf, hf_forward, to_hf
from transformer_jax.convert import __main__ as convert_cli
from transformer_jax.convert import hf as hf_lib
from transformer_jax.data import corpus as corpus_lib
from transformer_jax.data import tokenization
from transformer_jax.training import loop

TOL = 1e-4  # fp32 logits, ours vs transformers'
T = 12


def _hf_model(family):
  if family == "gpt2":
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                                  bos_token_id=0, eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg)
  cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                 rms_norm_eps=1e-5, rope_parameters={"rope_type": "default",
                                                                     "rope_theta": 500.0})
  return transformers.LlamaForCausalLM(cfg)


def _batch():
  """Row 0 full, row 1 right-padded (last 4), row 2 left-padded (first 3); pads are token 7."""
  ids = np.random.default_rng(0).integers(0, 100, (3, T))
  mask = np.ones((3, T), np.int64)
  mask[1, 8:] = 0
  mask[2, :3] = 0
  return np.where(mask == 1, ids, 7), mask


def _save_hf(family, path):
  """Saves a random `family` model (every weight perturbed, norm scales and biases too, so a wrong
  mapping of any tensor shows in the logits) to `path`; returns transformers' logits on
  _batch()."""
  torch.manual_seed(0)
  model = _hf_model(family)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(path)
  ids, mask = _batch()
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_ckpt(request, tmp_path_factory):
  """(family, HF dir, transformers' logits on _batch())."""
  path = str(tmp_path_factory.mktemp(request.param))
  return request.param, path, _save_hf(request.param, path)


def _max_diff(a, b, mask):
  sel = mask.astype(bool)
  return float(np.max(np.abs(a[sel] - b[sel])))


def test_logits_match_transformers_scanned_and_unrolled(hf_ckpt):
  """Unrolled with the default causal blocks; scanned with one block and a padded vocabulary
  (zero rows, logits cut back to 100 by hf_forward)."""
  family, path, ref = hf_ckpt
  ids, mask = _batch()
  outs = {}
  for scan, extra in ((False, {}), (True, {"vocab_size": 128, "attention_chunks": 1})):
    model, params = from_hf(path, scan_layers=scan, **extra)
    assert ("layers" in params) == scan
    outs[scan] = hf_forward(model, params, input_ids=ids, attention_mask=mask,
                            vocab_size=extra.get("vocab_size") and 100)
    assert outs[scan].shape == ref.shape
    diff = _max_diff(outs[scan], ref, mask)
    print(f"{family} scan_layers={scan}: max |ours - transformers| = {diff:.2e}")
    assert diff < TOL, (family, scan, diff)
  # The padded rows' real tokens next to the padding are among the compared positions.
  assert mask[1, 7] == 1 and mask[2, 3] == 1
  assert _max_diff(outs[False], outs[True], mask) < 1e-5
  # A mapping mistake is visible: swapping the two layers' weights changes the logits.
  model, params = from_hf(path)
  params = dict(params, layer_0=params["layer_1"], layer_1=params["layer_0"])
  assert _max_diff(hf_forward(model, params, input_ids=ids, attention_mask=mask), ref, mask) > 1e-2


def _assert_round_trip_exact(family, path, out):
  """Import (scanned), export to `out`: the same tensors bit for bit; importing that again gives
  the same parameters."""
  model, params = from_hf(path, scan_layers=True)
  written = to_hf(model, params, out, hf_config=hf_lib.read_config(path))
  assert written["model_type"] == family
  original = load_file(f"{path}/model.safetensors")
  exported = load_file(f"{out}/model.safetensors")
  assert sorted(exported) == sorted(original)
  for name, value in original.items():
    assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
  _, again = from_hf(out, scan_layers=True)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, again)


def test_export_then_import_is_exact_and_transformers_loads_it(hf_ckpt, tmp_path):
  family, path, ref = hf_ckpt
  _assert_round_trip_exact(family, path, str(tmp_path))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids, mask = _batch()
  with torch.no_grad():
    got = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  # (the weights are byte-identical above; two forward passes of one torch process differ by
  # up to 6.4e-5 here, by the state its math library is in: 1e-6 failed one run in two when
  # other test files ran first in the worker)
  assert _max_diff(got, ref, mask) < TOL
  with open(tmp_path / "generation_config.json") as f:
    assert json.load(f)["eos_token_id"] == hf_lib.read_config(path)["eos_token_id"]


def test_padded_vocabulary_round_trip(hf_ckpt, tmp_path):
  """Zero rows pad the vocabulary; their ids take no probability (logits of 0 took nearly all of
  it from a checkpoint whose logits are negative) and no share of label smoothing."""
  from transformer_jax.training.step import token_loss  # pylint: disable=g-import-not-at-top
  family, path, _ = hf_ckpt
  model, params = from_hf(path, vocab_size=128)
  assert model.cfg.output_vocab == 100
  table = params["embed"]["tokens"]
  assert table.shape == (128, 64) and not table[100:].any()
  plain, plain_params = from_hf(path)
  ids = np.asarray(_batch()[0], np.int32)
  shift = lambda p: jax.tree_util.tree_map_with_path(  # every real logit far below 0
      lambda k, v: v - 40.0 * (k[-1].key == "bias" and "final_norm" in str(k)), p)
  padded_logits, logits = (np.asarray(m.apply({"params": shift(p)}, ids)) for m, p in (
      (model, params), (plain, plain_params)))
  np.testing.assert_allclose(jax.nn.log_softmax(padded_logits)[..., :100],
                             jax.nn.log_softmax(logits), atol=2e-4)
  assert float(jax.nn.softmax(padded_logits)[..., 100:].sum(-1).max()) == 0.0
  targets = ids % 100
  np.testing.assert_allclose(token_loss(padded_logits, targets, 1e-4, 0.1, 100),
                             token_loss(logits, targets, 1e-4, 0.1), rtol=1e-5)  # both parts
  if family == "llama":  # untied: the output projection [D, V] is padded too
    logits = params["embed"]["logits"]
    assert logits.shape == (64, 128) and not logits[:, 100:].any()
  to_hf(model, params, str(tmp_path), family=family, hf_config=hf_lib.read_config(path))
  exported = load_file(f"{tmp_path}/model.safetensors")
  for name, value in load_file(f"{path}/model.safetensors").items():
    assert np.array_equal(exported[name], value), name
  with pytest.raises(ConfigError, match="smaller than"):
    from_hf(path, vocab_size=64)
  with pytest.raises(ConfigError, match="contradict"):
    from_hf(path, num_layers=3)


def test_pickled_checkpoint_is_refused_without_unpickling(hf_ckpt, tmp_path):
  _, path, _ = hf_ckpt
  marker = tmp_path / "unpickled"

  class Evil:
    def __reduce__(self):
      return os.mkdir, (str(marker),)

  hf_dir = tmp_path / "bin_only"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text(open(f"{path}/config.json").read())
  (hf_dir / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
  for load in (lambda: from_hf(str(hf_dir)),
               lambda: convert_cli.main(["import", "--hf_dir", str(hf_dir),
                                         "--workdir", str(tmp_path / "w")])):
    with pytest.raises(ConfigError) as e:
      load()
    assert "\n" not in str(e.value) and "safetensors" in str(e.value)
  assert not marker.exists()


def test_unsupported_checkpoint_is_one_line(hf_ckpt, tmp_path):
  family, path, _ = hf_ckpt
  hf = hf_lib.read_config(path)
  if family == "gpt2":
    hf["activation_function"] = "relu"
  else:
    hf["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 5e5, "factor": 8.0}
  (tmp_path / "config.json").write_text(json.dumps(hf))
  os.symlink(f"{path}/model.safetensors", tmp_path / "model.safetensors")
  with pytest.raises(ConfigError) as e:
    from_hf(str(tmp_path))
  assert "\n" not in str(e.value) and ("relu" in str(e.value) or "longrope" in str(e.value))
  if family == "llama":  # a scaling without the keys Hugging Face requires for it
    hf["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="llama3.* needs low_freq_factor, high_freq_factor"):
      from_hf(str(tmp_path))
    # Both forms, saying different things (transformers reads rope_scaling): refused; the
    # same scaling in both (as transformers writes them) reads as one.
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 300.0}
    hf["rope_scaling"] = {"type": "linear", "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match="rope_parameters .* and rope_scaling .* differ"):
      from_hf(str(tmp_path))
    hf["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 300.0}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert from_hf(str(tmp_path))[0].cfg.rope_scaling == "linear"


def test_cli_import_then_train_continues_and_export_round_trips(tiny_data, tmp_path):
  """One family end to end is enough (llama: GQA, untied, padded vocabulary)."""
  path = str(tmp_path / "llama")
  _save_hf("llama", path)
  workdir, out = str(tmp_path / "w"), str(tmp_path / "hf")
  overrides = tiny_overrides(tiny_data, **{"model.scan_layers": True, "train.steps": 4,
                                               "model.attention_chunks": 1})
  convert_cli.main(["import", "--hf_dir", path, "--workdir", workdir]
                   + [f"--config.{o}" for o in overrides])
  config = config_lib.from_json_file(f"{workdir}/config.json")
  assert config.model.vocab_size == 320 and config.model.num_kv_heads == 2
  with pytest.raises(ConfigError, match="already has checkpoints"):
    convert_cli.main(["import", "--hf_dir", path, "--workdir", workdir])
  with pytest.raises(ConfigError, match="^--workdir=.* cannot be made a folder: .* is a file"):
    convert_cli.main(["import", "--hf_dir", path, "--workdir", f"{workdir}/config.json"])
  planned = tmp_path / "planned"  # a sweep's planned run (config.json, no checkpoints yet)
  planned.mkdir()
  (planned / "config.json").write_text('{"model": {}}')
  with pytest.raises(ConfigError, match="^.*planned already holds a config.json .* import into a"):
    convert_cli.main(["import", "--hf_dir", path, "--workdir", str(planned)])
  assert (planned / "config.json").read_text() == '{"model": {}}'
  from transformer_jax.training import lock  # pylint: disable=g-import-not-at-top
  with lock.hold(workdir):  # another import (or a run) in it: one line, not orbax's traceback
    with pytest.raises(ConfigError, match=r"is in use by"):
      convert_cli.main(["import", "--hf_dir", path, "--workdir", workdir])
  killed = str(tmp_path / "killed")  # an import killed before its config.json (written last)
  convert_cli.main(["import", "--hf_dir", path, "--workdir", killed]
                   + [f"--config.{o}" for o in overrides])
  os.remove(f"{killed}/config.json")
  convert_cli.main(["import", "--hf_dir", path, "--workdir", killed]
                   + [f"--config.{o}" for o in overrides])  # was refused: "has checkpoints"
  assert os.path.isfile(f"{killed}/config.json") and any(
      n.startswith("checkpoints_previous") for n in os.listdir(killed))
  result = loop.train(config, workdir, quiet=True, stop_after=2, devices=jax.devices()[:1])
  assert result["step"] == 2 and np.isfinite(result["loss"])
  assert not os.path.exists(f"{workdir}/checkpoints_unreadable")  # checkpoint 0 was restored
  original = load_file(f"{path}/model.safetensors")
  with pytest.raises(ConfigError, match=r"no checkpoint for step 1 in .* \(steps: 0, 2\)$"):
    convert_cli.main(["export", "--workdir", workdir, "--hf_dir", out, "--step", "1"])
  for taken in (workdir, path):  # a workdir's config.json, a model's weights: not overwritten
    with pytest.raises(ConfigError, match=r"^--hf_dir=.* already holds (checkpoints|model.saf)"):
      convert_cli.main(["export", "--workdir", workdir, "--hf_dir", taken, "--step", "0"])
  convert_cli.main(["export", "--workdir", workdir, "--hf_dir", out, "--step", "0"])
  # The workdir's tokenizer (300 pieces) outgrew the checkpoint's 100 ids: its 300 rows are
  # kept (model.output_vocab; the 20 padded rows, which our model never predicts, are cut:
  # transformers' model would give them probability).
  exported = load_file(f"{out}/model.safetensors")
  for name, value in original.items():
    rest = exported[name].copy()
    rest[tuple(slice(0, n) for n in value.shape)] = 0
    assert np.array_equal(exported[name][:len(value)], value) and not rest.any(), name
  assert exported["lm_head.weight"].shape == (300, 64)
  assert transformers.AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 300
  # The workdir's SentencePiece tokenizer went along as a tokenizer.json with the same ids
  ours, back = tokenization.load(config.data.tokenizer), tokenization.load(out)
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  texts = [t for _, t in corpus_lib.iter_documents(tiny_data["corpus"])][:60] + [
      "  x\t\n\u2581y 日本 😀 <s></s> [MASK]", "a\r\n\n   b"]
  for text in texts:
    ids = ours.encode(text)
    assert theirs.encode(text, add_special_tokens=False) == back.encode(text) == ids, text
    assert theirs.encode(text)[:1] == [ours.bos_id] and theirs.decode(ids) == ours.decode(ids)
  assert (back.bos_id, back.eos_id, back.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
  # The 2 steps trained from the imported weights: a random re-initialisation would be ~0.1 away.
  _, imported = from_hf(path, vocab_size=320, scan_layers=True)
  drift = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))),
                       result["state"].params, imported)
  assert 0 < max(jax.tree.leaves(drift)) < 1e-2, drift


def test_config_values_transformers_would_read_otherwise():
  """What a config.json leaves implicit is read as transformers reads it: Mistral's absent
  sliding_window is 4096; yarn's and llama3's pretraining length is the top-level
  original_max_position_embeddings (Phi-3's), else rope's, else max_position_embeddings (it
  followed model.max_len, which an import may change); and dynamic RoPE's max_len is fixed."""
  from transformer_jax.convert import llama, mistral  # pylint: disable=g-import-not-at-top
  assert mistral.read({})["attention_window"] == 4096
  assert mistral.read({"sliding_window": None})["attention_window"] == 0
  yarn = {"rope_scaling": {"type": "yarn", "factor": 4.0}, "max_position_embeddings": 64}
  assert llama.read_rope(yarn)["rope_original_max_len"] == 64
  assert llama.read_rope({**yarn, "original_max_position_embeddings": 16})[
      "rope_original_max_len"] == 16
  llama3 = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
            "max_position_embeddings": 64}  # llama3 likewise (rope's 32 was read, or refused)
  assert llama.read_rope(llama3)["rope_original_max_len"] == 32
  assert llama.read_rope({**llama3, "original_max_position_embeddings": 16})[
      "rope_original_max_len"] == 16
  del llama3["rope_scaling"]["original_max_position_embeddings"]
  assert llama.read_rope(llama3)["rope_original_max_len"] == 64
  # what transformers leaves unread is not imported (dynamic NTK scales from
  # max_position_embeddings; model.rope_original_max_len would be refused as unread)
  assert llama.read_rope({"rope_scaling": {"type": "dynamic", "factor": 2.0,
                                           "original_max_position_embeddings": 16}}) == {
      "rope_theta": 10000.0, "rope_scaling": "dynamic", "rope_factor": 2.0}
  values = hf_lib.hf_model_config({"model_type": "llama", "max_position_embeddings": 64,
                                   "rope_scaling": {"type": "dynamic", "factor": 2.0}})
  with pytest.raises(ConfigError, match="max_len"):
    hf_lib.check_overrides(values, {**values, "max_len": 128})


@pytest.mark.parametrize("name", ["LlamaConfig", "MistralConfig", "MixtralConfig",
                                  "Qwen2MoeConfig"])
@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 4.0}])
def test_a_config_json_silent_on_a_key_reads_as_transformers_defaults(name, rope):
  """Every key config.json leaves out is what transformers' config class assumes: a bare
  {"model_type": ...} reads as that class's full default config.json (Mistral's 131072
  positions, Mixtral's absent window, yarn's pretraining length from the family's default)."""
  full = getattr(transformers, name)().to_dict()
  bare = {"model_type": full["model_type"]}
  if rope:
    full["rope_parameters"] = bare["rope_parameters"] = {**full["rope_parameters"], **rope}
  def resolved(values):  # 0 = derived, as an explicit value transformers writes
    return {**values, "head_dim": values["head_dim"] or values["d_model"] // values["num_heads"],
            "num_kv_heads": values["num_kv_heads"] or values["num_heads"]}
  assert resolved(hf_lib.hf_model_config(bare)) == resolved(hf_lib.hf_model_config(full))


def test_a_mistral_window_is_not_dropped_by_reading_it_as_llama():
  mistral = transformers.MistralConfig(sliding_window=16).to_dict()
  with pytest.raises(ConfigError, match="sliding_window=16"):
    hf_lib.hf_model_config(mistral, family="llama")
  assert hf_lib.hf_model_config({**mistral, "sliding_window": None},
                                family="llama")["attention_window"] == 0
  qwen2 = {**transformers.LlamaConfig().to_dict(), "use_sliding_window": False,
           "sliding_window": 4096}  # a window config.json says is off
  assert hf_lib.hf_model_config(qwen2)["attention_window"] == 0


# ------------------------------------------------------------------------- BERT and T5 v1.1
def _hf_seq_model(family):
  """A random BertForMaskedLM / T5ForConditionalGeneration (v1.1: gated GELU, untied lm_head)."""
  if family == "bert":
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=100,
                                  max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg)
  cfg = transformers.T5Config(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2,
                              num_decoder_layers=1, vocab_size=100, feed_forward_proj="gated-gelu",
                              tie_word_embeddings=False)
  model = transformers.T5ForConditionalGeneration(cfg)
  # transformers 5 ties lm_head to the shared table whatever the config says (it reads
  # tie_word_embeddings=False as "do not scale the decoder output"); a v1.1 checkpoint has its
  # own lm_head, so give it one.
  model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
  return model


def _seq_inputs(family):
  """HF keyword inputs: _batch() with token types (BERT: the second half is segment B) or
  decoder inputs (T5: start token 0, row 0's decoder right-padded)."""
  ids, mask = _batch()
  if family == "bert":
    types = np.zeros_like(ids)
    types[:, T // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
  dec = np.random.default_rng(1).integers(0, 100, (3, 6))
  dec[:, 0] = 0
  dec_mask = np.ones_like(dec)
  dec_mask[0, 4:] = 0
  return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec,
          "decoder_attention_mask": dec_mask}


def _compared(family, inputs):
  """The mask of the logits compared: real tokens (the decoder's for T5)."""
  return inputs["attention_mask"] if family == "bert" else inputs["decoder_attention_mask"]


def _hf_logits(model, inputs):
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_a_tied_checkpoint_with_a_different_head_is_refused(family, tmp_path):
  """config.json says tie_word_embeddings, the file also holds an output head: equal to the
  token table it imports; different (transformers then uses it untied) it was dropped silently,
  now it is refused in one line."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  model = _hf_seq_model("bert") if family == "bert" else _hf_model(family)
  model.config.tie_word_embeddings = True
  model.tie_weights()
  model.save_pretrained(tmp_path)
  tensors = load_file(f"{tmp_path}/model.safetensors")
  table = next(k for k in tensors if k.endswith(("wte.weight", "embed_tokens.weight",
                                                 "word_embeddings.weight")))
  head = "cls.predictions.decoder.weight" if family == "bert" else "lm_head.weight"
  for shift, refused in ((0.0, False), (0.5, True)):
    save_file({**tensors, head: tensors[table] + shift}, f"{tmp_path}/model.safetensors",
              metadata={"format": "pt"})
    if not refused:
      from_hf(str(tmp_path))
      continue
    with pytest.raises(ConfigError, match=rf"{re.escape(head)} differs from its .*tie_word_emb"):
      from_hf(str(tmp_path))


@pytest.fixture(scope="module", params=["bert", "t5"])
def hf_seq_ckpt(request, tmp_path_factory):
  """(family, HF dir, transformers' logits on _seq_inputs()); every weight perturbed."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  family = request.param
  path = str(tmp_path_factory.mktemp(family))
  torch.manual_seed(0)
  model = _hf_seq_model(family)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval()
  if family == "bert":
    model.save_pretrained(path)
  else:  # as the v1.1 checkpoints are: shared.weight and lm_head.weight, tie_word_embeddings off
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not k.endswith("embed_tokens.weight")}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf = model.config.to_dict()
    hf.pop("scale_decoder_outputs", None)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump({**hf, "tie_word_embeddings": False}, f)
  return family, path, _hf_logits(model, _seq_inputs(family))


def test_bert_t5_logits_match_transformers(hf_seq_ckpt, tmp_path):
  family, path, ref = hf_seq_ckpt
  inputs = _seq_inputs(family)
  mask = _compared(family, inputs)
  outs = {}
  for scan in (False, True):
    model, params = from_hf(path, scan_layers=scan)
    outs[scan] = hf_forward(model, params, **inputs)
    assert outs[scan].shape == ref.shape
    diff = _max_diff(outs[scan], ref, mask)
    print(f"{family} scan_layers={scan}: max |ours - transformers| = {diff:.2e}")
    assert diff < TOL, (family, scan, diff)
  assert _max_diff(outs[False], outs[True], mask) < 1e-5
  # A mapping mistake is visible: swapping two layers' weights changes the logits.
  model, params = from_hf(path)
  if family == "bert":
    assert model.cfg.activation == "gelu_exact"
    swapped = dict(params, layer_0=params["layer_1"], layer_1=params["layer_0"])
    # The tanh GELU is not BERT's: the exact one is needed for the tolerance.
    tanh = type(model)(dataclasses.replace(model.cfg, activation="gelu"))
    assert _max_diff(hf_forward(tanh, params, **inputs), ref, mask) > TOL
    # Token types reach the embedding.
    no_types = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    assert _max_diff(hf_forward(model, params, **no_types), ref, mask) > 1e-2
    # Ids past a table are one line, as transformers' IndexError (NaN or wrapped logits before).
    vocab, types = model.cfg.vocab_size, model.cfg.type_vocab_size
    for key, bad, size in (("input_ids", vocab, vocab), ("input_ids", -1, vocab),
                           ("token_type_ids", types, types)):
      wrong = dict(inputs, **{key: np.full_like(np.asarray(inputs[key]), bad)})
      with pytest.raises(ConfigError, match=rf"must be in \[0, {size}\): got {bad}$"):
        hf_forward(model, params, **wrong)
    # TensorFlow-era names (the Hub's bert-base-*: LayerNorm.gamma / .beta) were refused
    tensors = load_file(os.path.join(path, "model.safetensors"))
    save_file({re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma",
                      re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
               for k, v in tensors.items()}, tmp_path / "model.safetensors")
    with open(tmp_path / "config.json", "w") as f:
      f.write(open(os.path.join(path, "config.json")).read())
    assert _max_diff(hf_forward(*from_hf(str(tmp_path)), **inputs), ref, mask) < TOL
  else:
    enc = params["encoder"]
    swapped = dict(params, encoder=dict(enc, layer_0=enc["layer_1"], layer_1=enc["layer_0"]))
  assert _max_diff(hf_forward(model, swapped, **inputs), ref, mask) > 1e-2


def test_bert_t5_export_then_import_is_exact_and_transformers_loads_it(hf_seq_ckpt, tmp_path):
  family, path, ref = hf_seq_ckpt
  _assert_round_trip_exact(family, path, str(tmp_path))
  auto = (transformers.AutoModelForMaskedLM if family == "bert"
          else transformers.AutoModelForSeq2SeqLM)
  inputs = _seq_inputs(family)
  got = _hf_logits(auto.from_pretrained(str(tmp_path)).eval(), inputs)
  assert _max_diff(got, ref, _compared(family, inputs)) < 1e-6


def test_bert_t5_inputs_and_configs_are_checked(hf_seq_ckpt, tmp_path):
  family, path, _ = hf_seq_ckpt
  model, params = from_hf(path)
  ids, mask = _batch()
  if family == "bert":
    with pytest.raises(ConfigError, match="decoder_input_ids"):
      hf_forward(model, params, ids, mask, decoder_input_ids=ids)
  else:
    with pytest.raises(ConfigError, match="needs decoder_input_ids"):
      hf_forward(model, params, ids, mask)
    with pytest.raises(ConfigError, match="token_type_ids"):
      hf_forward(model, params, ids, mask, token_type_ids=ids, decoder_input_ids=ids)
  hf = hf_lib.read_config(path)
  if family == "bert":
    hf["hidden_act"] = "relu"
  else:
    hf["feed_forward_proj"] = "relu"  # T5 v1.0
  (tmp_path / "config.json").write_text(json.dumps(hf))
  os.symlink(f"{path}/model.safetensors", tmp_path / "model.safetensors")
  with pytest.raises(ConfigError, match="relu") as e:
    from_hf(str(tmp_path))
  assert "\n" not in str(e.value)


def test_bert_t5_cli_import_then_export_round_trips(hf_seq_ckpt, tiny_data, tmp_path):
  """The import/export commands for the sequence families (objective picked from the family)."""
  family, path, ref = hf_seq_ckpt
  texts = [t for _, t in corpus_lib.iter_documents(tiny_data["corpus"])]
  tok = tokenization.train(texts, 400, str(tmp_path / "tok.model"), special="mask,sentinels:100")
  workdir, out = str(tmp_path / "w"), str(tmp_path / "hf")
  overrides = tiny_overrides(tiny_data, **{"data.tokenizer": tok, "model.max_len": 64,
                                           "model.vocab_size": 448})
  convert_cli.main(["import", "--hf_dir", path, "--workdir", workdir]
                   + [f"--config.{o}" for o in overrides])
  config = config_lib.from_json_file(f"{workdir}/config.json")
  assert (config.model.family, config.data.objective, config.model.vocab_size) == (
      {"bert": ("encoder", "mlm", 448), "t5": ("encdec", "span", 448)}[family])
  pieces = tokenization.load(tok).vocab_size  # more than the checkpoint's 100: they train
  assert config.model.output_vocab == (pieces if pieces < 448 else 0)
  with pytest.raises(ConfigError, match=r"^--step=-7: give a checkpoint step"):  # (the latest)
    convert_cli.main(["export", "--workdir", workdir, "--hf_dir", out, "--step=-7"])
  convert_cli.main(["export", "--workdir", workdir, "--hf_dir", out])
  if family == "t5":  # the decoder start this workdir trains with (its tokenizer's bos), not 0
    written = json.loads(open(f"{out}/config.json").read())
    assert written["decoder_start_token_id"] == tokenization.load(tok).bos_id == 2
  original, exported = load_file(f"{path}/model.safetensors"), load_file(f"{out}/model.safetensors")
  for name, value in original.items():  # The first 100 vocabulary rows are the checkpoint's.
    np.testing.assert_array_equal(exported[name][tuple(slice(0, n) for n in value.shape)], value,
                                  err_msg=name)
  auto = (transformers.AutoModelForMaskedLM if family == "bert"
          else transformers.AutoModelForSeq2SeqLM)
  inputs = _seq_inputs(family)
  got = _hf_logits(auto.from_pretrained(out).eval(), inputs)[..., :100]
  assert _max_diff(got, ref, _compared(family, inputs)) < 1e-5


def test_bert_pretraining_checkpoint_brings_its_next_sentence_head(tmp_path):
  """BertForPreTraining: the pooler and NSP head map to model.sentence_head (logits match, the
  export is exact and loads as BertForPreTraining)."""
  torch.manual_seed(0)
  bert = _hf_seq_model("bert")
  model = transformers.BertForPreTraining(bert.config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval().save_pretrained(str(tmp_path / "hf"))
  inputs = _seq_inputs("bert")
  with torch.no_grad():
    ref = model(**{k: torch.tensor(v) for k, v in inputs.items()})
  ours, params = from_hf(str(tmp_path / "hf"))
  assert ours.cfg.sentence_head
  mask = inputs["attention_mask"]
  assert _max_diff(hf_forward(ours, params, **inputs), ref.prediction_logits.numpy(), mask) < TOL
  x = ours.apply({"params": params}, inputs["input_ids"], mask, None,
                 inputs["token_type_ids"], hidden=True)
  nsp = np.asarray(ours.apply({"params": params}, x, method="sentence_logits"))[:, 0]
  # Rows 0 and 1 start with a real token ([CLS]); row 2 is left-padded.
  np.testing.assert_allclose(nsp[:2], ref.seq_relationship_logits.numpy()[:2], atol=TOL)
  _assert_round_trip_exact("bert", str(tmp_path / "hf"), str(tmp_path / "out"))
  again = transformers.AutoModelForPreTraining.from_pretrained(str(tmp_path / "out")).eval()
  assert type(again).__name__ == "BertForPreTraining"


def test_t5_saved_by_transformers_itself_imports_its_tied_head(tmp_path):
  """transformers 5 ties T5's lm_head to the shared table and saves no lm_head.weight."""
  torch.manual_seed(0)
  cfg = _hf_seq_model("t5").config
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  model.save_pretrained(str(tmp_path))
  assert "lm_head.weight" not in load_file(f"{tmp_path}/model.safetensors")
  inputs = _seq_inputs("t5")
  ours, params = from_hf(str(tmp_path))
  diff = _max_diff(hf_forward(ours, params, **inputs), _hf_logits(model, inputs),
                   _compared("t5", inputs))
  assert diff < TOL, diff
