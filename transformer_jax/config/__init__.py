"""Loading, overriding and validating configs. Every user mistake becomes one ConfigError line.

A config is a Python file with `get_config(arg=None) -> ml_collections.ConfigDict`; it is named on
the command line as `path/to/file.py[:ARG]` and overridden with `--config.KEY=VALUE`.
Configs are Python and run as code: only load configs you trust.
"""

import ast
import importlib.util
import json
import math
import os
import sys

import ml_collections

from transformer_jax.config import base


class ConfigError(ValueError):
  """A user mistake in a config, flag, file or path; printed as one line, no traceback."""


ENUMS = {
    "model.family": ("decoder", "encoder", "encdec"),
    "model.position": ("learned", "sinusoidal", "rotary", "relative"),
    "model.sinusoidal_variant": ("paper", "t2t"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.norm_position": ("pre", "post"),
    "model.activation": ("gelu", "gelu_exact", "relu", "swiglu", "geglu"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "outputs"),
    "model.attention_impl": ("xla", "dot_product", "cudnn", "splash", "auto"),
    "model.rope_scaling": ("none", "linear", "dynamic", "yarn", "llama3"),
    "model.quantization": ("none", "int8", "fp8"),
    "data.denoise_noise": ("infill", "mask", "delete"),
    "data.format": ("text", "lines", "jsonl", "tsv", "jsonl_pairs", "functions"),
    "optimizer.schedule": ("cosine", "linear", "rsqrt", "wsd", "constant"),
    "train.on_anomaly": ("skip", "rollback", "abort"),
    "checkpoint.on_mismatch": ("refuse", "fresh", "params"),
}
POSITIVE = ("model.num_layers", "model.d_model", "model.num_heads", "model.vocab_size",
            "model.max_len", "data.seq_len", "train.batch_size",
            "train.steps", "train.log_every", "checkpoint.every_steps", "checkpoint.keep",
            "eval.batches", "model.attention_chunks", "model.experts_per_token",
            "model.moe_every", "train.sample_tokens")
NON_NEGATIVE = ("model.num_kv_heads", "model.head_dim", "model.d_ff", "model.dropout_rate",
                "optimizer.learning_rate", "optimizer.warmup_steps", "optimizer.decay_steps",
                "optimizer.weight_decay", "optimizer.grad_clip", "eval.every_steps",
                "checkpoint.keep_period", "train.z_loss",
                "train.spike_factor", "train.spike_warmup_steps", "data.num_workers",
                "train.max_anomalies_in_a_row", "train.microbatches",
                "data.shards", "data.target_len", "model.num_decoder_layers",
                "model.type_vocab_size", "model.query_scale", "train.label_smoothing",
                "mesh.cpu_devices", "model.attention_window", "model.rope_original_max_len",
                "model.rope_attention_factor", "model.global_tokens", "model.random_blocks",
                "model.num_experts", "model.expert_capacity_factor", "model.expert_d_ff",
                "model.num_shared_experts", "model.router_aux_loss", "model.router_z_loss",
                "model.router_jitter", "model.output_vocab")


def exec_python_file(path: str, kind: str, root: str):
  """Runs a Python config file (it is code) with `root` on sys.path, so that it can say
  `from transformer_jax.config import base`; returns the module."""
  if os.path.isdir(path):
    raise ConfigError(f"{kind} file {path} is a folder: give FILE.py[:ARG]")
  if not os.path.isfile(path):
    raise ConfigError(f"{kind} file not found: {path}")
  if not path.endswith(".py"):  # (importlib finds no loader: an AttributeError traceback)
    raise ConfigError(f"{kind} file {path} is no Python file: give FILE.py[:ARG] (a workdir's "
                      f"config.json is read with --workdir alone)")
  if root not in sys.path:
    sys.path.insert(0, root)
  module_spec = importlib.util.spec_from_file_location(
      f"_tjax_{kind}_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:  # (other errors in it are its code's: their traceback says where)
    raise ConfigError(f"{kind} file {path}, line {e.lineno}: {e.msg}") from None
  return module


def load(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """Loads `file.py[:arg]`, applies `KEY=VALUE` overrides (without the `config.` prefix)."""
  path, _, arg = spec.partition(":")
  module = exec_python_file(path, "config", os.path.dirname(os.path.dirname(os.path.abspath(path))))
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg=None)")
  try:
    config = module.get_config(arg or None)
  except (KeyError, ValueError, TypeError) as e:  # an unknown size name; a key given a value
    raise ConfigError(f"{spec}: {e}") from None  # of another type (ml_collections' TypeError)
  unknown = unknown_keys(json.loads(to_json(config)))
  if unknown:  # a recipe's typo (model.d_modle = 64) was trained with, and saved
    raise ConfigError(f"{spec} sets key(s) {', '.join(unknown)} that are no config keys (a typo, "
                      f"or a key this version no longer has; config/base.py has them all)")
  config.lock()
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} is not KEY=VALUE")
    set_value(config, key, value)
  return config


def set_value(config, key: str, text: str):
  """Sets a dotted key from its command-line text, keeping the default's type."""
  *parents, leaf = key.split(".")
  node = config
  for i, name in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise ConfigError(f"unknown config key: {'.'.join(parents[:i + 1])}")
    node = node[name]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ConfigError(f"unknown config key: {key}")
  old = node[leaf]
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(old, str):  # as the shell left it; a quoted '' or "x" is that string
    if text == "None":
      raise ConfigError(f"config key {key} is a string: give {key}= (empty) for none, not None")
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
    value = text[1:-1] if quoted else text
  elif isinstance(old, bool) or isinstance(value, bool):
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0"):
      raise ConfigError(f"config key {key} expects a bool, got {text!r}")
    value = lowered in ("true", "1")
  elif isinstance(old, float) and isinstance(value, int):
    value = float(value)
  if old is not None and not isinstance(value, type(old)) and not (
      isinstance(old, (tuple, list)) and isinstance(value, (tuple, list))):
    raise ConfigError(f"config key {key} expects {type(old).__name__}, got {text!r}")
  with node.unlocked():
    node[leaf] = value


def get(config, key):
  node = config
  for name in key.split("."):
    node = node[name]
  return node


ROPE_SCALING_KEYS = ("rope_factor", "rope_original_max_len", "rope_low_freq_factor",
                     "rope_high_freq_factor", "rope_beta_fast", "rope_beta_slow",
                     "rope_attention_factor")
# The rope_* keys each model.rope_scaling reads (models/layers.py rope_frequencies, as Hugging
# Face's initializers: dynamic NTK scales from max_len, not a pretraining length).
ROPE_READS = {"linear": ("rope_factor",), "dynamic": ("rope_factor",),
              "llama3": ("rope_factor", "rope_original_max_len", "rope_low_freq_factor",
                         "rope_high_freq_factor"),
              "yarn": ("rope_factor", "rope_original_max_len", "rope_beta_fast",
                       "rope_beta_slow", "rope_attention_factor")}
EXPERT_KEYS = ("experts_per_token", "expert_d_ff", "moe_every", "expert_capacity_factor",
               "router_renormalize", "num_shared_experts", "shared_expert_gate",
               "router_aux_loss", "router_z_loss", "router_jitter")


def _unused(m, keys, because: str, section: str = "model") -> None:
  """ConfigError naming a key of `section` (m) set off its default that `because` leaves
  unread."""
  default = get(base.get_config(), section)
  for key in keys:
    if key in m and _off_default(m[key], default[key]):
      raise ConfigError(f"{section}.{key}={m[key]!r} has no effect with {because}; leave it at "
                        f"{default[key]!r}")


def _off_default(value, default) -> bool:
  if default == ():  # (read back from config.json: [])
    return bool(value)
  return value != default


def _check_long_context(m):
  """Sliding windows and RoPE scaling (models/attention.py, models/layers.py)."""
  if not isinstance(m.attention_window, int):
    raise ConfigError(f"model.attention_window must be an int, got {m.attention_window!r}")
  if m.window_pattern.strip("LG") or (m.window_pattern and not m.attention_window):
    raise ConfigError(f"model.window_pattern={m.window_pattern!r}: letters L (local) and G "
                      f"(global) only, with a model.attention_window > 0")
  if (m.global_tokens or m.random_blocks) and not m.attention_window:
    raise ConfigError("model.global_tokens and model.random_blocks add to a sliding window: set "
                      "model.attention_window > 0")
  if m.random_blocks and not (isinstance(m.block_size, int) and m.block_size > 0):
    raise ConfigError(f"model.block_size must be a positive int, got {m.block_size!r}")
  if m.rope_scaling == "none":
    _unused(m, ROPE_SCALING_KEYS, "model.rope_scaling=none")
    return
  if m.position != "rotary":
    raise ConfigError(f"model.rope_scaling={m.rope_scaling} needs model.position=rotary, got "
                      f"{m.position}")
  reads = ROPE_READS.get(m.rope_scaling, ROPE_SCALING_KEYS)
  _unused(m, [k for k in ROPE_SCALING_KEYS if k not in reads],
          f"model.rope_scaling={m.rope_scaling}")
  if not m.rope_factor >= 1:
    raise ConfigError(f"model.rope_factor must be >= 1, got {m.rope_factor!r}")
  if m.rope_scaling == "llama3" and not m.rope_high_freq_factor > m.rope_low_freq_factor > 0:
    raise ConfigError(f"model.rope_high_freq_factor={m.rope_high_freq_factor} must exceed "
                      f"model.rope_low_freq_factor={m.rope_low_freq_factor} > 0")
  if m.rope_scaling == "yarn" and not m.rope_beta_fast > m.rope_beta_slow > 0:
    raise ConfigError(f"model.rope_beta_fast={m.rope_beta_fast} must exceed "
                      f"model.rope_beta_slow={m.rope_beta_slow} > 0")


SEEDS = 2 ** 32  # jax.random.key keeps a seed's low 32 bits (without jax_enable_x64)
SEEDS_RANGE = "in [0, 2**32) (JAX's keys keep 32 bits: 2**32 + s would be seed s)"


def _model_ranges(m) -> tuple:
  """model.* values with bounds other than a sign: (key, whether it holds, what it must be)."""
  return (("model.norm_eps", m.norm_eps > 0, "> 0"), ("model.init_std", m.init_std > 0, "> 0"),
          ("model.relative_buckets", m.position != "relative" or m.relative_buckets >= 4,
           ">= 4 with model.position=relative (T5's exact and log-spaced halves)"),
          ("model.relative_max_distance", m.position != "relative"
           or m.relative_max_distance > m.relative_buckets // 2,
           f"> model.relative_buckets // 2 = {m.relative_buckets // 2} (the exactly "
           f"bucketed distances) with model.position=relative"),
          ("model.rope_theta", m.rope_theta > 0, "> 0"),
          ("model.num_decoder_layers", m.family == "encdec" or not m.num_decoder_layers,
           f"0 for model.family={m.family} (only an encoder-decoder has a decoder stack)"))


def _raise_unless(checks, value) -> None:
  for key, holds, want in checks:
    if not holds:
      raise ConfigError(f"{key} must be {want}, got {value(key)!r}")


def _check_ranges(config):
  """Values with bounds other than a sign: each (key, whether it holds, what it must be)."""
  o, m = config.optimizer, config.model
  checks = (("seed", 0 <= config.seed < SEEDS, SEEDS_RANGE),
            ("optimizer.min_lr_ratio", 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
            ("optimizer.wsd_decay_fraction", 0 < o.wsd_decay_fraction <= 1, "in (0, 1]"),
            ("optimizer.b1", 0 <= o.b1 < 1, "in [0, 1)"), ("optimizer.b2", 0 <= o.b2 < 1,
                                                            "in [0, 1)"),
            ("optimizer.eps", o.eps > 0, "> 0"),
            ("train.label_smoothing", 0 <= config.train.label_smoothing < 1, "in [0, 1)"),
            ("train.spike_factor", config.train.spike_factor == 0
             or config.train.spike_factor > 1, "0 (off) or > 1 (a multiple of the recent loss)"),
            ("train.sample_prompt", not config.train.sample_prompt or m.family != "encoder",
             "empty for an encoder (BERT generates no text; sample --fill_mask fills masks)"))
  _raise_unless(checks + _model_ranges(m), lambda key: get(config, key))


def _check_moe(m, sizes):
  """Mixture-of-Experts keys (models/moe.py); `sizes`: the mesh's axis sizes, if known."""
  if not m.num_experts:
    _unused(m, EXPERT_KEYS, "model.num_experts=0")
    return
  deepest = max(m.num_layers, m.num_decoder_layers if m.family == "encdec" else 0)
  if m.moe_every > deepest:
    raise ConfigError(f"model.moe_every={m.moe_every} exceeds the {deepest} layers of the "
                      f"deepest stack: no layer would get experts")
  if m.shared_expert_gate and not m.num_shared_experts:
    raise ConfigError("model.shared_expert_gate gates the shared experts: set "
                      "model.num_shared_experts > 0, or leave the gate off")
  if m.experts_per_token > m.num_experts:
    raise ConfigError(f"model.experts_per_token={m.experts_per_token} exceeds "
                      f"model.num_experts={m.num_experts}")
  if m.scan_layers and m.moe_every > 1:
    raise ConfigError(f"model.scan_layers needs every layer alike: model.moe_every="
                      f"{m.moe_every} mixes dense and MoE layers (set scan_layers=False)")
  if not m.router_jitter < 1:
    raise ConfigError(f"model.router_jitter must be in [0, 1), got {m.router_jitter}")
  if sizes and m.num_experts % sizes["expert"]:
    raise ConfigError(f"model.num_experts={m.num_experts} is not divisible by mesh.expert="
                      f"{sizes['expert']} (each device holds whole experts)")


def _check_signs(config, positive, non_negative, prefix=""):
  for keys, holds, want in ((positive, lambda v: v > 0, "positive"),
                            (non_negative, lambda v: v >= 0, ">= 0")):
    for key in keys:
      value = get(config, key[len(prefix):])
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not holds(value):
        raise ConfigError(f"{key} must be {want}, got {value!r}")


def _check_heads(m):
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} does not divide "
                      f"model.d_model={m.d_model}")
  kv = m.num_kv_heads or m.num_heads
  if m.num_heads % kv:
    raise ConfigError(f"model.num_kv_heads={kv} does not divide model.num_heads={m.num_heads}")
  head_dim = m.head_dim or m.d_model // m.num_heads
  if m.position == "rotary" and head_dim % 2:
    raise ConfigError(f"rotary positions need an even head dim, got {head_dim}")
  if m.output_vocab > m.vocab_size:
    raise ConfigError(f"model.output_vocab={m.output_vocab} exceeds model.vocab_size="
                      f"{m.vocab_size}")


