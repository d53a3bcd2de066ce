"""Commands other than train with their files in a bucket (the local Cloud Storage emulator of
tests/gcs_emulator.py; training's gs:// workdirs are tests/test_gcs.py's): data.tokenizer,
data.corpus (and clean's --corpus and --out), evaluation tasks, data.data_dir, a Hugging Face
directory for convert import and export, a sweep directory, the tokenizer command's --out, the
compilation cache and benchmark's --profile_dir; a --workdir whose storage server is out of reach
or whose bucket is missing."""

import json
import os
import re
import sys
import types

import jax
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.config import paths
from tests.conftest import REPO, tiny_overrides
from tests.gcs_emulator import BUCKET
from tests import test_gcs


fast_retries = test_gcs.fast_retries  # (a fixture: gcsfs's retries without their waits)


def _config(tiny_data, **extra):
  return config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data, **extra))


def test_a_tokenizer_in_the_bucket(gcs, tiny_data):
  """data.tokenizer=gs://...: the same model, the same digest (which keys pretokenized data and
  the workdir's tokenizer.sha256), the same ids in the pipeline's map."""
  from transformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tfds_text  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tokenization  # pylint: disable=g-import-not-at-top
  local, remote = tiny_data["tokenizer"], f"gs://{BUCKET}/tokenizers/tiny.model"
  with open(local, "rb") as f:
    paths.path(remote).write_bytes(f.read())
  assert tfds_text.tokenizer_sha256(remote) == tfds_text.tokenizer_sha256(local)
  text = "def value(self, x):\n    return self.data"
  assert tokenization.load(remote).encode(text) == tokenization.load(local).encode(text)
  ids = pipeline.Tokenize(remote, True, True).map({"text": text})["tokens"]
  assert ids.tolist() == pipeline.Tokenize(local, True, True).map({"text": text})["tokens"].tolist()
  with pytest.raises(ConfigError, match=r"data.tokenizer='gs://tjax-test/none.model' does not"):
    tokenization.load(f"gs://{BUCKET}/none.model")
  trained = f"gs://{BUCKET}/tokenizers/trained.model"  # the tokenizer command's --out
  tokenization.train([text * 20] * 50, 300, trained)
  assert not os.path.exists("gs:") and tokenization.load(trained).vocab_size <= 300


def _first_batch(config):
  from transformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.make_train_iterator(config)
  try:
    return next(it)
  finally:
    it.close()


def test_a_tfds_data_dir_in_the_bucket(gcs, tiny_data, tmp_path):
  """data.data_dir=gs://...: prepared locally and uploaded (ArrayRecord writes local files only),
  read back from the bucket by ArrayRecord's own client: the first batch is the local data_dir's,
  text and pretokenized alike; a bucket that does not exist is one line before any work."""
  from transformer_jax.data import tfds_text  # pylint: disable=g-import-not-at-top
  remote = f"gs://{BUCKET}/tfds"
  for pretokenize in (False, True):
    extra = {"data.pretokenize": pretokenize, "data.data_dir": remote}
    got = _first_batch(_config(tiny_data, **extra))
    want = _first_batch(_config(tiny_data, **{**extra, "data.data_dir": str(tmp_path)}))
    assert sorted(got) == sorted(want)
    for key in want:
      assert (got[key] == want[key]).all(), key
  for name in ("text_corpus", "tokenized_corpus"):
    (config_dir,) = paths.listdir(f"{remote}/{name}")
    names = paths.listdir(f"{remote}/{name}/{config_dir}/1.0.0")
    assert "dataset_info.json" in names and any(".array_record-" in n for n in names), names
  # Nothing prepared twice: the bucket's dataset is used as it is.
  prepared = tfds_text.prepare(_config(tiny_data, **{"data.data_dir": remote}).data)
  assert os.fspath(prepared.data_dir).startswith(f"{remote}/text_corpus/")
  bad = "gs://no-such-bucket-tjax/tfds"
  with pytest.raises(ConfigError) as e:
    tfds_text.prepare(_config(tiny_data, **{"data.data_dir": bad}).data)
  assert str(e.value) == (f"data.data_dir={bad!r} is not usable: bucket "
                          "gs://no-such-bucket-tjax does not exist (or these credentials cannot "
                          "see it)")



