"""Hugging Face checkpoints <-> our models' parameters (GPT-2, Llama, Mistral, and the
Mixture-of-Experts Mixtral and Qwen2-MoE: DecoderLM; BERT: EncoderLM; T5 v1.1: EncoderDecoder),
and HF-style forward passes.

  model, params = from_hf("path/to/hf_dir")            # family from config.json's model_type
  to_hf(model, params, "out_dir")                      # model.safetensors + config.json
  logits = hf_forward(model, params, input_ids=ids, attention_mask=mask)

Weights are read from safetensors only (`model.safetensors` or a sharded index): nothing is ever
unpickled, and a directory with only `pytorch_model.bin` is refused. No torch or transformers
import is needed. Parameters come back as a plain dict of numpy arrays in the layout the model's
`scan_layers` asks for (unrolled `layer_i` or stacked `layers`).
A directory may be a gs:// URL (config/paths.py): its safetensors files are downloaded to a
temporary folder to be read; `to_hf` writes into one and uploads it, config.json last.
"""

import dataclasses
import functools
import json
import os
import tempfile

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.config import base
from transformer_jax.config import paths
from transformer_jax.convert import bert, gpt2, llama, mistral, mixtral, qwen2_moe, t5, tables
from transformer_jax.models import families
from transformer_jax.models import stack
from transformer_jax.models.layers import ModelConfig

SAFETENSORS, INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
# our model.family -> module (a table's MODEL_FAMILY)
MODELS = families.FAMILIES
# HF model_type -> its table
TABLES = {f.MODEL_TYPE: f for f in (gpt2, llama, mistral, mixtral, qwen2_moe, bert, t5)}
# model.* values a checkpoint's config.json gives that training may change (not architecture).
TRAINING = ("router_aux_loss",)


def table(name: str):
  if name not in TABLES:
    raise ConfigError(f"no converter for model_type {name!r}; known: {', '.join(TABLES)}")
  return TABLES[name]


def table_for(cfg):
  """The family table whose fixed choices (positions, norm, activation, ...) this model has;
  else a ConfigError naming what the closest families (fewest such values) need changed."""
  bad = {name: tables.mismatches(fam, cfg) for name, fam in TABLES.items()}
  for name, keys in bad.items():
    if not keys:
      return TABLES[name]
  fewest = min(map(len, bad.values()))
  closest = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in bad.items()
                      if len(keys) == fewest)
  raise ConfigError(f"no Hugging Face family matches this model; the closest: {closest}")


# --------------------------------------------------------------------------------------- I/O
def read_config(hf_dir: str) -> dict:
  path = paths.join(hf_dir, "config.json")
  if not paths.isfile(path):
    raise ConfigError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
  try:
    hf = json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
  if not isinstance(hf, dict):
    raise ConfigError(f"{path} holds a JSON {type(hf).__name__}, not a model config (an object)")
  return hf


def weight_names(hf_dir: str) -> list[str]:
  """The safetensors files of a directory (local or gs://), relative to it."""
  if paths.isfile(paths.join(hf_dir, INDEX)):
    return sorted(set(json.loads(paths.read_text(paths.join(hf_dir, INDEX)))["weight_map"]
                      .values()))
  if paths.isfile(paths.join(hf_dir, SAFETENSORS)):
    return [SAFETENSORS]
  if any(paths.isfile(paths.join(hf_dir, p)) for p in PICKLES):
    raise ConfigError(f"{hf_dir} has only pytorch_model.bin (a pickle, never loaded here): "
                      f"convert it to safetensors first, e.g. save_pretrained(DIR, "
                      f"safe_serialization=True) in transformers")
  raise ConfigError(f"{hf_dir} has no {SAFETENSORS} (nor {INDEX})")


def read_tensors(hf_dir: str) -> dict:
  """{name: numpy array} from the directory's safetensors file(s), bfloat16 included (read
  through safetensors' flax backend onto the CPU; numpy has no bfloat16). A gs:// directory's
  files are downloaded to a temporary folder first (safetensors reads local files)."""
  names = weight_names(hf_dir)
  if paths.is_remote(hf_dir):
    with tempfile.TemporaryDirectory(prefix="hf-") as tmp:
      return _read_tensors(paths.download(hf_dir, names, tmp), names)
  return _read_tensors(hf_dir, names)