def check_model(m):
  """The checks of model.* alone (sizes, heads, RoPE, windows, experts) that need no mesh or
  data: for a model built without a whole config (convert.hf.from_hf, a workdir's config.json
  read by sample, evaluate, export)."""
  positive, non_negative = ([k for k in keys if k.startswith("model.")]
                            for keys in (POSITIVE, NON_NEGATIVE))
  _check_signs(m, positive, non_negative, prefix="model.")
  _check_heads(m)
  _raise_unless(_model_ranges(m), lambda key: m[key.partition(".")[2]])
  _check_long_context(m)
  _check_moe(m, None)


def sequence_size(mesh_cfg, num_devices: int | None = None) -> int:
  """The mesh's sequence axis (ICI x DCN): mesh.sequence=-1 fills it when the device count is
  known (else counts as 1), and mesh.dcn_sequence multiplies it."""
  if num_devices is not None:
    return mesh_shape(mesh_cfg, num_devices)["sequence"]
  p, dcn = mesh_cfg.sequence, mesh_cfg.get("dcn_sequence", 1)
  return (p if isinstance(p, int) and p > 1 else 1) * (dcn if isinstance(dcn, int) else 1)


def _check_sequence_parallel(config, num_devices=None):
  """A sequence axis > 1: ring attention over packed segments (models/ring.py)."""
  p, m = sequence_size(config.mesh, num_devices), config.model
  if p <= 1:
    return
  why = ("model.family=encdec (cross-attention)" if m.family == "encdec" else
         "model.position=relative (a bias)" if m.position == "relative" else
         "model.global_tokens / random_blocks" if m.global_tokens or m.random_blocks else None)
  if why:
    raise ConfigError(f"a sequence axis of {p} (mesh.sequence x mesh.dcn_sequence: ring "
                      f"attention) cannot serve {why}; use mesh.sequence=1")
  if config.data.seq_len % (2 * p):
    raise ConfigError(f"data.seq_len={config.data.seq_len} must be a multiple of twice the "
                      f"sequence axis, {2 * p} (each device holds two balanced chunks)")


