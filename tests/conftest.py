"""Shared test setup: 8 simulated CPU devices (set before jax is imported) and strict numerics."""

import os

# Less effort on the generated CPU code: LLVM's (the optimized HLO is the same; the cold suite
# compiled in ~7 instead of ~9.5 minutes), and XLA:CPU's older fusion code generator (the tiny
# train steps compile in ~25 % less time; it writes some fusions as while loops, so the test that
# counts a step's matmuls compiles with the default). Training subprocesses get them too (env
# XLA_FLAGS=TEST_XLA_FLAGS).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
for _flag in TEST_XLA_FLAGS.split():
  if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _flag
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The scaling-law fits' tiny LAPACK calls are slow with OpenBLAS threads on busy cores (see
# transformer_jax/sweep/__main__.py, which sets the same for its own process).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (the test extra) would probe for a TPU
# Many tests (and the training subprocesses they start) compile the same tiny programs: a
# persistent compilation cache shared by the xdist workers and subprocesses compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# ... and the project's own cache (perf/caches.py) there too, not in ~/.cache: the CPU's measured
# matmul peak (perf/hardware.py), which every training run would otherwise measure (~1 s).
os.environ.setdefault("TJAX_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "tjax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_threefry_partitionable", True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


import random  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order
import time  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order

_WORDS = ("def", "return", "self", "value", "import", "class", "the", "data", "for", "in",
          "if", "else", "x", "y", "=", "+", "(", ")", "0", "1", ":", "print", "name")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
  """A generated code-like corpus of 60 files, its SentencePiece model (vocab 300), a TFDS dir."""
  from transformer_jax.data import corpus as corpus_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import tokenization as tokenizer_lib  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("tiny_corpus")
  rng = random.Random(0)
  for i in range(60):
    lines = []
    for _ in range(rng.randint(3, 20)):
      indent = rng.choice(["", "    ", "        "])
      lines.append(indent + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 8))))
    (root / f"m{i:02d}.py").write_text("\n".join(lines) + "\n")
  glob = f"{root}/*.py"
  tok = tokenizer_lib.train([t for _, t in corpus_lib.iter_documents(glob)], 300,
                            str(tmp_path_factory.mktemp("tok") / "tiny.model"))
  return {"corpus": glob, "tokenizer": tok, "data_dir": str(tmp_path_factory.mktemp("tfds"))}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A Cloud Storage emulator for the module, with bucket tests.gcs_emulator.BUCKET;
  STORAGE_EMULATOR_HOST points at it while the module's tests run."""
  from tests import gcs_emulator  # pylint: disable=g-import-not-at-top
  with gcs_emulator.serving(tmp_path_factory.mktemp("gcs")) as emulator:
    yield emulator


def tiny_overrides(tiny_data, **extra):
  """`KEY=VALUE` overrides that point configs/gpt2.py:tiny at the tiny corpus."""
  kv = {"data.corpus": tiny_data["corpus"], "data.tokenizer": tiny_data["tokenizer"],
        "data.data_dir": tiny_data["data_dir"], "data.seq_len": 32, "model.vocab_size": 320,
        "model.max_len": 32, "train.batch_size": 4, "train.steps": 20, "train.log_every": 5,
        "checkpoint.every_steps": 5, "eval.every_steps": 10, "eval.batches": 2,
        "checkpoint.async_save": False, "mesh.data": 1,
        "optimizer.learning_rate": 1e-2}
  kv.update(extra)
  return [f"{k}={v}" for k, v in kv.items()]


def synthetic_batch(config, model=None, seed=0, rows=None, length=None):
  """Random tokens in the batch format of the config's objective (objectives.synthetic_batch),
  `rows` x `length` (decoder-side keys keep data.target_len), ids below 128."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import objectives  # pylint: disable=g-import-not-at-top
  del model  # the objective says what the model trains on
  s = objectives.spec(config.data)
  s = dataclasses.replace(s, seq_len=length or s.seq_len)
  return objectives.synthetic_batch(s, rows or config.train.batch_size,
                                    min(config.model.vocab_size, 128), seed)


# The tests' small model sizes (the layer tests build ModelConfig directly, without a recipe).
TINY_MODEL = dict(num_layers=2, d_model=64, num_heads=4, num_kv_heads=4, head_dim=16, d_ff=256,
                  vocab_size=256, max_len=128)


def model_config(**values):
  """A ModelConfig: config/base.py's model defaults (their one source), TINY_MODEL's sizes, then
  `values`."""
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.models.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  m = config_lib.base.get_config().model
  m.update({**TINY_MODEL, **values})
  return ModelConfig.from_config(m)


def assert_kv_cache_matches(model, params, tokens, prefill: int, tol=2e-5):
  """Prefilling `prefill` tokens, then one token at a time through the KV cache, gives the full
  forward pass's logits at every position."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  # (jitted: a program per shape, where eagerly every op compiled on its own)
  full = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, tokens)
  cache = jax.jit(lambda x: model.init(jax.random.key(0), x, decode=True)["cache"])(
      jnp.zeros(tokens.shape, jnp.int32))
  step = jax.jit(lambda p, c, x: model.apply({"params": p, "cache": c}, x, decode=True,
                                             mutable=["cache"]))
  out, mut = step(params, cache, tokens[:, :prefill])
  np.testing.assert_allclose(out, full[:, :prefill], atol=tol, rtol=tol)
  for t in range(prefill, tokens.shape[1]):
    out, mut = step(params, mut["cache"], tokens[:, t:t + 1])
    np.testing.assert_allclose(out[:, 0], full[:, t], atol=tol, rtol=tol)
  return full


def two_process_job(cmd, timeout: float, **env):
  """Runs `cmd` as processes 0 and 1 of a 2-process JAX job (1 CPU device each, gloo over a
  free loopback port, `env` added); returns ([exit codes], [outputs])."""
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {TEST_XLA_FLAGS}",
             JAX_PLATFORMS="cpu", TJAX_NUM_PROCESSES="2", TJAX_COORDINATOR=f"127.0.0.1:{port}",
             **env)
  procs = [subprocess.Popen(cmd, cwd=REPO, env=dict(env, TJAX_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  deadline = time.time() + timeout
  try:
    outs = [p.communicate(timeout=max(deadline - time.time(), 1))[0] for p in procs]
  except subprocess.TimeoutExpired:  # (a hang: both processes' last words)
    for p in procs:
      p.kill()
    raise AssertionError(f"the 2-process job ran past {timeout} s: " + "\n".join(
        f"--- process {i} ---\n{p.communicate()[0][-3000:]}" for i, p in enumerate(procs)))
  finally:
    for p in procs:
      p.kill()
  return [p.returncode for p in procs], outs