def _read_tensors(hf_dir: str, names: list[str]) -> dict:
  from safetensors import SafetensorError, safe_open  # pylint: disable=g-import-not-at-top
  out = {}
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    for path in (os.path.join(hf_dir, n) for n in names):
      try:
        with safe_open(path, framework="flax") as f:
          for name in f.keys():
            out[name] = np.asarray(f.get_tensor(name))
      except SafetensorError as e:  # (a truncated download: the library's traceback)
        raise ConfigError(f"{path} is not a whole safetensors file ({e})") from None
  return out


def _write_json(path: str, value: dict):
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


# --------------------------------------------------------------------------------- our side
def model_config(c) -> ModelConfig:
  """A ModelConfig from a module, a ModelConfig, a whole ConfigDict or its `model` section."""
  if isinstance(c, nn.Module):
    c = c.cfg
  if isinstance(c, ModelConfig):
    return c
  return ModelConfig.from_config(c.model if "model" in c else c)


def _shapes(fam, cfg: ModelConfig) -> dict:
  """{path: shape} of the model's parameters, unrolled layout."""
  model = MODELS[fam.MODEL_FAMILY](dataclasses.replace(cfg, scan_layers=False))
  flat = flax.traverse_util.flatten_dict(families.abstract_params(model, 1), sep="/")
  return {k: tuple(v.shape) for k, v in flat.items()}


def _unrolled(params) -> dict:
  """The unrolled layout of params in either layout (each stack's `layers` -> `layer_i`)."""
  params = jax.device_get(params)
  if not isinstance(params, dict):
    return params
  params = {k: _unrolled(v) for k, v in params.items()}
  return stack.unstack_layers(params) if stack.STACKED in params else params


def _stacked(fam, cfg, params: dict) -> dict:
  """The scanned layout of unrolled params: each of the family's stacks gets its `layers`."""
  params = dict(params)
  for path, count, _ in tables.stacks(fam):
    *parents, _ = path.split("/")
    if not parents:
      params = stack.stack_layers(params, count(cfg))
      continue
    node = params
    for name in parents[:-1]:
      node[name] = dict(node[name])
      node = node[name]
    node[parents[-1]] = stack.stack_layers(node[parents[-1]], count(cfg))
  return params


# ----------------------------------------------------------------------------------- the API
def hf_model_config(hf: dict, family: str = "", **overrides) -> dict:
  """Our model.* values for a config.json dict, with `overrides` (e.g. scan_layers=True, or a
  padded vocab_size) applied and checked: the architecture itself cannot be overridden."""
  fam = table(family or hf.get("model_type", ""))
  values = tables.config_to_ours(fam, hf)
  mistyped = config_lib.mistyped_keys(values, config_lib.defaults()["model"], "model.")
  if mistyped:  # ("n_embd": "abc" was ml_collections' traceback)
    raise ConfigError(f"the checkpoint's config.json gives {', '.join(mistyped)}, not of the "
                      f"type config/base.py gives that key")
  check_overrides(values, {**values, **overrides})
  if overrides.get("vocab_size", 0) > values["vocab_size"]:  # the padded rows predict nothing
    overrides = {"output_vocab": values["vocab_size"], **overrides}
  return {**values, **overrides}


def check_overrides(from_hf: dict, model: dict):
  """Refuses model.* values that contradict the checkpoint (one line naming them); a larger
  vocab_size (zero rows), TRAINING and, without learned positions or dynamic RoPE (whose
  pretraining length it is), max_len may differ."""
  fixed_len = from_hf["position"] == "learned" or from_hf.get("rope_scaling") == "dynamic"
  free = {"vocab_size", "output_vocab", *TRAINING} | (set() if fixed_len else {"max_len"})
  bad = [f"model.{k}={model[k]!r} (checkpoint: {v!r})" for k, v in from_hf.items()
         if k not in free and model[k] != v]
  if bad:
    raise ConfigError(f"{', '.join(bad)} contradict(s) the Hugging Face checkpoint; only "
                      f"model.vocab_size (padding) and non-architecture keys may be changed")
  if model["vocab_size"] < from_hf["vocab_size"]:
    raise ConfigError(f"model.vocab_size={model['vocab_size']} is smaller than the checkpoint's "
                      f"vocabulary ({from_hf['vocab_size']})")


