"""Hugging Face round trip of the Mixture-of-Experts decoders (Mixtral, Qwen2-MoE with its shared
expert): logits parity with transformers' own models (random small configs, no downloads),
scanned = unrolled, exact export/import in the checkpoints' per-expert layout, transformers'
fused layout read too, the CLI, and one-line refusals of what our MoE layer cannot express."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position
from safetensors.numpy import load_file, save_file

from tests.conftest import model_config, tiny_overrides
from tests.test_convert import TOL, _batch, _max_diff
from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.convert import __main__ as convert_cli
from transformer_jax.convert import hf as hf_lib
from transformer_jax.convert import qwen2_moe
from transformer_jax.convert.hf import from_hf, hf_forward, table_for, to_hf

_SIZES = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
              num_experts_per_tok=2, max_position_embeddings=64,
              rope_parameters={"rope_type": "default", "rope_theta": 500.0})
# name: (transformers class, its config); qwen2_moe_step2's layer 1 is MoE, layers 0 and 2 dense.
CASES = {
    "mixtral": ("MixtralForCausalLM", transformers.MixtralConfig(
        num_hidden_layers=2, intermediate_size=48, num_local_experts=4, sliding_window=5,
        **_SIZES)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", transformers.Qwen2MoeConfig(
        num_hidden_layers=2, intermediate_size=40, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_experts=4, norm_topk_prob=False,
        qkv_bias=False, **_SIZES)),
    "qwen2_moe_step2": ("Qwen2MoeForCausalLM", transformers.Qwen2MoeConfig(
        num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=16,
        shared_expert_intermediate_size=48, num_experts=4, norm_topk_prob=True,
        decoder_sparse_step=2, qkv_bias=False, **_SIZES)),
    # Qwen1.5-MoE's layout: biases on q/k/v (not o_proj), our model.qkv_bias.
    "qwen2_moe_qkv_bias": ("Qwen2MoeForCausalLM", transformers.Qwen2MoeConfig(
        num_hidden_layers=2, intermediate_size=40, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_experts=4, norm_topk_prob=False,
        qkv_bias=True, **_SIZES)),
}
# What each imports as: (model_type, moe_every, num_shared_experts, router_renormalize).
EXPECTED = {"mixtral": ("mixtral", 1, 0, True), "qwen2_moe": ("qwen2_moe", 1, 2, False),
            "qwen2_moe_step2": ("qwen2_moe", 2, 3, True),
            "qwen2_moe_qkv_bias": ("qwen2_moe", 1, 2, False)}


def _hf_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.fixture(scope="module", params=list(CASES))
def moe_ckpt(request, tmp_path_factory):
  """(case, HF dir, the transformers model, its logits on _batch()); every weight perturbed (the
  Qwen router starts at zero), so a wrong mapping of any tensor shows in the logits."""
  cls, cfg = CASES[request.param]
  path = str(tmp_path_factory.mktemp(request.param))
  torch.manual_seed(0)
  model = getattr(transformers, cls)(cfg)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.eval().save_pretrained(path)
  return request.param, path, model, _hf_logits(model, *_batch())


def _scans(case):
  return (False, True) if EXPECTED[case][1] == 1 else (False,)


def test_logits_match_transformers_scanned_and_unrolled(moe_ckpt):
  case, path, _, ref = moe_ckpt
  ids, mask = _batch()
  outs = {}
  for scan in _scans(case):
    model, params = from_hf(path, scan_layers=scan)
    c = model.cfg
    assert (c.num_experts, c.experts_per_token, c.expert_capacity_factor) == (4, 2, 0.0)
    assert (c.moe_every, c.num_shared_experts, c.router_renormalize) == EXPECTED[case][1:]
    outs[scan] = hf_forward(model, params, input_ids=ids, attention_mask=mask)
    diff = _max_diff(outs[scan], ref, mask)
    print(f"{case} scan_layers={scan}: max |ours - transformers| = {diff:.2e}")
    assert diff < TOL, (case, scan, diff)
  # With a training capacity (an allowed import override), hf_forward still runs dropless, as
  # transformers does: 2 slots per expert would drop tokens of these rows.
  model, params = from_hf(path, expert_capacity_factor=0.25)
  assert model.cfg.expert_capacity_factor == 0.25
  assert _max_diff(hf_forward(model, params, input_ids=ids, attention_mask=mask), ref, mask) < TOL
  if len(outs) == 2:
    assert _max_diff(outs[False], outs[True], mask) < 1e-5
  else:  # dense and MoE layers differ: one scanned block cannot hold them
    with pytest.raises(ConfigError, match="scan_layers") as e:
      from_hf(path, scan_layers=True)
    assert "\n" not in str(e.value)
  # A mapping mistake is visible: the experts reversed behind the same router.
  model, params = from_hf(path)
  moe = next(k for k in params if k.startswith("layer_") and "router" in params[k]["mlp"])
  mlp = {k: v[::-1] if k in ("gate", "up", "down") else v for k, v in params[moe]["mlp"].items()}
  swapped = dict(params, **{moe: dict(params[moe], mlp=mlp)})
  assert _max_diff(hf_forward(model, swapped, input_ids=ids, attention_mask=mask), ref, mask) > 1e-2


def test_export_is_the_checkpoint_and_transformers_runs_it(moe_ckpt, tmp_path):
  """HF -> ours -> HF: the same tensors bit for bit, in save_pretrained's per-expert names (from
  either layout); ours -> HF with a config.json of our own making runs in transformers as ours."""
  case, path, _, ref = moe_ckpt
  original = load_file(f"{path}/model.safetensors")
  for scan in _scans(case):
    model, params = from_hf(path, scan_layers=scan)
    out = str(tmp_path / f"scan{scan}")
    written = to_hf(model, params, out, hf_config=hf_lib.read_config(path))
    assert written["model_type"] == EXPECTED[case][0]
    exported = load_file(f"{out}/model.safetensors")
    assert sorted(exported) == sorted(original)
    for name, value in original.items():
      assert exported[name].dtype == value.dtype and np.array_equal(exported[name], value), name
    _, again = from_hf(out, scan_layers=scan)
    jax.tree.map(np.testing.assert_array_equal, params, again)
  fresh = str(tmp_path / "fresh")
  written = to_hf(model, params, fresh)  # no hf_config: every key from our config
  assert written["architectures"] == [CASES[case][0]]
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(fresh).eval()
  assert type(hf_model).__name__ == CASES[case][0]
  ids, mask = _batch()
  assert _max_diff(_hf_logits(hf_model, ids, mask), ref, mask) < 1e-6


def test_transformers_fused_layout_imports_the_same(moe_ckpt, tmp_path):
  """A state dict saved as transformers holds it (mlp.gate, mlp.experts.gate_up_proj [E, 2F, D],
  mlp.experts.down_proj [E, D, F]) imports as the checkpoint does."""
  from safetensors.torch import save_file as save_torch  # pylint: disable=g-import-not-at-top
  _, path, model, _ = moe_ckpt
  state = model.state_dict()
  assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
  save_torch({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"),
             metadata={"format": "pt"})
  (tmp_path / "config.json").write_text(open(f"{path}/config.json").read())
  _, fused = from_hf(str(tmp_path))
  _, per_expert = from_hf(path)
  jax.tree.map(np.testing.assert_array_equal, fused, per_expert)


def test_router_aux_loss_is_the_checkpoints_and_free_to_change(moe_ckpt, tmp_path):
  """HF's load-balancing loss counts every one of a token's K choices: K x ours."""
  case, path, _, _ = moe_ckpt
  model, params = from_hf(path)
  assert model.cfg.router_aux_loss == pytest.approx(0.001 * 2)
  model, _ = from_hf(path, router_aux_loss=0.05)  # training's choice, not the architecture's
  assert to_hf(model, params, str(tmp_path))["router_aux_loss_coef"] == pytest.approx(0.025)
  with pytest.raises(ConfigError, match="num_experts=8.* contradict"):
    from_hf(path, num_experts=8)
  assert table_for(model.cfg).MODEL_TYPE == EXPECTED[case][0]


@pytest.mark.parametrize("moe_ckpt", ["qwen2_moe_step2"], indirect=True)
def test_cli_import_then_export_round_trips(moe_ckpt, tiny_data, tmp_path):
  """The import and export commands (a padded vocabulary: the tiny tokenizer has 300 pieces);
  one case is enough: dense and MoE layers, shared experts."""
  _, path, _, ref = moe_ckpt
  workdir, out = str(tmp_path / "w"), str(tmp_path / "hf")
  overrides = tiny_overrides(tiny_data, **{"model.router_aux_loss": 0.03})
  convert_cli.main(["import", "--hf_dir", path, "--workdir", workdir]
                   + [f"--config.{o}" for o in overrides])
  config = config_lib.from_json_file(f"{workdir}/config.json")
  m = config.model
  assert (m.num_experts, m.moe_every, m.num_shared_experts, m.expert_d_ff, m.d_ff) == (
      4, 2, 3, 16, 40)
  assert m.router_aux_loss == 0.03 and m.vocab_size == 320
  convert_cli.main(["export", "--workdir", workdir, "--hf_dir", out])
  exported = load_file(f"{out}/model.safetensors")
  for name, value in load_file(f"{path}/model.safetensors").items():
    np.testing.assert_array_equal(exported[name][tuple(slice(0, n) for n in value.shape)], value,
                                  err_msg=name)
  ids, mask = _batch()
  got = _hf_logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval(), ids, mask)
  assert _max_diff(got[..., :100], ref, mask) < 1e-5


# ------------------------------------------------------------------------------- refusals
def _refused(path, tmp_path, words, **changes):
  """from_hf of `path` with config.json `changes` (None: the key removed) raises one line
  matching `words`."""
  hf = {**hf_lib.read_config(path), **changes}
  hf = {k: v for k, v in hf.items() if v is not None}
  hf_dir = tmp_path / f"refused{len(os.listdir(tmp_path))}"
  hf_dir.mkdir()
  (hf_dir / "config.json").write_text(json.dumps(hf))
  os.symlink(f"{path}/model.safetensors", hf_dir / "model.safetensors")
  with pytest.raises(ConfigError, match=words) as e:
    from_hf(str(hf_dir))
  assert "\n" not in str(e.value)


def test_unsupported_checkpoints_are_refused_in_one_line(moe_ckpt, tmp_path):
  case, path, _, _ = moe_ckpt
  _refused(path, tmp_path, "hidden_act='gelu'", hidden_act="gelu")
  experts = hf_lib.read_config(path)["num_local_experts" if case == "mixtral" else "num_experts"]
  _refused(path, tmp_path, f"experts_per_token={experts + 1} exceeds model.num_experts={experts}",
           num_experts_per_tok=experts + 1)  # (jax's top_k, a traceback)
  if case == "mixtral":
    _refused(path, tmp_path, "num_local_experts=0", num_local_experts=0)
    return
  _refused(path, tmp_path, "shared_expert_intermediate_size=40 is not a positive multiple",
           shared_expert_intermediate_size=40)
  _refused(path, tmp_path, "mlp_only_layers=", mlp_only_layers=[1], decoder_sparse_step=1)
  _refused(path, tmp_path, "use_sliding_window", use_sliding_window=True)
  _refused(path, tmp_path, "sliding_attention",
           layer_types=["sliding_attention"] + ["full_attention"] * 2)


def test_moe_layers_of_mlp_only_layers():
  """Qwen2-MoE's MoE layers as our moe_every, where they are every k-th layer."""
  every = lambda **hf: qwen2_moe.moe_every({"num_hidden_layers": 6, **hf})
  assert every() == 1 and every(decoder_sparse_step=3) == 3
  assert every(mlp_only_layers=[0, 2, 4]) == 2  # the same layers as decoder_sparse_step=2
  for none in ({"mlp_only_layers": [0, 1, 2, 3, 4, 5]}, {"decoder_sparse_step": 7},
               {"num_experts": 0}):  # (a dense model: refused by name, not as moe_every=7)
    with pytest.raises(ValueError, match=r"leave none of the 6 layers an MoE layer: a dense"):
      every(**none)
  assert every(decoder_sparse_step=2, mlp_only_layers=[0, 2]) == 2  # dense anyway
  with pytest.raises(ValueError, match="mlp_only_layers=.0, 1.*every k-th"):
    every(mlp_only_layers=[1, 0])


