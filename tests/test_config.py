"""Configs: every recipe builds and steps at a tiny size; every user mistake is one clean line."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from transformer_jax import cli
from transformer_jax import config as config_lib
from transformer_jax import train as train_cli
from transformer_jax.config import ConfigError
from transformer_jax.parallel import sharding
from transformer_jax.training.step import Trainer
from tests.conftest import REPO, synthetic_batch, tiny_overrides

CONFIG_FILES = sorted(p for p in glob.glob(f"{REPO}/configs/*.py")
                      if not p.endswith(("__init__.py", "base.py")))
SHRINK = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=0",
          "model.vocab_size=128", "model.max_len=16", "data.seq_len=16", "train.batch_size=2",
          "train.microbatches=1", "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "mesh.expert=1",
          "model.num_decoder_layers=0", "model.moe_every=1"]  # (1 layer: an MoE one)


def _specs(first_only=False):
  """Every config file, and every size of those that define SIZES (or only the first size)."""
  for path in CONFIG_FILES:
    sizes = list(getattr(_module(path), "SIZES", None) or [])
    sizes = sizes[:1] if first_only else sizes
    yield from ([f"{path}:{s}" for s in sizes] if sizes else [path])


def _module(path):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("m_" + os.path.basename(path)[:-3], path)
  m = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(m)
  return m


@pytest.mark.parametrize("spec", list(_specs()))
def test_every_config_size_validates(spec):
  config_lib.validate(config_lib.load(spec), 8)  # the real size (any mesh fill on 8 devices)
  config_lib.validate(config_lib.load(spec, SHRINK), 1)


@pytest.mark.parametrize("spec", list(_specs(first_only=True)))
def test_every_config_file_runs_one_step_shrunk(spec):
  """One step of each recipe file shrunk to 1 layer of width 32 (its sizes differ only in the
  numbers the shrink overrides)."""
  config = config_lib.load(spec, SHRINK)
  config_lib.validate(config, 1)
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  state = trainer.init_state(0)
  batch = synthetic_batch(config, trainer.model, rows=2, length=16)
  state, m = trainer.train_step(state, trainer.put_batch(batch), jax.random.key(0))
  assert np.isfinite(float(m["loss"])) and int(state.step) == 1


@pytest.mark.parametrize("size,millions", [("small", 124), ("medium", 355), ("large", 774),
                                           ("xl", 1558)])
def test_gpt2_sizes_have_the_published_parameter_counts(size, millions):
  config = config_lib.load(f"{REPO}/configs/gpt2.py:{size}")
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params))
  # Published counts use vocab 50257; ours pads to 50304 (+47 rows of d_model).
  assert abs(n - 47 * config.model.d_model - millions * 1e6) < 0.01 * millions * 1e6


BAD = [
    (["model.num_heads=5"], "model.num_heads=5 does not divide model.d_model=64"),
    (["mesh.data=3"], "does not equal the device count"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "only one mesh axis may be -1"),
    (["train.batch_size=3", "mesh.data=2"], "not divisible by the batch-sharding mesh axes"),
    (["train.steps=0"], "train.steps must be positive"),
    (["train.batch_size=-4"], "train.batch_size must be positive"),
    (["model.nope=1"], "unknown config key: model.nope"),
    (["nothing.here=1"], "unknown config key: nothing"),
    (["model.num_layers=two"], "model.num_layers expects int"),
    (["model.position=alibi"], "model.position='alibi' is not one of"),
    (["model.vocab_size=100"], "model.vocab_size=100 is smaller than the vocabulary"),
    (["model.output_vocab=100"], "model.output_vocab=100 is smaller than the vocabulary"),
    (["data.tokenizer=/nonexistent/tok.model"], "python -m transformer_jax.tokenizer"),
    (["data.corpus=/nonexistent/*.txt"], "/nonexistent/*.txt"),
    (["model.max_len=8"], "model.max_len=8 is shorter than data.seq_len=32 (learned positions): "
                          "set --config.data.seq_len=8 (or less)"),
    # before training, not at its first evaluation or after its last step
    (["eval.tasks=('/nonexistent.jsonl',)"], "task file '/nonexistent.jsonl' does not exist"),
    (["train.sample_prompt=def"], "+ train.sample_tokens=64 exceeds model.max_len=32"),
    (["model.family=encoder", "data.objective=mlm", "train.sample_prompt=def"],
     "train.sample_prompt must be empty for an encoder"),
    (["model.position=relative", "model.relative_max_distance=16"],
     "model.relative_max_distance must be > model.relative_buckets // 2 = 16"),
    (["model.position=relative", "model.relative_buckets=3"], "model.relative_buckets must be"),
    (["model.position=rotary", "model.rope_theta=0.0"], "model.rope_theta must be > 0"),
    (["train.label_smoothing=1.5"], "train.label_smoothing must be in [0, 1)"),
    (["optimizer.learning_rate=1e999"], "optimizer.learning_rate=inf must be a finite number"),
    (["model.init_std=-1e999"], "model.init_std=-inf must be a finite number"),
    (["train.spike_factor=0.5"], "train.spike_factor must be 0 (off) or > 1"),
    (["model.rope_factor=8.0"], "model.rope_factor=8.0 has no effect with model.rope_scaling=none"),
    (["model.num_shared_experts=2"], "model.num_shared_experts=2 has no effect with "
                                     "model.num_experts=0"),
    (["model.router_aux_loss=0.1"], "model.router_aux_loss=0.1 has no effect with "
                                    "model.num_experts=0"),
    (["train.sample_tokens=-3"], "train.sample_tokens must be positive"),
    (["seed=4294967296"], "seed must be in [0, 2**32) (JAX's keys keep 32 bits"),
    (["eval.tasks=(1,2)"], "eval.tasks=(1, 2) must name tasks as strings"),  # (tracebacks)
    (["sharding_rules=(1,2)"], "sharding_rules: 1 is not a (logical axis, mesh axes) pair"),
    # a key the scaling kind never reads (dynamic NTK scales from model.max_len: no scaling
    # happened below it, silently)
    (["model.position=rotary", "model.rope_scaling=dynamic", "model.rope_factor=4.0",
      "model.rope_original_max_len=16"], "model.rope_original_max_len=16 has no effect with "
     "model.rope_scaling=dynamic; leave it at 0"),
    (["model.position=rotary", "model.rope_scaling=llama3", "model.rope_factor=4.0",
      "model.rope_beta_fast=64.0"], "model.rope_beta_fast=64.0 has no effect with "
     "model.rope_scaling=llama3; leave it at 32.0"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_config_gives_one_line_error(overrides, message, tiny_data, tmp_path, capsys,
                                         monkeypatch):
  argv = [f"--config={REPO}/configs/gpt2.py:tiny", f"--workdir={tmp_path}/w"]
  bad = dict(kv.split("=", 1) for kv in overrides)  # (tiny's value of a key it sets replaced)
  argv += [f"--config.{kv}" for kv in tiny_overrides(tiny_data, **{"mesh.data": 2, **bad})]
  monkeypatch.setattr(sys, "argv", ["train"] + argv)
  monkeypatch.setattr(jax, "devices", lambda *a: jax.local_devices()[:2])
  with pytest.raises(SystemExit) as exit_info:
    cli.run(train_cli.main)
  err = capsys.readouterr().err.strip()
  assert exit_info.value.code == 2
  assert err.startswith("error: ") and "\n" not in err, err
  assert message in err, err
  assert not os.path.exists(f"{tmp_path}/w/checkpoints")


def test_a_grid_axis_the_command_also_sets_is_refused():
  """benchmark --grid's children get the command's overrides, then their point's: a key in both
  would be given twice (refused by cli.parse; it took the point's value silently before)."""
  from transformer_jax import benchmark  # pylint: disable=g-import-not-at-top
  points = benchmark._grid_points  # pylint: disable=protected-access
  with pytest.raises(ConfigError) as e:
    points(f"{REPO}/configs/gpt2.py:tiny", ["train.steps=3", "train.batch_size=8"],
           "model.remat=none; train.batch_size=4,8")
  assert str(e.value) == ("--grid varies train.batch_size, which --config.train.batch_size=8 "
                          "also sets: give it in one place")


@pytest.mark.parametrize("overrides,message", [
    (["optimizer.min_lr_ratio=-1.0"], "optimizer.min_lr_ratio must be in [0, 1], got -1.0"),
    (["optimizer.wsd_decay_fraction=1.5"], "optimizer.wsd_decay_fraction must be in (0, 1]"),
    (["optimizer.b2=2.0"], "optimizer.b2 must be in [0, 1)"),
    (["optimizer.eps=0.0"], "optimizer.eps must be > 0"),
    (["model.norm_eps=-1.0"], "model.norm_eps must be > 0"),
    (["model.init_std=-1.0"], "model.init_std must be > 0"),
    (["model.num_decoder_layers=4"], "model.num_decoder_layers must be 0 for model.family="),
    (["model.num_experts=4", "model.moe_every=3"], "model.moe_every=3 exceeds the 2 layers"),
    (["train.distill.hidden_layers=((0, 1),)"], "train.distill.hidden_layers=((0, 1),) has no "
                                                 "effect with no train.distill.teacher"),
])
def test_values_out_of_their_range_are_refused(overrides, message):
  """A negative learning-rate floor (gradient ascent at the end), a cool-down longer than the
  run, an MoE with no MoE layer, a decoder depth a decoder-only model ignores, distillation
  settings without a teacher: refused."""
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", overrides)
  with pytest.raises(ConfigError) as e:
    config_lib.validate(config)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_unwritable_workdir(tiny_data, tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data))
  from transformer_jax.training import loop  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match="is not writable"):
    loop.setup(config, str(blocker / "sub"), devices=jax.devices()[:1])
  with pytest.raises(ConfigError, match=rf"^workdir {blocker} is a file, not a folder$"):
    loop.setup(config, str(blocker), devices=jax.devices()[:1])  # ("File exists")


