"""The benchmark command's modes (transformer_jax/benchmark.py) on configs/gpt2.py:tiny: what each
reports, and one-line errors. Timings are only checked for being positive and consistent; speed
claims live in benchmarks/RESULTS.md."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.models import families
from tests.conftest import REPO, TEST_XLA_FLAGS

TINY = "--config=configs/gpt2.py:tiny"


def bench(*args, timeout=300):
  out = subprocess.run([sys.executable, "-m", "transformer_jax.benchmark", TINY, *args],
                       capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS})
  report = None
  if out.stdout.strip():
    report = json.loads(out.stdout.strip().splitlines()[-1])
  return out, report


def test_grid_runs_every_point_and_records_failures():
  out, r = bench("--steps=1", "--rounds=1", "--config.model.num_layers=1",
                 "--grid=model.attention_impl=xla,splash;train.batch_size=4")
  assert out.returncode == 0, out.stderr[-3000:]
  xla, splash = r["grid"]
  assert xla["overrides"] == ["model.attention_impl=xla", "train.batch_size=4"]
  assert xla["batch_size"] == 4 and xla["seq_len"] == 64  # the override reached the child
  assert xla["tokens_per_s"] == pytest.approx(4 * 64 / xla["step_time_s"], rel=1e-3)
  assert splash["error"].startswith("model.attention_impl=splash needs a TPU")
  assert r["best"] == xla["overrides"]
  assert "[2/2] model.attention_impl=splash train.batch_size=4: failed:" in out.stdout


def test_grid_errors_before_running_and_times_out(capsys):
  """(The grid's parent in this process: what the CLI makes of its errors and exit codes is the
  other tests'.)"""
  from transformer_jax import benchmark  # pylint: disable=g-import-not-at-top
  tiny = f"--config={REPO}/configs/gpt2.py:tiny"
  with pytest.raises(ConfigError, match=r"^--grid point model.nope=1: unknown config key: "
                                        r"model.nope$"):
    benchmark.main([tiny, "--grid=model.nope=1,2"])
  with pytest.raises(ConfigError, match="is not KEY=V1,V2"):
    benchmark.main([tiny, "--grid=train.batch_size"])
  assert not capsys.readouterr().out  # (nothing ran)
  with pytest.raises(SystemExit) as e:
    benchmark.main([tiny, "--grid=train.batch_size=4", "--grid_timeout=1"])
  assert e.value.code == 1
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert r == {"grid": [{"overrides": ["train.batch_size=4"], "error": "timed out after 1 s"}],
               "best": None}


def test_baseline_reference_ops_and_async_checkpoint():
  out, r = bench("--steps=1", "--rounds=1", "--baseline=model.attention_chunks=1",
                 "--reference_ops=all", "--checkpoint", "--config.model.num_layers=1")
  assert out.returncode == 0, out.stderr[-3000:]
  assert r["baseline"] == ["model.attention_chunks=1"] and "gelu" in r["reference_ops"]
  assert r["speedup_vs_baseline"] == pytest.approx(
      r["baseline_step_time_s"] / r["step_time_s"], rel=1e-2)
  assert 0 < r["save_block_s"] <= r["save_total_s"]
  assert 0 < r["mfu"] < 1 and r["params"] > 0 and r["peak_memory_bytes"] > 0


def test_compile_only_reports_compile_times():
  out, r = bench("--compile_only", "--rounds=1", "--baseline=model.num_layers=1")
  assert out.returncode == 0, out.stderr[-3000:]
  assert r["lower_s"] > 0 and r["compile_s"] > 0 and r["temp_bytes"] > 0
  assert r["num_layers"] == 2 and r["baseline"] == ["model.num_layers=1"]
  assert r["compile_ratio_vs_baseline"] > 0


@pytest.fixture
def unmeasured_peak(monkeypatch):
  """JaxRunner's CPU matmul peak (for MFU) is a fixed 1 TFLOP/s, not measured (~1.2 s of CPU a
  runner, and again each round; tests/test_caches.py checks the measurement): no assertion of
  the test reads it."""
  from transformer_jax.perf import hardware  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(hardware, "peak_flops_per_device",
                      lambda *args, **kwargs: (1e12, "fixed by the test"))


SHRINK = ["model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.head_dim=16",
          "model.d_ff=64", "model.vocab_size=128", "model.max_len=32", "data.seq_len=32",
          "data.target_len=0", "train.batch_size=8", "mesh.data=-1"]


@pytest.mark.parametrize("spec, extra", [
    ("gpt2.py:tiny", []), ("gpt2.py:tiny", ["data.objective=prefix_lm"]),
    ("bert.py:tiny", []),
    ("bert.py:tiny", ["data.sentence_pair=sop", "model.sentence_head=true"]),
    ("t5.py:tiny", ["model.num_decoder_layers=1"]),
    ("t5.py:tiny", ["model.num_decoder_layers=1", "data.objective=denoise"]),
    ("t5.py:tiny", ["model.num_decoder_layers=1", "data.objective=ul2"]),
    ("t5.py:tiny", ["model.num_decoder_layers=1", "data.objective=seq2seq"]),
])
@pytest.mark.usefixtures("unmeasured_peak")
def test_every_family_and_objective_is_timed(spec, extra):
  """The benchmark's batches are the objective's own shape (objectives.synthetic_batch): every
  family and objective trains a step on them (the causal-LM batch it used to make crashed the
  encoder-decoder, prefix-LM and sentence-pair configs)."""
  from transformer_jax import benchmark  # pylint: disable=g-import-not-at-top
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load(f"configs/{spec}", SHRINK + extra)
  runner = benchmark.JaxRunner(config)
  (seconds,) = runner.time_steps(1)
  assert seconds > 0 and runner.flops_per_token > 0
  assert int(runner.state.step) == 2  # the compile step and the timed one, both applied
  assert int(runner.state.skipped) == 0


@pytest.mark.usefixtures("unmeasured_peak")
def test_moe_mode_times_dropless_capacity_and_the_dense_model_of_the_same_active_params():
  """--moe (perf/moe_bench.py): the three forms of one MoE config, side by side; the dense model's
  FFNs are experts_per_token experts wide, so it has the MoE's active matmul parameters less the
  router's."""
  from transformer_jax import benchmark  # pylint: disable=g-import-not-at-top
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  from transformer_jax.perf import moe_bench  # pylint: disable=g-import-not-at-top
  r = moe_bench.compare(benchmark.JaxRunner, "configs/mixtral.py:tiny", SHRINK, steps=1,
                        rounds=1, capacity=1.25)
  assert r["num_experts"] == 4 and r["experts_per_token"] == 2
  router = 32 * 4  # d_model x experts, one MoE layer
  assert r["dense"]["active_matmul_params"] + router == r["dropless"]["active_matmul_params"]
  assert r["capacity"]["active_matmul_params"] == r["dropless"]["active_matmul_params"]
  assert r["dense"]["params"] < r["dropless"]["params"] == r["capacity"]["params"]
  step = {f: r[f]["step_time_s"] for f in moe_bench.FORMS}
  assert r["routing_share_dropless"] == pytest.approx(1 - step["dense"] / step["dropless"],
                                                      abs=2e-3)
  assert r["capacity_vs_dropless"] == pytest.approx(step["dropless"] / step["capacity"], rel=1e-2)
  with pytest.raises(ConfigError, match="model.num_experts=0"):
    moe_bench.form_overrides(config_lib.load("configs/gpt2.py:tiny"), 1.25)
  with pytest.raises(ConfigError, match="dense layers stay 256 wide"):
    moe_bench.form_overrides(config_lib.load("configs/switch.py:tiny",
                                             ["model.experts_per_token=2"]), 1.25)


@pytest.mark.parametrize("recipe", ["configs/gpt2.py:tiny", "configs/llama.py:tiny",
                                    "configs/mixtral.py:tiny"])
def test_the_pytorch_peer_is_our_model_in_hugging_face(recipe):
  """--compare's peer is transformers' model of the family with exactly our parameters, and
  trains: its loss falls over a few steps on one repeated batch."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformer_jax.perf import peers  # pylint: disable=g-import-not-at-top
  config = config_lib.load(f"{REPO}/{recipe}", ["model.vocab_size=320", "data.seq_len=16",
                                                 "train.batch_size=2"])
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      families.abstract_params(families.build_model(config))))
  peer = peers.HFRunner(config)
  assert peer.params == ours
  assert len(peer.time_steps(1)) == 1
  x = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
  losses = []
  for _ in range(4):
    loss = peer.model(input_ids=x, labels=x).loss
    loss.backward()
    peer.opt.step()
    peer.opt.zero_grad()
    losses.append(loss.item())
  assert losses[-1] < losses[0]
  with pytest.raises(ConfigError, match=r"^--compare='torch': peers are hf, hf_compile$"):
    peers.check("hf,torch")


def test_a_mode_refuses_the_flags_it_would_ignore(tmp_path):
  """--data_only, --compile_only and --moe read only some flags; the others were accepted and
  did nothing (e.g. --profile with --data_only)."""
  from transformer_jax import benchmark  # pylint: disable=g-import-not-at-top
  for argv, idle in ((["--data_only", "--profile", "--baseline=model.num_layers=1"],
                      "--baseline, --profile do(es) nothing with --data_only"),
                     (["--compile_only", "--steps=3"],
                      "--steps do(es) nothing with --compile_only"),
                     (["--moe", "--checkpoint"], "--checkpoint do(es) nothing with --moe"),
                     (["--profile_dir=x"], "--profile_dir does nothing without --profile"),
                     (["--grid_timeout=5"], "--grid_timeout does nothing without --grid"),
                     (["--moe_capacity=2"], "--moe_capacity does nothing without --moe")):
    with pytest.raises(ConfigError, match=re.escape(idle)):
      benchmark.main([f"--config={REPO}/configs/gpt2.py:tiny", *argv])
  (tmp_path / "trace").write_text("a file")  # was a profile "error" in the JSON, after timing
  with pytest.raises(ConfigError, match="--profile_dir=.*trace cannot be made a folder"):
    benchmark.main([f"--config={REPO}/configs/gpt2.py:tiny", "--profile",
                    f"--profile_dir={tmp_path}/trace"])


def test_a_failing_peer_is_dropped_and_our_figures_still_come_out():
  """A peer that fails to build or mid-run (e.g. out of memory beside ours on a GPU) ended the
  run with no JSON: our timings, MFU and profile were lost with it. (A process of its own: one
  device, the suite's XLA flags, a fixed CPU peak (as unmeasured_peak's), and a stand-in peer
  that builds (hf) or not (hf_compile) and fails every timing.)"""
  script = """
