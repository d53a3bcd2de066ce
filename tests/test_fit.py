"""train.microbatches=0 (training/fit.py): the fewest microbatches whose step fits the memory."""

import json
import os

import jax
from jax._src import compiler as jax_compiler
import pytest

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.parallel import sharding
from transformer_jax.training import fit
from transformer_jax.training import loop
from transformer_jax.training.step import Trainer
from tests.conftest import REPO, tiny_overrides


@pytest.fixture(scope="module")
def trainer():
  """A one-layer tiny GPT-2 (vocab 8192: the logits are most of its memory), batch 8 over 2
  data shards: microbatch counts 1, 2 and 4 (8 would leave 1 row for 2 shards)."""
  c = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", [
      "model.num_layers=1", "train.batch_size=8", "mesh.data=2", "train.microbatches=0"])
  return Trainer(c, sharding.make_mesh(c, jax.devices()[:2]))


def room(needed: int) -> int:
  """The least device memory that leaves `needed` bytes to a step (fit.HEADROOM kept free)."""
  low, high = needed, 2 * needed
  while low < high:
    mid = (low + high) // 2
    low, high = (mid + 1, high) if fit.room_for_step(mid) < needed else (low, mid)
  return low


def test_the_fewest_microbatches_that_fit_are_chosen_in_few_compiles(trainer):
  assert fit.room_for_step(10**9) == 95 * 10**7  # (5 % left beside the step)
  assert fit.counts(trainer.config, 2) == [1, 2, 4]
  assert fit.counts(trainer.config, 1) == [1, 2, 4, 8]
  results = {}
  for m in (1, 2, 4):  # what each count's compiled step takes per device
    trainer.use_microbatches(m)
    results[m] = fit.compile_step(trainer)
  needed = {m: r.needed for m, r in results.items()}
  assert needed[1] > needed[2] > needed[4] > 0, needed
  compiled = []

  def counting(t):  # (each count's figures, compiled once above)
    compiled.append(t.microbatches)
    return results[t.microbatches]
  said = []
  for capacity, want in ((room(needed[1]), 1), (room(needed[1]) - 1, 2), (room(needed[2]) - 1, 4),
                         (room((needed[2] + needed[4]) // 2), 4), (room(needed[4]), 4)):
    compiled.clear()
    assert fit.choose(trainer, capacity, said.append, counting) == want, (capacity, compiled)
    assert trainer.microbatches == want and compiled[-1] == want and len(compiled) <= 3
  assert said[-1].startswith("train.microbatches=0: 4 microbatches of 2 rows (the step needs")
  with pytest.raises(ConfigError, match=r"^train.microbatches=0: the train step fits .* \(of "
                     r"the device's .*\) at no microbatch count: 4 microbatches of 2 rows need"):
    fit.choose(trainer, room(needed[4]) - 1, said.append, counting)
  compiled.clear()
  assert fit.choose(trainer, None, said.append, counting) == 1 and not compiled  # a CPU
  assert trainer.microbatches == 1


def test_a_compiler_that_refuses_for_memory_is_read_from_its_figures(trainer):
  """XLA:TPU refuses a program past its HBM at compile time: its message's figures (needed,
  available) take the place of the memory analysis; a refusal without figures doubles."""
  figures = {1: 400, 2: 220}  # (the 150 available leave 142 to the step)

  def refusing(t):
    m = t.microbatches
    if m == 4:
      return fit.Compiled("program", 100)
    return fit.Compiled(None, figures.get(m), 150, "RESOURCE_EXHAUSTED: ...")
  assert fit.choose(trainer, 10**6, lambda _: None, refusing) == 4  # the device's 150 counts
  figures.clear()
  assert fit.choose(trainer, 10**6, lambda _: None, refusing) == 4  # 1 -> 2 (twice) -> 4


def test_a_run_with_microbatches_0_trains_at_the_count_it_chose(tiny_data, tmp_path,
                                                                 monkeypatch, capsys):
  """loop.train chooses before anything is written, says so, and trains (and evaluates) as a
  run given that count does, with the program it chose (no third compile of the step);
  config.json keeps 0, so a resume elsewhere chooses again. (One layer: a quarter less CPU.)"""
  def config(m):
    return config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(
        tiny_data, **{"train.microbatches": m, "model.num_layers": 1, "train.batch_size": 8,
                      "train.steps": 4, "train.log_every": 2, "checkpoint.every_steps": 4,
                      "eval.every_steps": 4, "eval.batches": 1}))
  t = Trainer(config(0), sharding.make_mesh(config(0), jax.devices()[:1]))
  t.use_microbatches(2)
  capacity = room(fit.compile_step(t).needed)
  monkeypatch.setattr(fit, "device_memory", lambda devices: capacity)
  compiles, compile_or_get_cached = [], jax_compiler.compile_or_get_cached

  def counting(backend, computation, *args, **kwargs):
    compiles.append(str(computation.operation.attributes["sym_name"]))
    return compile_or_get_cached(backend, computation, *args, **kwargs)
  monkeypatch.setattr(jax_compiler, "compile_or_get_cached", counting)
  auto = loop.train(config(0), str(tmp_path / "auto"), devices=jax.devices()[:1])
  assert sum("_train_step" in name for name in compiles) == 2, compiles  # 1, then 2 (kept)
  assert "train.microbatches=0: 2 microbatches of 4 rows" in capsys.readouterr().out
  given = loop.train(config(2), str(tmp_path / "given"), quiet=True, devices=jax.devices()[:1])
  lines = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
           for name in ("auto", "given")}
  assert lines["auto"][0]["microbatch_search_s"] > 0  # (its compiles, before compile_s's)
  assert not any("microbatch_search_s" in r for r in lines["auto"][1:] + lines["given"])
  drop = ("tokens_per_s", "mfu", "compile_s", "eval_s", "time", "microbatch_search_s")
  assert [{k: v for k, v in r.items() if k not in drop} for r in lines["auto"]] == [
      {k: v for k, v in r.items() if k not in drop} for r in lines["given"]]
  assert auto["loss"] == given["loss"] and auto["eval_loss"] == given["eval_loss"]
  with open(os.path.join(tmp_path, "auto", "config.json")) as f:
    assert json.load(f)["train"]["microbatches"] == 0


def test_evaluating_without_training_chooses_for_the_evaluation_step(monkeypatch):
  """`evaluate`'s scoring rows and `quantize`'s validation batches (fit.for_evaluation): the
  fewest microbatches whose evaluation step fits, chosen once; a given count stays."""
  from transformer_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
  c = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", [
      "model.num_layers=1", "train.batch_size=8", "mesh.data=1", "train.microbatches=0"])
  t = Trainer(c, sharding.make_mesh(c, jax.devices()[:1]))
  needed = {}
  for m in (1, 2):
    t.use_microbatches(m)
    needed[m] = fit.compile_eval(t).needed
  assert needed[1] > needed[2], needed
  monkeypatch.setattr(fit, "device_memory", lambda devices: room(needed[2]))
  said = []
  t = Trainer(c, sharding.make_mesh(c, jax.devices()[:1]))
  assert fit.for_evaluation(t, said.append) == 2 and len(said) == 1
  assert harness.batch_rows(t) == 4 and len(said) == 1  # (chosen once)
  given = Trainer(config_lib.load(f"{REPO}/configs/gpt2.py:tiny", [
      "model.num_layers=1", "train.batch_size=8", "mesh.data=1", "train.microbatches=4"]),
      t.mesh)
  assert fit.for_evaluation(given, said.append) == 4 and harness.batch_rows(given) == 2
  assert len(said) == 1