def test_cli_errors_without_traceback_in_a_real_process(tmp_path):
  cmd = [sys.executable, "-m", "transformer_jax.train", f"--config={REPO}/configs/smoke.py",
         f"--workdir={tmp_path}", "--config.model.num_heads=3"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip() == "error: model.num_heads=3 does not divide model.d_model=128"
  assert "Traceback" not in out.stderr + out.stdout


def test_a_file_where_a_folder_or_a_python_config_belongs_is_one_line(tmp_path):
  """--config=W/config.json (importlib has no loader for it: AttributeError), and an output
  folder at or under a file (inspect --out, clean --out, convert export --hf_dir: tracebacks)."""
  from transformer_jax import clean, inspect  # pylint: disable=g-import-not-at-top
  from transformer_jax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
  file = tmp_path / "config.json"
  file.write_text("{}")
  with pytest.raises(ConfigError, match=r"config.json is no Python file: give FILE.py"):
    config_lib.load(str(file))
  recipe = tmp_path / "mine.py"  # a recipe's own typo, and a syntax error: one line each
  recipe.write_text("from transformer_jax.config import base\n\ndef get_config(arg=None):\n"
                    "  c = base.get_config()\n  c.model.d_modle = 64\n  return c\n")
  with pytest.raises(ConfigError, match=r"^\S+mine.py sets key\(s\) model.d_modle that are no "
                                        r"config keys \(a typo"):
    config_lib.load(str(recipe))
  recipe.write_text("from transformer_jax.config import base\n\ndef get_config(arg=None):\n"
                    "  c = base.get_config()\n  c.model.d_model = 'wide'\n  return c\n")
  with pytest.raises(ConfigError, match=r"^\S+mine.py: Could not override field 'd_model'"):
    config_lib.load(str(recipe))  # (ml_collections' TypeError was a traceback)
  recipe.write_text("def get_config(arg=None):\n  return {\n")
  with pytest.raises(ConfigError, match=r"^config file \S+mine.py, line 2: '\{' was never closed$"):
    config_lib.load(str(recipe))
  (tmp_path / "w" / "checkpoints").mkdir(parents=True)  # (refused before it is read)
  (tmp_path / "w" / "config.json").write_text("{}")
  for main, argv in (
      (clean.main, ["--corpus=x", f"--out={file}"]),
      (inspect.main, [f"--workdir={tmp_path}", "--text=x", f"--out={file}/sub"]),
      (inspect.main, ["probe", f"--workdir={tmp_path}", f"--data={file}", f"--out={file}"]),
      (convert_cli.main, ["export", f"--workdir={tmp_path / 'w'}", f"--hf_dir={file}/hf"])):
    with pytest.raises(ConfigError, match=f"cannot be made a folder: {file} is a file$"):
      main(argv)


def test_parse_flags():
  spec, overrides, values = cli.parse(
      ["--config=c.py:x", "--config.model.d_model=8", "--steps=3", "--data-only"],
      {"steps": 1, "data_only": False})
  assert spec == "c.py:x" and overrides == ["model.d_model=8"]
  assert values == {"steps": 3, "data_only": True}
  with pytest.raises(ConfigError, match="unknown flag --stpes"):
    cli.parse(["--stpes=3"], {"steps": 1})
  with pytest.raises(ConfigError, match="--steps expects int"):
    cli.parse(["--steps=x"], {"steps": 1})
  assert cli.parse(["--init=false"], {"init": True})[2] == {"init": False}
  with pytest.raises(ConfigError, match="--config given twice"):
    cli.parse(["--config=a.py", "--config=b.py"], {})
  with pytest.raises(ConfigError, match="--workdir given twice .'a', 'b'."):  # (b won)
    cli.parse(["--workdir=a", "--workdir", "b"], {"workdir": ""})
  assert cli.parse(["--steps=3", "--steps", "3"], {"steps": 1})[2] == {"steps": 3}
  with pytest.raises(ConfigError, match="smoke.py takes no :ARG"):
    config_lib.load(f"{REPO}/configs/smoke.py:bogus")
  config = config_lib.base.get_config()
  for text, want in (("''", ""), ('"a b"', "a b"), ("it's", "it's"), ("x", "x")):
    config_lib.set_value(config, "train.sample_prompt", text)
    assert config.train.sample_prompt == want
  with pytest.raises(ConfigError, match="give data.data_dir= .empty. for none, not None"):
    config_lib.set_value(config, "data.data_dir", "None")  # it became a folder named None
  with pytest.raises(ConfigError, match="flag --init expects a bool .true/false., got 'ture'"):
    cli.parse(["--init=ture"], {"init": False})  # it read as false
  # `--workdir=~/run`: the shell leaves ~ alone after `=`; it was a folder ./~/run. Text stays.
  home = os.path.expanduser("~")
  spec, _, values = cli.parse(["--workdir=~/run", "--out", "~/o", "--prompt=~/x",
                               "--config=~/c.py"], {"workdir": "", "out": "", "prompt": ""})
  assert values == {"workdir": f"{home}/run", "out": f"{home}/o", "prompt": "~/x"}
  assert spec == f"{home}/c.py"


def test_commands_refuse_flags_they_would_ignore(tmp_path):
  """sample/evaluate/inspect read the workdir's config (a --config was dropped), and the
  tokenizer command takes corpus, sizes and output from a --config (its own flags were)."""
  from transformer_jax import evaluate, inspect, sample, tokenizer  # pylint: disable=g-import-not-at-top
  for main in (sample.main, evaluate.main, inspect.main):
    with pytest.raises(ConfigError, match="it takes no --config"):
      main([f"--workdir={tmp_path}", "--config=configs/gpt2.py:tiny"])
  with pytest.raises(ConfigError, match="--vocab_size, --out come.s. from --config"):
    tokenizer.from_config(f"{REPO}/configs/gpt2.py:tiny", [],
                          dict(tokenizer.FLAGS, out="x.model", vocab_size=100))
  # the sentinels a config needs (T5's spans at 2048 tokens: 114), not always 100
  made = lambda *o: tokenizer.from_config(f"{REPO}/configs/t5.py:tiny", o, dict(
      tokenizer.FLAGS))["special"]
  assert made() == "mask,sentinels:100,ul2"
  assert made("data.seq_len=2048") == "mask,sentinels:114,ul2"
  for objective in ("clm", "prefix_lm"):  # a decoder's: none (prefix_lm's asked for T5's)
    assert tokenizer.from_config(f"{REPO}/configs/gpt2.py:tiny", [f"data.objective={objective}"],
                                 dict(tokenizer.FLAGS))["special"] == ""
  # --workdir: the config it saved (launch scripts given no CONFIG, e.g. a sweep's runs, made
  # the default tokenizer only, and the run then failed on its own)
  saved = config_lib.load(f"{REPO}/configs/t5.py:tiny", [f"data.tokenizer={tmp_path}/t.model"])
  (tmp_path / "config.json").write_text(saved.to_json())
  args = tokenizer.from_config("", ["data.seq_len=2048"], dict(tokenizer.FLAGS,
                                                               workdir=str(tmp_path)))
  assert (args["out"], args["special"]) == (f"{tmp_path}/t.model", "mask,sentinels:114,ul2")
  assert tokenizer.main([f"--workdir={tmp_path}", f"--config={REPO}/configs/t5.py:tiny"]) == 2
  with pytest.raises(ConfigError, match="^--format='txt' is unknown"):  # the flag typed
    tokenizer.run(dict(tokenizer.FLAGS, corpus="x/*.txt", vocab_size=100, format="txt",
                       out=f"{tmp_path}/flags.model"))


def test_parse_flags_with_space_separated_values():
  """`--workdir runs/x` as launch/local.sh takes it; a bare bool flag does not eat what follows."""
  spec, overrides, values = cli.parse(
      ["--config", "c.py:x", "--config.model.d_model", "8", "--workdir", "runs/x", "--data-only",
       "--steps", "3"], {"steps": 1, "data_only": False, "workdir": ""})
  assert spec == "c.py:x" and overrides == ["model.d_model=8"]
  assert values == {"steps": 3, "data_only": True, "workdir": "runs/x"}
  with pytest.raises(ConfigError, match="unexpected argument 'x'"):
    cli.parse(["--data-only", "x"], {"data_only": False})
  with pytest.raises(ConfigError, match="flag --workdir needs a value"):
    cli.parse(["--workdir"], {"workdir": ""})


@pytest.mark.parametrize("opt_out", [False, True])
def test_entry_points_reexec_with_malloc_tunables(opt_out):
  """`cli.entry` re-executes the command once with glibc tunables (unless opted out)."""
  code = ("import os; from transformer_jax import cli; cli.reexec_with_tuned_malloc(); "
          "print(os.environ.get('GLIBC_TUNABLES'))")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "TJAX_SYSTEM_MALLOC")}
  if opt_out:
    env["TJAX_SYSTEM_MALLOC"] = "1"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=60, check=True).stdout.strip()
  assert out == ("None" if opt_out else cli.MALLOC_TUNABLES)