def load_params(hf_dir: str, cfg: ModelConfig, hf: dict | None = None) -> dict:
  """Our parameters (numpy, cfg.param_dtype, cfg's layout) from an HF directory."""
  hf = read_config(hf_dir) if hf is None else hf
  fam = table(hf.get("model_type", ""))
  if cfg.scan_layers and cfg.num_experts and cfg.moe_every > 1:
    raise ConfigError(f"model.scan_layers needs every layer alike: this {fam.MODEL_TYPE} "
                      f"checkpoint mixes dense and MoE layers (model.moe_every={cfg.moe_every}); "
                      f"set scan_layers=False")
  shapes = _shapes(fam, cfg)
  flat = tables.from_hf_tensors(fam, cfg, read_tensors(hf_dir), shapes,
                                jnp.dtype(cfg.param_dtype))
  params = flax.traverse_util.unflatten_dict(flat, sep="/")
  return _stacked(fam, cfg, params) if cfg.scan_layers else params


def from_hf(hf_dir: str, family: str = "", **overrides):
  """(model, params) from a Hugging Face directory (config.json + safetensors). `overrides`
  are ModelConfig fields: scan_layers, remat, dtype, a larger vocab_size (zero-padded rows), ..."""
  hf = read_config(hf_dir)
  if family:
    hf = {**hf, "model_type": family}
  values = hf_model_config(hf, **overrides)
  defaults = base.get_config().model.to_dict()  # what config.json does not say
  model = ml_collections.ConfigDict({**defaults, **values})
  config_lib.check_model(model)  # (e.g. more experts per token than experts: a traceback)
  cfg = ModelConfig.from_config(model)
  return MODELS[values["family"]](cfg), load_params(hf_dir, cfg, hf)


def export_config(model_or_config, *, family: str = "", hf_config: dict | None = None):
  """(family table, ModelConfig, config.json dict) that to_hf writes; a ConfigError where no
  Hugging Face family holds the model (before anything is written)."""
  cfg = model_config(model_or_config)
  fam = table(family) if family else table_for(cfg)
  if isinstance(model_or_config, nn.Module):
    kind = type(model_or_config).__name__
  elif isinstance(model_or_config, ModelConfig):
    kind = fam.MODEL_FAMILY
  else:
    m = model_or_config.model if "model" in model_or_config else model_or_config
    kind = m.get("family", fam.MODEL_FAMILY)
  if kind not in (fam.MODEL_FAMILY, MODELS[fam.MODEL_FAMILY].__name__):
    raise ConfigError(f"{fam.MODEL_TYPE} holds a model.family={fam.MODEL_FAMILY} model, not {kind}")
  hf_config = dict(hf_config or {})
  # Rows past model.output_vocab are padding our model never predicts (its logits are masked):
  # cut, since transformers' model would give them probability.
  vocab = hf_config.get("vocab_size", cfg.output_vocab or cfg.vocab_size)
  if vocab > (cfg.output_vocab or cfg.vocab_size):
    raise ConfigError(f"hf_config's vocab_size={vocab} exceeds the model's "
                      f"{cfg.output_vocab or cfg.vocab_size} predicted ids")
  hf_config.pop("torch_dtype", None)
  hf_config.update(tables.config_to_hf(fam, cfg), vocab_size=vocab)
  if fam.MODEL_FAMILY == "encdec" and hf_config.get("decoder_start_token_id") is None:
    # the decoder start our training used (objectives.decoder_start); T5's pad, 0, by default
    starts = [hf_config.get(k) for k in ("bos_token_id", "pad_token_id")]
    hf_config["decoder_start_token_id"] = next((i for i in starts if i is not None and i >= 0), 0)
  return fam, cfg, hf_config


def to_hf(model_or_config, params, out_dir: str, *, family: str = "",
          hf_config: dict | None = None):
  """Writes OUT_DIR/model.safetensors, config.json and generation_config.json that
  transformers' AutoModelForCausalLM.from_pretrained loads. `hf_config` (the config.json the
  model was imported from) keeps its other keys (token ids, ...) and its vocabulary size: padded
  rows are cut. `out_dir` may be gs://... (written locally, then uploaded, config.json last).
  Returns the config.json dict written."""
  fam, cfg, hf_config = export_config(model_or_config, family=family, hf_config=hf_config)
  vocab = hf_config["vocab_size"]
  flat = flax.traverse_util.flatten_dict(_unrolled(params), sep="/")
  tensors = tables.to_hf_tensors(fam, cfg, flat, vocab)
  generation = {k: hf_config[k] for k in GENERATION_KEYS if hf_config.get(k) is not None}
  if not paths.is_remote(out_dir):
    _write_hf(out_dir, tensors, hf_config, generation)
    return hf_config
  with tempfile.TemporaryDirectory(prefix="hf-") as tmp:  # written here, then uploaded
    _write_hf(tmp, tensors, hf_config, generation)
    paths.upload(tmp, out_dir, last=("config.json",))
  return hf_config