def test_a_corpus_in_the_bucket(gcs, tiny_data, tmp_path):
  """data.corpus=gs://.../*.py: listed and read through fsspec, with the local glob's names,
  sizes and documents (a hidden object left out, as Python's glob leaves a hidden file out), so
  the first batch is the local corpus's; a glob in a missing bucket, or matching nothing, is one
  line."""
  from transformer_jax.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  local_dir = os.path.dirname(tiny_data["corpus"])
  paths.upload(local_dir, f"gs://{BUCKET}/corpus")
  paths.write_text(f"gs://{BUCKET}/corpus/.draft.py", "print('not part of it')\n")
  remote = f"gs://{BUCKET}/corpus/*.py"
  local_files = corpus_lib.corpus_files(tiny_data["corpus"])
  remote_files = corpus_lib.corpus_files(remote)
  assert [(f.name, f.size) for f in remote_files] == [(f.name, f.size) for f in local_files]
  assert [f.path for f in remote_files][:1] == [f"gs://{BUCKET}/corpus/m00.py"]
  assert corpus_lib.corpus_files(f"gs://{BUCKET}/corpus/.*.py")[0].name == ".draft.py"
  for fmt in ("text", "lines"):
    assert (list(corpus_lib.iter_documents(remote, fmt))
            == list(corpus_lib.iter_documents(tiny_data["corpus"], fmt)))
  got = _first_batch(_config(tiny_data, **{"data.corpus": remote, "data.data_dir": tmp_path}))
  want = _first_batch(_config(tiny_data))
  assert sorted(got) == sorted(want) and all((got[k] == want[k]).all() for k in want)
  with pytest.raises(ConfigError, match=r"^data.corpus='gs://tjax-test/none/\*.py' matches no"):
    corpus_lib.corpus_files(f"gs://{BUCKET}/none/*.py")
  with pytest.raises(ConfigError) as e:
    corpus_lib.corpus_files("gs://no-such-bucket-tjax/c/*.py")
  assert str(e.value) == ("data.corpus='gs://no-such-bucket-tjax/c/*.py' cannot be listed: bucket "
                          "gs://no-such-bucket-tjax does not exist (or these credentials cannot "
                          "see it)")


def test_clean_reads_and_writes_the_bucket(gcs, tmp_path, monkeypatch):
  """clean --corpus=gs://... --out=gs://...: the shards and samples of the local run, uploaded
  once the run ends; a second, shorter run leaves none of the first's shards, samples, plots or
  report; an OUT that holds the corpus is refused, a local one above the working folder is not
  (the bucket's URLs were read as local paths under it)."""
  from transformer_jax import clean as clean_cli  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import clean as clean_lib  # pylint: disable=g-import-not-at-top
  corpus = tmp_path / "raw"
  corpus.mkdir()
  for i in range(12):
    (corpus / f"d{i:02d}.txt").write_text(f"document {i % 9} " * 100)  # 3 exact duplicates
  paths.upload(corpus, f"gs://{BUCKET}/raw")

  def clean(src, out, files="*.txt"):
    flags = dict(clean_cli.FLAGS, dedup="exact", languages="none", quality="none")
    return clean_lib.run(f"{src}/{files}", "text", "text", out, clean_lib.build_stages(flags),
                         shard_mb=0.001, plots=False)
  want = clean(corpus, str(tmp_path / "out"))
  got = clean(f"gs://{BUCKET}/raw", f"gs://{BUCKET}/clean")
  assert (got["documents_out"], got["shards"]) == (want["documents_out"], want["shards"]) == (9, 9)
  names = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")
                 if p.is_file())
  uploaded = paths.filesystem(f"gs://{BUCKET}").find(f"gs://{BUCKET}/clean")
  assert [n.split("/clean/", 1)[1] for n in sorted(uploaded)] == names
  assert "removed/exact_duplicate.jsonl" in names and "report.md" in names
  for name in names:
    if name != "report.md":  # (its timings differ)
      assert (paths.path(f"gs://{BUCKET}/clean/{name}").read_bytes()
              == (tmp_path / "out" / name).read_bytes()), name
  assert clean(f"gs://{BUCKET}/raw", f"gs://{BUCKET}/clean", "d0*.txt")["shards"] == 9
  paths.write_text(f"gs://{BUCKET}/clean/plots/quality.png", "a plot of the last run")
  paths.write_text(f"gs://{BUCKET}/clean/report.md", "the last run's report")
  assert clean(f"gs://{BUCKET}/raw", f"gs://{BUCKET}/clean", "d1*.txt")["shards"] == 2
  assert paths.listdir(f"gs://{BUCKET}/clean") == ["part-00000.jsonl", "part-00001.jsonl",
                                                    "report.md"]  # (no duplicates in d10, d11)
  assert paths.read_text(f"gs://{BUCKET}/clean/report.md").startswith("# ")
  (tmp_path / "here").mkdir()
  monkeypatch.chdir(tmp_path / "here")
  assert clean(f"gs://{BUCKET}/raw", str(tmp_path), "d1*.txt")["shards"] == 2
  with pytest.raises(ConfigError, match=r"^--out=gs://tjax-test/raw/ holds files of --corpus"):
    clean(f"gs://{BUCKET}/raw", f"gs://{BUCKET}/raw/")


