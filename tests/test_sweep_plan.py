"""Sweep plans: shapes are valid, parameter counts are the model's, FLOPs follow the MFU formula."""

import json
import os

import jax
import numpy as np
import pytest

from transformer_jax import config as config_lib
from transformer_jax.parallel import sharding
from transformer_jax.sweep import plan as plan_lib
from transformer_jax.training import metrics
from transformer_jax.training.step import Trainer
from tests.conftest import REPO

SWEEP = f"{REPO}/configs/sweeps/cpu_small.py"


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
  cwd = os.getcwd()
  os.chdir(tmp_path_factory.mktemp("elsewhere"))  # the base config resolves from any directory
  try:
    return plan_lib.plan(SWEEP)
  finally:
    os.chdir(cwd)


def test_grid_shapes_and_flop_arithmetic(planned):
  runs, dropped = planned
  sweep = plan_lib.load_sweep(SWEEP)
  assert len(runs) + len(dropped) == len(sweep.budgets) * len(sweep.sizes)
  assert len(runs) >= 12 and not dropped
  for run, config in runs:
    assert run.d_model == run.num_heads * sweep.head_dim
    assert (config.model.num_layers, config.model.d_model) == (run.num_layers, run.d_model)
    assert run.tokens == run.steps * run.batch_size * run.seq_len == config.train.steps * 16 * 128
    assert run.flops == pytest.approx(run.flops_per_token * run.tokens)
    # the budget is met to within half a step's tokens
    assert abs(run.flops - run.budget) <= 0.5 * run.flops_per_token * run.batch_size * run.seq_len
    assert config.optimizer.learning_rate == pytest.approx(
        sweep.lr * (run.params_nonembed / sweep.lr_ref_params) ** -sweep.lr_exponent)


@pytest.mark.parametrize("index", [0, -1])
def test_parameter_counts_are_the_models(planned, index):
  run, config = sorted(planned[0], key=lambda rc: rc[0].params)[index]
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  params = trainer.abstract_state.params
  assert run.params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert run.params - run.params_nonembed == sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(params["embed"]))
  n = metrics.matmul_params(params, config.model.tie_embeddings)
  assert run.flops_per_token == metrics.flops_per_token(trainer.model.cfg, n, config.data.seq_len)


def test_shape_rule_hits_the_target_within_the_grid_step():
  for target in (1e4, 1e5, 1e6, 1e7, 1e8):
    layers, d, heads = plan_lib.shape_for(target, aspect=32.0, head_dim=32)
    assert d % 32 == 0 and heads * 32 == d and layers >= 1
    assert 0.3 < 12 * layers * d * d / target < 3.0


def test_written_configs_resume_as_the_plan_says(planned, tmp_path):
  plan_lib.write(planned[0], str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "plan.jsonl")]
  assert [l["name"] for l in lines] == [r.name for r, _ in planned[0]]
  for line in lines:
    saved = config_lib.from_json_file(str(tmp_path / line["name"] / "config.json"))
    assert saved.train.steps == line["steps"] and saved.model.d_model == line["d_model"]