def _numbers(tree, prefix=""):
  """(dotted key, float) of every float in a config dict, in tuples and lists too."""
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      yield from _numbers(value, name + ".")
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, float):
        yield name, v


def validate(config, num_devices: int | None = None):
  """Cheap checks of the config's values, run before anything is compiled (the objective's are
  data/objectives' `check`, the data's pipeline.validate)."""
  for key, value in _numbers(config.to_dict()):  # ("1e999" reads as inf: NaN losses, exit 0)
    if not math.isfinite(value):
      raise ConfigError(f"{key}={value!r} must be a finite number")
  for key, allowed in ENUMS.items():
    if get(config, key) not in allowed:
      raise ConfigError(f"{key}={get(config, key)!r} is not one of {', '.join(allowed)}")
  _check_signs(config, POSITIVE, NON_NEGATIVE)
  m = config.model
  _check_heads(m)
  if m.position == "learned" and m.max_len < config.data.seq_len:
    raise ConfigError(f"model.max_len={m.max_len} is shorter than data.seq_len="
                      f"{config.data.seq_len} (learned positions): set --config.data.seq_len="
                      f"{m.max_len} (or less), or a larger model.max_len for a new model")
  if m.random_blocks and m.max_len < config.data.seq_len:  # (a bidirectional layer's draw)
    raise ConfigError(f"model.random_blocks are drawn over model.max_len={m.max_len}'s blocks "
                      f"in scoring and generation, over data.seq_len={config.data.seq_len}'s in "
                      f"training: set model.max_len >= data.seq_len")
  if not 0 <= m.dropout_rate < 1:
    raise ConfigError(f"model.dropout_rate must be in [0, 1), got {m.dropout_rate}")
  if m.attention_impl == "splash":  # platform: loop.setup (else at trace); lengths: at trace
    why = ("model.position=relative (a bias)" if m.position == "relative" else
           "model.family=encdec (cross-attention)" if m.family == "encdec" else None)
    if why:
      raise ConfigError(f"model.attention_impl=splash cannot serve {why}; use auto, xla or "
                        f"dot_product")
  if m.attention_impl == "cudnn" and m.dtype != "bfloat16":
    raise ConfigError(f"model.attention_impl=cudnn needs model.dtype=bfloat16, got {m.dtype}")
  _check_long_context(m)
  if not config.train.distill.teacher:
    _unused(config.train.distill, ("alpha", "temperature", "hidden_weight", "hidden_layers"),
            "no train.distill.teacher", "train.distill")
  _check_ranges(config)
  _check_sequence_parallel(config, num_devices)
  t = config.train
  micro = t.microbatches or 1  # (0: training/fit.py chooses a divisor that the mesh allows)
  if t.batch_size % micro:
    raise ConfigError(f"train.microbatches={t.microbatches} does not divide "
                      f"train.batch_size={t.batch_size}")
  if isinstance(t.loss_chunk, bool) or not isinstance(t.loss_chunk, int) or t.loss_chunk < 0:
    raise ConfigError(f"train.loss_chunk must be an int >= 0 (tokens), got {t.loss_chunk!r}")
  sizes = mesh_shape(config.mesh, num_devices) if num_devices is not None else None
  _check_moe(m, sizes)
  if sizes:
    batch_shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    if (t.batch_size // micro) % batch_shards:
      raise ConfigError(
          f"train.batch_size={t.batch_size} (per microbatch {t.batch_size // micro}) "
          f"is not divisible by the batch-sharding mesh axes data*fsdp*expert={batch_shards}")
  return config


# Outer to inner: tensor parallelism gets the closest devices, the sequence ring the next, then
# the experts' all-to-all.
MESH_AXIS_NAMES = ("data", "fsdp", "expert", "sequence", "tensor")


def mesh_dcn_shape(mesh_cfg) -> dict:
  """Slices each mesh axis spans over the data-center network (mesh.dcn_*; 1 = within a slice)."""
  dcn = {a: mesh_cfg[f"dcn_{a}"] for a in MESH_AXIS_NAMES}
  for name, size in dcn.items():
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
      raise ConfigError(f"mesh.dcn_{name} must be a positive int, got {size!r}")
  return dcn


def mesh_ici_dcn_shape(mesh_cfg, num_devices: int) -> tuple[dict, dict]:
  """(per-slice ICI sizes, DCN sizes): mesh.data/fsdp/sequence/tensor are per slice (-1 fills it),
  mesh.dcn_* count slices; their products must equal the devices per slice and the slices."""
  dcn = mesh_dcn_shape(mesh_cfg)
  slices = math.prod(dcn.values())
  if num_devices % slices:
    raise ConfigError(f"mesh.dcn_* = {slices} slices ({dcn}) do not "
                      f"divide the device count {num_devices}")
  per_slice = num_devices // slices
  where = f"the devices per slice {per_slice} ({slices} slices)" if slices > 1 else \
      f"the device count {num_devices}"
  sizes = {a: mesh_cfg[a] for a in MESH_AXIS_NAMES}
  for name, size in sizes.items():
    if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ConfigError(f"mesh.{name} must be a positive int or -1, got {size!r}")
  fill = [k for k, v in sizes.items() if v == -1]
  if len(fill) > 1:
    raise ConfigError(f"only one mesh axis may be -1, got {', '.join('mesh.' + k for k in fill)}")
  known = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if per_slice % known:
      raise ConfigError(f"mesh axes {sizes} cannot fill {where}")
    sizes[fill[0]] = per_slice // known
  if math.prod(sizes.values()) != per_slice:
    raise ConfigError(f"mesh {'*'.join(MESH_AXIS_NAMES)} = {math.prod(sizes.values())} "
                      f"({sizes}) does not equal {where}")
  return sizes, dcn


def mesh_shape(mesh_cfg, num_devices: int) -> dict:
  """The whole mesh's axis sizes: per-slice ICI size x DCN slices (see mesh_ici_dcn_shape)."""
  ici, dcn = mesh_ici_dcn_shape(mesh_cfg, num_devices)
  return {a: ici[a] * dcn[a] for a in MESH_AXIS_NAMES}


def to_json(config) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def write_json(config, path: str):
  """Writes the config as JSON atomically (locally a temporary file renamed over `path`; a gs://
  object is written whole or not at all): a crash mid-write leaves the previous file, never half
  of one."""
  from transformer_jax.config import paths  # pylint: disable=g-import-not-at-top
  paths.write_text(path, to_json(config))


def read_json(path: str) -> dict:
  """A saved config.json (a local path or gs:// URL) as a dict; invalid JSON is a one-line
  ConfigError."""
  from transformer_jax.config import paths  # pylint: disable=g-import-not-at-top
  text = paths.read_text(path)
  redo = ("delete it and re-run with --config=FILE.py, the recipe of this workdir (the "
          "checkpoints' shapes are still checked when they are restored)")
  try:
    saved = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); {redo}") from None
  if not isinstance(saved, dict):
    raise ConfigError(f"{path} holds a JSON {type(saved).__name__}, not a config (an object); "
                      f"{redo}")
  return saved