def test_evaluation_tasks_in_the_bucket(gcs, tiny_data, tmp_path, capsys):
  """corpus_tasks --out=gs://...: the local command's files, uploaded (they went to a local
  folder named 'gs:'); a task and its few-shot split read from the bucket as from the folder."""
  from transformer_jax.evaluation import corpus_tasks  # pylint: disable=g-import-not-at-top
  from transformer_jax.evaluation import tasks  # pylint: disable=g-import-not-at-top
  out, flags = f"gs://{BUCKET}/eval_tasks", [f"--corpus={tiny_data['corpus']}", "--examples=8"]
  corpus_tasks.main([f"--out={tmp_path}", *flags])
  corpus_tasks.main([f"--out={out}", *flags])
  assert f"{out}/next_line.jsonl: 8 examples" in capsys.readouterr().out
  assert paths.listdir(out) == sorted(os.listdir(tmp_path)) and not os.path.exists("gs:")
  for name in ("next_line", "cloze:last_word"):
    kind, _, stem = name.rpartition(":")
    prefix = f"{kind}:" if kind else ""
    got = tasks.load(f"{prefix}{out}/{stem}.jsonl", num_fewshot=2)
    want = tasks.load(f"{prefix}{tmp_path}/{stem}.jsonl", num_fewshot=2)
    assert (got.kind, got.examples, got.train) == (want.kind, want.examples, want.train)
    assert len(got.train) == 8
  with pytest.raises(ConfigError, match=r"^task file 'gs://tjax-test/none.jsonl' does not exist"):
    tasks.load(f"gs://{BUCKET}/none.jsonl")