@pytest.mark.parametrize("given", [None, "0.6"])
def test_entry_points_give_jax_the_gpu_memory_share_that_aot_checks(given):
  """JAX alone would take 0.75 of a GPU's memory; `aot --topology=GPU` proves the fit in
  topology.gpu_mem_fraction(): every entry point sets the same share (a user's value wins)."""
  code = ("import os; from transformer_jax import cli; from transformer_jax.perf import topology; "
          "cli.entry(lambda argv: print(os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'], "
          "topology.gpu_mem_fraction()), compile_cache=False)")
  env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
  env.update({"TJAX_SYSTEM_MALLOC": "1", **({"XLA_PYTHON_CLIENT_MEM_FRACTION": given}
                                              if given else {})})
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=60, check=True).stdout.split()
  assert out == [given or "0.9", str(float(given or "0.9"))]


def test_older_saved_config_gains_new_keys_at_their_defaults(tmp_path):
  """A workdir's config.json written before a key existed still loads, validates and resumes."""
  saved = json.loads(config_lib.to_json(config_lib.load(f"{REPO}/configs/gpt2.py:tiny",
                                                        ["model.d_model=96"])))
  for section, key in (("model", "attention_impl"), ("model", "sentence_head"),
                       ("data", "packing"), ("data", "pretokenize")):
    del saved[section][key]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = config_lib.from_json_file(str(tmp_path / "config.json"))
  config_lib.validate(config)
  assert (config.model.attention_impl, config.data.packing, config.model.d_model) == (
      "auto", "first_fit", 96)
  saved["train"]["stpes"], saved["mesh"]["dat"] = 5, 2  # a hand edit's typos are no keys
  (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match="has key.s. mesh.dat, train.stpes that are no config"):
    config_lib.from_json_file(str(tmp_path / "config.json"))