import json
from transformer_jax import benchmark, config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.perf import hardware

hardware.peak_flops_per_device = lambda *args, **kwargs: (1e12, "fixed by the test")

class Failing:
  def __init__(self, kind, argv):
    self.kind, self.ready = kind, {"params": 1, "warmup_s": 0.0}
    if kind == "hf_compile":
      raise ConfigError("benchmark worker exited with code 1 (see above)")
  def time_steps(self, n):
    raise BrokenPipeError(f"{self.kind} died before {n} steps")
  def close(self):
    pass

benchmark.Worker = Failing
config = config_lib.load("configs/gpt2.py:tiny", ["train.batch_size=2"])
f = dict(benchmark.FLAGS, compare=["hf", "hf_compile"], steps=1, rounds=2)
print(json.dumps(benchmark._time_training(config, None, f, [], "", "")))
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS":
                                         f"--xla_force_host_platform_device_count=1 "
                                         f"{TEST_XLA_FLAGS}"})
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["tokens_per_s"] > 0 and report["mfu"] > 0
  assert report["hf_error"] == "hf died before 1 steps"
  assert report["hf_compile_error"].startswith("benchmark worker exited with code 1")
  assert not any(k.startswith("ratio_vs") for k in report)


def test_the_timed_step_leaves_out_making_its_batch():
  """As the Hugging Face peer's: a batch drawn and put on the devices before the clock starts
  (drawing it inside the clock added 1-2 % to a tiny step)."""
  import time  # pylint: disable=g-import-not-at-top
  from transformer_jax import benchmark  # pylint: disable=g-import-not-at-top
  runner = object.__new__(benchmark.JaxRunner)
  runner.jax, ran = jax, []
  runner.next_batch = lambda: time.sleep(0.3) or np.zeros(2)
  runner.run_step = ran.append
  times = runner.time_steps(2)
  assert len(ran) == 2 and max(times) < 0.15, times