def _tiny_gpt2(out):
  """A random 2-layer GPT-2 written as a Hugging Face directory (convert/hf.py's to_hf, whose
  output transformers loads: tests/test_convert.py); returns its parameters."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from transformer_jax.config import base  # pylint: disable=g-import-not-at-top
  from transformer_jax.convert import hf as hf_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.models import families  # pylint: disable=g-import-not-at-top
  from transformer_jax.models.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  values = hf_lib.hf_model_config({"model_type": "gpt2", "n_layer": 2, "n_embd": 32,
                                   "n_head": 2, "n_positions": 64, "vocab_size": 100})
  cfg = ModelConfig.from_config(ml_collections.ConfigDict(
      {**base.get_config().model.to_dict(), **values}))
  model = hf_lib.MODELS[values["family"]](cfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(a.dtype),
                        families.abstract_params(model))
  hf_lib.to_hf(model, params, os.fspath(out))
  return params


def test_a_hugging_face_directory_in_the_bucket(gcs, tiny_data, tmp_path):
  """convert import --hf_dir=gs://... reads the bucket's copy of a checkpoint as it reads the
  local one, into a workdir in the bucket; export --hf_dir=gs://... writes one that reads back; a
  bucket folder without a checkpoint is one line."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from transformer_jax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
  from transformer_jax.convert import hf as hf_lib  # pylint: disable=g-import-not-at-top
  local, remote = tmp_path / "hf", f"gs://{BUCKET}/hf/gpt2"
  made = _tiny_gpt2(local)
  paths.upload(local, remote)
  _, got = hf_lib.from_hf(remote)
  assert jax.tree.structure(got) == jax.tree.structure(made)
  assert all((a == b).all() for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(made)))
  # The same checkpoint sharded as large ones are (an index and two files) reads the same.
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tensors, sharded = load_file(str(local / "model.safetensors")), tmp_path / "sharded"
  sharded.mkdir()
  (sharded / "config.json").write_text((local / "config.json").read_text())
  names = sorted(tensors)
  weight_map = {n: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, n in enumerate(names)}
  for file in set(weight_map.values()):
    save_file({n: tensors[n] for n in names if weight_map[n] == file}, str(sharded / file))
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  paths.upload(sharded, f"gs://{BUCKET}/hf/sharded")
  _, got = hf_lib.from_hf(f"gs://{BUCKET}/hf/sharded")
  assert all((a == b).all() for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(made)))
  workdir, out = f"gs://{BUCKET}/converted", f"gs://{BUCKET}/hf/exported"
  overrides = tiny_overrides(tiny_data, **{"model.max_len": 64})
  convert_cli.main(["import", f"--hf_dir={remote}", f"--workdir={workdir}"]
                   + [f"--config.{o}" for o in overrides])
  assert json.loads(paths.read_text(f"{workdir}/hf_config.json"))["n_embd"] == 32
  convert_cli.main(["export", f"--workdir={workdir}", f"--hf_dir={out}", "--step=0"])
  assert {"config.json", "generation_config.json", "model.safetensors"} <= set(paths.listdir(out))
  exported = load_file(paths.download(out, ["model.safetensors"], tmp_path / "back") +
                       "/model.safetensors")
  original = load_file(str(local / "model.safetensors"))
  for name, value in original.items():  # rows past the checkpoint's 100: the tokenizer's 300
    assert (exported[name][:len(value)] == value).all(), name
  assert hf_lib.read_config(out)["n_embd"] == 32
  with pytest.raises(ConfigError, match=rf"^gs://{BUCKET}/hf/none is not a Hugging Face model "
                     r"directory \(no config.json\)$"):
    convert_cli.main(["import", f"--hf_dir=gs://{BUCKET}/hf/none", f"--workdir={tmp_path}/x"])
  # A checkpoint's tokenizer.json goes into a gs:// workdir too, and the config names it there.
  import tokenizers  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tokenization  # pylint: disable=g-import-not-at-top
  words = {w: i for i, w in enumerate(["[UNK]", "def", "return", "self", "x", "(", ")", ":",
                                        "<|endoftext|>"])}  # GPT-2's bos and eos
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(["<|endoftext|>"])
  paths.write_text(f"{remote}/tokenizer.json", tok.to_str())
  convert_cli.main(["import", f"--hf_dir={remote}", f"--workdir={workdir}2"]
                   + [f"--config.{o}" for o in overrides if not o.startswith("data.tokenizer=")])
  config = config_lib.from_json_file(f"{workdir}2/config.json")
  assert config.data.tokenizer == f"{workdir}2/tokenizer"
  assert tokenization.load(config.data.tokenizer).encode("def self ( x ) :") == [1, 3, 5, 4, 6, 7]