def defaults() -> dict:
  """Every key at its default (config/base.py, the one source of defaults), as plain data."""
  return json.loads(to_json(base.get_config()))


def with_defaults(saved: dict, default: dict | None = None) -> dict:
  """`saved` (e.g. a workdir's config.json), with each key it lacks (one newer than the file)
  at its default."""
  out = dict(defaults() if default is None else default)
  for key, value in saved.items():
    both = isinstance(value, dict) and isinstance(out.get(key), dict)
    out[key] = with_defaults(value, out[key]) if both else value
  return out


def _fits(value, default) -> bool:
  """Whether a saved value has its default's JSON type (an int where a float is due fits)."""
  if default is None or isinstance(default, dict):
    return default is None or isinstance(value, dict)
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, (list, tuple)):  # (a tuple default is a JSON list)
    return isinstance(value, (list, tuple))
  if isinstance(default, (int, float)):
    return isinstance(value, int) or isinstance(value, float) and isinstance(default, float)
  return isinstance(value, type(default))


def mistyped_keys(saved: dict, default: dict | None = None, prefix: str = "") -> list[str]:
  """The dotted keys of `saved` whose value is not of config/base.py's type for them."""
  default = defaults() if default is None else default
  out = []
  for key, value in saved.items():
    if key in default and isinstance(value, dict) and isinstance(default[key], dict):
      out += mistyped_keys(value, default[key], f"{prefix}{key}.")
    elif key in default and not _fits(value, default[key]):
      out.append(f"{prefix}{key}={value!r}")
  return out