def test_an_moes_evaluation_statistics_combine_over_microbatches_as_training_does():
  """The eval step in microbatches: sums add up, an MoE's statistics are the microbatches'
  (max of the expert load, mean of the rest) as in the train step, not sums. (One MoE layer.)"""
  from tests.conftest import synthetic_batch  # pylint: disable=g-import-not-at-top
  c = config_lib.load(f"{REPO}/configs/mixtral.py:tiny", ["train.batch_size=4", "mesh.data=1",
                                                          "model.num_layers=1"])
  t = Trainer(c, sharding.make_mesh(c, jax.devices()[:1]))
  params = t.init_state(0).params
  batch = synthetic_batch(c, seed=3)
  halves = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]  # row r: microbatch r % 2
  each = [t.evaluate(params, [h]) for h in halves]
  t.use_microbatches(2)
  got = t.evaluate(params, [batch])
  assert got["eval_loss"] == pytest.approx(
      sum(e["eval_loss"] * e["eval_tokens"] for e in each) / got["eval_tokens"], rel=1e-5)
  assert got["eval_moe_expert_load"] == pytest.approx(max(e["eval_moe_expert_load"] for e in each))
  means = [k for k in got if k.startswith("eval_moe_") and k != "eval_moe_expert_load"]
  assert means, got
  for key in means:
    assert got[key] == pytest.approx(sum(e[key] for e in each) / 2, rel=1e-5), key