def test_sharding_rules_name_only_logical_axes_once():
  """A misspelled logical name was no rule (its axis silently replicated: FSDP off), and a
  second rule for a name never applied (the first wins): both refused."""
  from transformer_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny")
  rules = tuple(config.sharding_rules)
  assert sharding.rules(config) == tuple((n, tuple(a) if isinstance(a, list) else a)
                                         for n, a in rules)
  config.sharding_rules = tuple(("embedd" if n == "embed" else n, a) for n, a in rules)
  with pytest.raises(ConfigError, match="'embedd' is not a logical axis"):
    sharding.rules(config)
  config.sharding_rules = rules + (("mlp", None),)
  with pytest.raises(ConfigError, match="'mlp' has 2 rules"):
    sharding.rules(config)


def test_out_of_device_memory_is_one_last_line(capsys, monkeypatch):
  """XLA's RESOURCE_EXHAUSTED (e.g. sample --max_new_tokens=10**8 on a RoPE model) was a
  traceback; its account of the memory stays, above the one line. Other errors still raise."""
  def oom(argv):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes.\n"
                                     "Buffer 1: 8 bytes")
  monkeypatch.delenv("TJAX_VERBOSE", raising=False)
  with pytest.raises(SystemExit) as exit_info:
    cli.run(oom)
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[0] == "Buffer 1: 8 bytes" and len(err) == 2
  assert err[1].startswith("error: out of memory: RESOURCE_EXHAUSTED: Out of memory allocating 8")
  monkeypatch.setenv("TJAX_VERBOSE", "1")
  with pytest.raises(jax.errors.JaxRuntimeError):
    cli.run(oom)
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    cli.run(lambda argv: (_ for _ in ()).throw(jax.errors.JaxRuntimeError("INTERNAL: boom")))


def test_a_model_built_without_a_whole_config_gets_the_models_range_checks():
  """convert's from_hf checks model.* alone (check_model): a T5 config.json with
  relative_attention_max_distance <= num_buckets // 2 was NaN logits past that distance."""
  m = config_lib.load(f"{REPO}/configs/t5.py:tiny").model
  with m.unlocked():
    m.relative_buckets, m.relative_max_distance = 32, 16
  with pytest.raises(ConfigError, match=r"^model.relative_max_distance must be > model.relati"):
    config_lib.check_model(m)