def unknown_keys(saved: dict, default: dict | None = None, prefix: str = "") -> list[str]:
  """The dotted keys of `saved` that config/base.py does not have."""
  default = defaults() if default is None else default
  out = []
  for key, value in saved.items():
    if key not in default:
      out.append(prefix + key)
    elif isinstance(value, dict) and isinstance(default[key], dict):
      out += unknown_keys(value, default[key], f"{prefix}{key}.")
  return out


def from_json_file(path: str) -> ml_collections.ConfigDict:
  """A saved config (a workdir's config.json); keys added since it was written get their
  defaults (config/base.py, inside the package), so older workdirs still resume. A key the
  package does not know (a hand edit's typo would be kept, and then accepted on the command
  line) is a one-line error."""
  saved, default = read_json(path), defaults()
  unknown = unknown_keys(saved, default)
  if unknown:
    raise ConfigError(f"{path} has key(s) {', '.join(unknown)} that are no config keys (a typo, "
                      f"or a key this version no longer has): remove them from the file")
  mistyped = mistyped_keys(saved, default)
  if mistyped:  # (a hand edit's "d_model": "64" was a traceback in the model)
    raise ConfigError(f"{path} has {', '.join(mistyped)}, not of the type config/base.py gives "
                      f"that key: correct it in the file")
  config = ml_collections.ConfigDict(with_defaults(saved, default))
  config.sharding_rules = tuple(
      (name, tuple(axes) if isinstance(axes, list) else axes)
      for name, axes in config.sharding_rules)
  config.lock()
  try:  # every command builds its model from it
    check_model(config.model)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  return config


def without_teacher(config) -> ml_collections.ConfigDict:
  """A distilled student's config as every command but training reads it: its teacher (and the
  teacher's weights in the loss) only matter in training."""
  with config.unlocked():
    config.train.distill = base.get_config().train.distill
  return config


def any_platform(config) -> ml_collections.ConfigDict:
  """A saved config made to run where it was not trained: one platform's attention kernel
  (splash, cudnn) becomes `auto`, which picks that kernel where this machine has it."""
  if config.model.get("attention_impl", "xla") in ("splash", "cudnn"):
    config.model.attention_impl = "auto"
  return config