def _write_hf(out_dir, tensors, hf_config, generation):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, SAFETENSORS), metadata={"format": "pt"})
  _write_json(os.path.join(out_dir, "config.json"), hf_config)
  _write_json(os.path.join(out_dir, "generation_config.json"), generation)


def hf_forward(model, params, input_ids, attention_mask=None, position_ids=None, *,
               token_type_ids=None, decoder_input_ids=None, decoder_attention_mask=None,
               vocab_size: int | None = None, **unused):
  """Logits [B, T, V] (numpy fp32) for HF-style inputs, like `hf_model(...).logits`.

  Positions are 0..T-1 whatever the mask (as HF's forward without position_ids; pass
  position_ids, e.g. HF generate's cumsum(mask) - 1, to change them). The mask becomes segment
  ids (1 real, 0 pad): each real token attends to the real tokens up to it (all real tokens for
  an encoder), exactly HF's masking, for left, right or inner padding. Logits at padded positions
  are not HF's (theirs are meaningless too). `vocab_size` cuts the vocabulary (a model imported
  with padded rows). EncoderLM (BERT) also takes token_type_ids (default 0); EncoderDecoder (T5)
  needs decoder_input_ids (HF's start with decoder_start_token_id, 0) and takes
  decoder_attention_mask: the logits are the decoder's [B, T_dec, V]. An MoE runs without drops
  (families.for_inference), as HF's Mixtral and Qwen2-MoE do.
  """
  family = {cls: name for name, cls in MODELS.items()}.get(type(model), "decoder")
  model = families.for_inference(model)
  given = [k for k, v in unused.items() if v is not None]
  if token_type_ids is not None and family != "encoder":
    given.append("token_type_ids")
  if family != "encdec":
    given += [k for k, v in (("decoder_input_ids", decoder_input_ids),
                             ("decoder_attention_mask", decoder_attention_mask)) if v is not None]
  elif position_ids is not None:
    given.append("position_ids")
  if given:  # inputs for other families
    raise ConfigError(f"{type(model).__name__} takes no {', '.join(given)}")
  ids, seg, pos = _inputs(model, input_ids, attention_mask, position_ids)
  if family == "encoder":
    types = (np.zeros_like(ids) if token_type_ids is None
             else np.asarray(token_type_ids, np.int32).reshape(ids.shape))
    _in_range("token_type_ids", types, max(model.cfg.type_vocab_size, 1))
    out = _apply(model, params, ids, seg, pos, types)
  elif family == "encdec":
    if decoder_input_ids is None:
      raise ConfigError("EncoderDecoder needs decoder_input_ids (e.g. [[0]]: T5's "
                        "decoder_start_token_id)")
    dec_ids, dec_seg, dec_pos = _inputs(model, decoder_input_ids, decoder_attention_mask, None)
    out = _apply(model, params, ids, dec_ids, seg, pos, dec_seg, dec_pos)
  else:
    out = _apply(model, params, ids, seg, pos)
  return np.asarray(out)[..., :vocab_size]


def _inputs(model, input_ids, attention_mask, position_ids):
  """(ids, segment ids, positions), int32 [B, T]."""
  ids = np.asarray(input_ids, np.int32)
  b, t = ids.shape
  seg = np.ones((b, t), np.int32) if attention_mask is None else np.asarray(attention_mask,
                                                                            np.int32)
  pos = (np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)) if position_ids is None
         else np.broadcast_to(np.asarray(position_ids, np.int32), (b, t)))
  if model.cfg.position == "learned" and pos.max(initial=0) >= model.cfg.max_len:
    raise ConfigError(f"position {pos.max()} is beyond the model's {model.cfg.max_len} positions")
  _in_range("input ids", ids, model.cfg.vocab_size)
  return ids, seg, pos


def _in_range(name: str, ids, size: int):
  """A one-line error for ids outside [0, size) (a lookup gives NaN past the table and wraps
  below it; transformers raises an IndexError)."""
  bad = ids[(ids < 0) | (ids >= size)]
  if bad.size:
    raise ConfigError(f"{name} must be in [0, {size}): got {int(bad.flat[0])}")


@functools.partial(jax.jit, static_argnames="model")
def _apply(model, params, *inputs):
  return model.apply({"params": params}, *inputs)