def test_a_sweep_directory_in_the_bucket(gcs, tiny_data, tmp_path, monkeypatch, capsys):
  """sweep plan/run/fit/predict with gs:// directories: the runs' configs, plan.jsonl, the runs'
  status, train.log, runs.jsonl, fit.json, the plots and report.md live in the bucket. (The runs'
  training is stood in for: gs:// workdirs train as the tests above show.)"""
  from tests.test_sweep_fit import LAWS, isoflop_sweep  # pylint: disable=g-import-not-at-top
  from transformer_jax.sweep import __main__ as sweep_cli  # pylint: disable=g-import-not-at-top
  from transformer_jax.sweep import run as run_lib  # pylint: disable=g-import-not-at-top
  sweep, out = tmp_path / "micro.py", f"gs://{BUCKET}/sweep"
  overrides = [o for o in tiny_overrides(tiny_data) if not o.startswith(
      ("train.steps", "checkpoint.every_steps", "eval.every_steps", "optimizer.learning_rate"))]
  sweep.write_text(
      "import ml_collections\ndef get_sweep():\n  return ml_collections.ConfigDict(dict(\n"
      f"      base={REPO + '/configs/gpt2.py:tiny'!r}, overrides={overrides!r},\n"
      "      grid='isoflop', budgets=[1.2e8, 2.4e8], sizes=[1.2e4], aspect=32.0, head_dim=32,\n"
      "      lr=1e-2, min_steps=2))\n")
  sweep_cli.main(["plan", f"--sweep={sweep}", f"--dir={out}"])
  first, second = run_lib.load_plan(out)
  assert config_lib.from_json_file(f"{out}/{first['name']}/config.json").train.steps == \
      first["steps"]
  paths.write_text(f"{out}/{first['name']}/metrics.jsonl",  # finished, as training logs it
                   json.dumps({"step": first["steps"], "eval_loss": 3.5}) + "\n")
  assert [run_lib.status(out, r) for r in (first, second)] == ["done", "pending"]
  capsys.readouterr()
  sweep_cli.main(["run", f"--dir={out}", "--print-commands"])
  assert capsys.readouterr().out == \
      f"python -m transformer_jax.train --workdir={out}/{second['name']}\n"
  # (a stand-in train that logs its final eval_loss into the bucket, as training does: one that
  # exits 0 without it failed)
  monkeypatch.setattr(run_lib, "train_command", lambda d, r: [sys.executable, "-c", (
      "from transformer_jax.config import paths; import json; "
      f"paths.write_text('{d}/{r['name']}/metrics.jsonl', json.dumps("
      f"{{'step': {r['steps']}, 'eval_loss': 3.25}}) + '\\n'); print('trained {r['name']}')")])
  assert run_lib.run_all(out, say=lambda _: None) == 0
  assert paths.read_text(f"{out}/{second['name']}/train.log") == f"trained {second['name']}\n"
  assert sorted(json.loads(l)["loss"] for l in paths.read_text(
      run_lib.collect(out)).splitlines()) == [3.25, 3.5]
  runs = isoflop_sweep(LAWS["Chinchilla"], seed=0)
  rows = [{"params": n, "tokens": d, "loss": l} for n, d, l in zip(runs.params, runs.tokens,
                                                                   runs.loss)]
  paths.write_text(f"{out}/all.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  sweep_cli.main(["fit", f"--runs={out}/all.jsonl", f"--out={out}/fit", "--bootstrap=10"])
  assert {"fit.json", "report.md", "isoflop.png", "frontier.png", "optimal.png", "runs.jsonl"} == \
      set(paths.listdir(f"{out}/fit"))
  assert paths.path(f"{out}/fit/isoflop.png").read_bytes().startswith(b"\x89PNG")
  capsys.readouterr()
  sweep_cli.main(["predict", f"--fit={out}/fit", "--flops=1e21"])
  assert json.loads(capsys.readouterr().out.splitlines()[-1])["params"] > 0
  paths.write_text(f"{out}/bad.jsonl", json.dumps(rows[0]) + "\n{oops\n")
  with pytest.raises(ConfigError, match=rf"^{out}/bad.jsonl:2 is not valid JSON \("):
    sweep_cli.main(["fit", f"--runs={out}/bad.jsonl", f"--out={out}/fit2"])


def test_the_tokenizer_command_sees_a_tokenizer_in_the_bucket(gcs, tiny_data):
  """--if_missing, a gs:// --out that exists: nothing done (it retrained, or refused: exit 2)."""
  from transformer_jax import tokenizer as tokenizer_cli  # pylint: disable=g-import-not-at-top
  model = open(tiny_data["tokenizer"], "rb").read()
  for out in (f"gs://{BUCKET}/tokenizers/tiny.model", f"gs://{BUCKET}/hf/tokenizer.json"):
    paths.path(out).write_bytes(model)
    assert tokenizer_cli.main(["--vocab_size=300", f"--out={out}", "--if_missing"]) == 0
    assert paths.path(out).read_bytes() == model


def test_the_compilation_cache_in_the_bucket(gcs):
  """TJAX_CACHE_DIR=gs://...: JAX stores a compiled program in the bucket and a fresh cache
  (another host, or the next start) loads it from there."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  from transformer_jax.perf import caches  # pylint: disable=g-import-not-at-top
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_enable_xla_caches)
  hits = []
  listener = lambda event, **_: hits.append(event)  # pylint: disable=unnecessary-lambda-assignment
  jax.monitoring.register_event_listener(listener)
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()
    where = caches.setup({"TJAX_CACHE_DIR": f"gs://{BUCKET}/cache"})
    assert where == f"gs://{BUCKET}/cache/jax"
    program = lambda: (lambda x: jnp.sin(x) * 3.0 + 1.25)  # pylint: disable=unnecessary-lambda-assignment
    jax.jit(program()).lower(jnp.ones(7)).compile()
    assert len([n for n in paths.listdir(where) if n.startswith("jit__lambda-")]) == 1
    assert "/jax/compilation_cache/cache_hits" not in hits
    compilation_cache.reset_cache()  # a fresh process's view of the same bucket
    jax.jit(program()).lower(jnp.ones(7)).compile()
    assert hits.count("/jax/compilation_cache/cache_hits") == 1
  finally:
    jax.monitoring.unregister_event_listener(listener)
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_enable_xla_caches", before[1])
    compilation_cache.reset_cache()


def test_a_bucket_path_orbax_would_cut_is_refused_before_anything_runs():
  """TensorStore reads a gs:// path as a URL: in `gs://b/run#1` the '#' ended the name, the
  checkpoint's arrays went to gs://b/run/d/... (outside the workdir) and the save never
  finished. Refused at once (no storage is reached here), as a workdir, a source and --out."""
  from transformer_jax.quant import run as quant_run  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import resume  # pylint: disable=g-import-not-at-top
  cut = r"holds '{}', which Orbax's storage \(TensorStore\) reads as the end of a gs:// name"
  for mark in "#?":
    with pytest.raises(ConfigError, match=r"^workdir gs://b/run{}1 ".format(re.escape(mark))
                       + cut.format(re.escape(mark))):
      resume.prepare_workdir(f"gs://b/run{mark}1")
    with pytest.raises(ConfigError, match=cut.format(re.escape(mark))):
      checkpoint.Checkpoints(f"gs://b/run{mark}1", config_lib.base.get_config().checkpoint)
    with pytest.raises(ConfigError, match=r"^--out=gs://b/q" + re.escape(mark)):
      quant_run.quantize_workdir("gs://b/w", f"gs://b/q{mark}", "int8")
  assert not paths.orbax_refusal("/tmp/run#1")  # a local path is a path (Orbax keeps it)


def test_an_output_folder_in_a_missing_bucket_is_one_line_before_any_work(gcs):
  """inspect --out and convert export --hf_dir: a traceback naming the emulator's upload URL,
  after the work."""
  from transformer_jax import cli  # pylint: disable=g-import-not-at-top
  assert cli.output_folder("out", f"gs://{BUCKET}/figures") == f"gs://{BUCKET}/figures"
  with pytest.raises(ConfigError, match=r"^--hf_dir=gs://no-such-bucket-tjax/hf is not writable: "
                                        r"bucket gs://no-such-bucket-tjax does not exist"):
    cli.output_folder("hf_dir", "gs://no-such-bucket-tjax/hf")


def test_a_storage_server_out_of_reach_is_one_line(gcs, monkeypatch, fast_retries, capsys, caplog):
  """train, sample and evaluate with a gs:// --workdir whose storage server cannot be reached:
  one `error:` line naming --workdir, exit 2 (gcsfs's traceback, exit 1, with its retries'
  tracebacks logged before it); a DNS failure says the server cannot be reached too."""
  import logging  # pylint: disable=g-import-not-at-top
  import aiohttp  # pylint: disable=g-import-not-at-top
  from transformer_jax import cli  # pylint: disable=g-import-not-at-top
  from transformer_jax import evaluate  # pylint: disable=g-import-not-at-top
  from transformer_jax import sample  # pylint: disable=g-import-not-at-top
  from transformer_jax import train  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # (discard: nothing there)
  monkeypatch.delenv("TJAX_VERBOSE", raising=False)
  workdir, level = f"gs://{BUCKET}/w1", logging.getLogger("gcsfs").level
  try:
    for module, extra in ((train, []), (sample, []), (evaluate, ["--tasks=t.jsonl"])):
      monkeypatch.setattr(sys, "argv", [module.__name__, f"--workdir={workdir}", *extra])
      caplog.clear()
      with pytest.raises(SystemExit) as e:
        cli.run(module.main)
      assert e.value.code == 2, module
      assert capsys.readouterr().err == (f"error: --workdir={workdir} cannot be read: cannot "
                                         "reach the storage server (Connect call failed "
                                         "('127.0.0.1', 9))\n"), module
      assert not [r for r in caplog.records if r.name.startswith("gcsfs")], module
  finally:
    logging.getLogger("gcsfs").setLevel(level)
  key = types.SimpleNamespace(host="storage.googleapis.com", port=443, ssl=True)
  dns = aiohttp.ClientConnectorDNSError(key, OSError(-2, "Name or service not known"))
  assert paths.why(dns, workdir) == ("cannot reach the storage server (Cannot connect to host "
                                     "storage.googleapis.com:443 ssl:default [Name or service "
                                     "not known])")


def test_resuming_in_a_missing_bucket_says_so(gcs):
  """train --workdir=gs://MISSING/x without --config (the resume form) names the bucket, not
  the --config flag; in a bucket that exists, a workdir without config.json still asks for
  --config."""
  from transformer_jax import train  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError) as e:
    train.main(["--workdir=gs://no-such-bucket-tjax/x"])
  assert str(e.value) == ("--workdir=gs://no-such-bucket-tjax/x: bucket gs://no-such-bucket-tjax "
                          "does not exist (or these credentials cannot see it)")
  with pytest.raises(ConfigError, match=r"^--config=FILE.py\[:ARG\] is required"):
    train.main([f"--workdir=gs://{BUCKET}/fresh"])


def test_a_profile_dir_in_the_bucket(gcs):
  """benchmark --profile --profile_dir=gs://...: the breakdown of the steps (the trace went to a
  local folder named 'gs:', and the breakdown looked for it on the local disk: an error), and
  the trace uploaded to the bucket."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from transformer_jax import benchmark  # pylint: disable=g-import-not-at-top
  step, x = jax.jit(lambda a: jnp.tanh(a @ a) * 2.0), jnp.ones((64, 64))
  runner = types.SimpleNamespace(jax=jax, program_text=lambda: step.lower(x).compile().as_text(),
                                 next_batch=lambda: x,
                                 run_step=lambda batch: step(batch).block_until_ready())
  out = f"gs://{BUCKET}/profile"
  report = benchmark._profile(runner, 2, out)  # pylint: disable=protected-access
  assert "error" not in report and report["steps"] == 2, report
  assert any(p.endswith(".xplane.pb") for p in paths.filesystem(out).find(out))
  assert not os.path.exists("gs:")