@pytest.mark.parametrize("moe_ckpt", ["mixtral"], indirect=True)
def test_a_checkpoint_missing_an_expert_is_refused(moe_ckpt, tmp_path):
  _, path, _, _ = moe_ckpt
  tensors = load_file(f"{path}/model.safetensors")
  del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  (tmp_path / "config.json").write_text(open(f"{path}/config.json").read())
  with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.experts lack .* w2") as e:
    from_hf(str(tmp_path))
  assert "\n" not in str(e.value)


def test_export_refuses_moe_models_transformers_cannot_hold(tmp_path):
  moe = dict(num_experts=4, experts_per_token=2, activation="swiglu", norm="rmsnorm",
             position="rotary", use_bias=False)
  assert table_for(model_config(**moe)).MODEL_TYPE == "mixtral"
  assert table_for(model_config(**moe, num_shared_experts=1,
                                shared_expert_gate=True)).MODEL_TYPE == "qwen2_moe"
  assert table_for(model_config(**{**moe, "num_experts": 0})).MODEL_TYPE == "llama"
  for cfg, family, words in (
      (model_config(**moe, router_renormalize=False), "", "no Hugging Face family"),
      (model_config(**moe, num_shared_experts=1), "", "no Hugging Face family"),  # ungated
      (model_config(**moe, moe_every=2), "", "no Hugging Face family"),
      (model_config(**{**moe, "num_experts": 0}), "mixtral", "num_experts=0"),
      (model_config(**moe, shared_expert_gate=True), "qwen2_moe", "num_shared_experts=0")):
    with pytest.raises(ConfigError, match=words) as e:
      to_hf(cfg, {}, str(tmp_path), family=family)
    assert "\n" not in str(e.value)
  assert not os.listdir(tmp_path)
