"""Long context: sliding-window attention (every CPU kernel, by value, gradient and dependency),
per-layer window patterns (scanned = unrolled, KV cache), RoPE scaling against Hugging Face's
own initializers, Llama with rope scaling and Mistral against transformers' logits, memory that
grows linearly with a window, and the one-line config errors."""

import dataclasses
import json
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import (REPO, assert_kv_cache_matches, model_config, synthetic_batch,
                            tiny_overrides)
from tests.test_attention import _check, _inputs
from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.convert import llama
from transformer_jax.convert.hf import from_hf, hf_forward, table_for, to_hf
from transformer_jax.data import objectives
from transformer_jax.data import tokenization
from transformer_jax.evaluation import passkey
from transformer_jax.models import attention
from transformer_jax.models import families
from transformer_jax.models import layers
from transformer_jax.models import ring
from transformer_jax.models import stack
from transformer_jax.models.decoder import DecoderLM
from transformer_jax.parallel import sharding
from transformer_jax.training import loop
from transformer_jax.training.step import Trainer


def _windowed_reference(mask, window):
  t = mask.shape[1]
  full = mask & attention.window_mask(t, t, window)[None]
  return lambda q, k, v: attention.reference(q, k, v, full)


def _init(model, tokens=None):
  """The model's parameters, by one jitted initialisation (eagerly every op compiled alone)."""
  tokens = jnp.zeros((1, 8), jnp.int32) if tokens is None else tokens
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])


def _check_kernels(kernels, ref, args, tol):
  """tests/test_attention.py's _check of each of `kernels` ({name: fn}) against one `ref`,
  whose values and gradients are computed (compiled) once; returns each kernel's."""
  w = jnp.asarray(np.random.default_rng(9).normal(size=args[0].shape), jnp.float32)
  run = lambda fn: jax.jit(lambda *a: (lambda out, vjp: [out, *vjp(w)])(*jax.vjp(fn, *a)))(*args)
  want, got = run(ref), {name: run(fn) for name, fn in kernels.items()}
  for name in kernels:
    for value, expected in zip(got[name], want):
      np.testing.assert_allclose(value, expected, atol=tol, rtol=tol, err_msg=name)
  return got


@pytest.mark.parametrize("causal", [True, False])
def test_every_cpu_kernel_honours_the_window(causal):
  """xla (block-skipping when causal), xla with a traced window, dot_product, splash (interpret
  mode) and, when causal, the window as jax's local_window_size (cuDNN's form of it) equal the
  reference under mask & window: values and gradients, packed."""
  q, k, v, _, seg = _inputs(2, 128, 2, 2, 8)
  mask, w = attention.mask(seg, seg, causal), 32
  want = _windowed_reference(mask, w)
  kernels = {
      "xla": lambda *a: attention.attend("xla", *a, mask, causal=causal, window=w),
      "traced": lambda *a: attention.attend("xla", *a, mask, causal=causal,
                                            window=jnp.int32(w)),
      "dot_product": lambda *a: attention.attend("dot_product", *a, mask, causal=causal,
                                                 window=w),
      "splash": lambda *a: attention.splash(*a, attention.segment_ids(mask), causal=causal,
                                            window=w, interpret=True),
  }
  if causal:  # jax's local_window_size, which cuDNN runs as its own sliding window
    kernels["local_window_size"] = lambda *a: attention.dot_product(*a, mask, causal=True,
                                                                    window=w)
  got = _check_kernels(kernels, want, (q, k, v), tol=2e-5)
  # The window changes the result (the test would see a kernel that ignored it).
  unwindowed = jax.jit(lambda *a: attention.reference(*a, mask))(q, k, v)
  assert not np.allclose(got["xla"][0], unwindowed, atol=1e-3)
  if causal:  # a window that does not divide T (128 = 2 x 48 + 32): padded blocks, still exact
    _check(lambda *a: attention.attend("xla", *a, mask, causal=True, window=48),
           _windowed_reference(mask, 48), (q, k, v), tol=2e-5)


@pytest.mark.parametrize("window", [1, 4, 8])
def test_a_query_depends_exactly_on_the_keys_its_window_allows(window):
  """d out[i] / d v[j] != 0 iff j is in i's segment, not after it and within the window."""
  q, k, v, _, seg = _inputs(1, 16, 1, 1, 4, seed=3)
  mask = attention.mask(seg, seg, True)
  jac = jax.jit(jax.jacrev(lambda v: attention.attend(  # (jitted: one program, not op by op)
      "xla", q, k, v, mask, causal=True, window=window)))(v)  # [1,T,1,1,K, 1,S,1,K]
  seen = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 4, 5, 7, 8)) > 0  # [T, S]
  allowed = np.asarray(mask[0] & attention.window_mask(16, 16, window))
  np.testing.assert_array_equal(seen, allowed)


def _cfg(**kw):
  return model_config(**{**dict(num_layers=4, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                d_ff=64, vocab_size=97, max_len=64, position="rotary",
                                norm="rmsnorm", activation="swiglu", use_bias=False,
                                attention_chunks=1), **kw})


def test_window_pattern_scanned_equals_unrolled_and_the_kv_cache_keeps_the_window():
  cfg = _cfg(attention_window=4, window_pattern="LG", num_layers=3)
  assert stack.layer_windows(cfg, 5) == [4, 0, 4, 0, 4]
  assert stack.layer_windows(dataclasses.replace(cfg, window_pattern=""), 2) == [4, 4]
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 97, (2, 16)), jnp.int32)
  model = DecoderLM(cfg)
  params = _init(model, tokens)
  full = assert_kv_cache_matches(model, params, tokens, prefill=9)
  apply = lambda cfg, p: jax.jit(DecoderLM(cfg).apply)({"params": p}, tokens)
  scanned = apply(dataclasses.replace(cfg, scan_layers=True),
                  stack.stack_layers(params, cfg.num_layers))
  np.testing.assert_allclose(scanned, full, atol=2e-5, rtol=2e-5)
  for other in ({"attention_window": 0, "window_pattern": ""}, {"window_pattern": "L"}):
    changed = apply(dataclasses.replace(cfg, **other), params)
    assert not np.allclose(changed[:, 8:], full[:, 8:], atol=1e-4)  # every layer counts


def test_global_tokens_and_random_blocks_reach_exactly_the_keys_they_allow():
  """One layer, packed rows: d logits[i] / d input[j] != 0 iff j == i or j is in i's segment,
  not after it, and in its window, a global token of it (position < G), or in one of its query
  block's random key blocks (blocks of positions in the document); i's own global status lets
  it see its whole past segment. The second document's logits are its logits alone."""
  w, g, r, b = 3, 2, 1, 4
  cfg = _cfg(num_layers=1, attention_window=w, global_tokens=g, random_blocks=r, block_size=b)
  seg = np.array([1] * 9 + [2] * 7)
  pos = np.concatenate([np.arange(9), np.arange(7)])
  model = DecoderLM(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 97, (1, 16)), jnp.int32)
  params = _init(model, tokens)
  table = params["embed"]["tokens"]
  wide = DecoderLM(dataclasses.replace(cfg, vocab_size=97 + 16))
  if "logits" in params["embed"]:  # untied output: pad the extra vocabulary columns
    params["embed"]["logits"] = jnp.pad(params["embed"]["logits"], ((0, 0), (0, 16)))

  def logits(inputs_TD):  # the inputs' rows appended to the table, so each has a gradient
    p = dict(params, embed=dict(params["embed"], tokens=jnp.concatenate([table, inputs_TD])))
    ids = (97 + jnp.arange(16, dtype=jnp.int32))[None]
    return wide.apply({"params": p}, ids, jnp.asarray(seg)[None], jnp.asarray(pos)[None])[0]

  jac = jax.jit(jax.jacrev(lambda x: logits(x)[:, :97].sum(-1)))(table[tokens[0]])
  seen = np.abs(np.asarray(jac)).sum(-1) > 0
  blocks = attention.random_blocks(cfg.num_layers, 4, r, True)[0]
  assert all(sorted(set(row[row >= 0])) == sorted(row[row >= 0]) and row.max() <= i
             for i, row in enumerate(blocks))
  i, j = np.arange(16)[:, None], np.arange(16)[None, :]
  rand = np.array([[jb in blocks[ib] for jb in range(4)] for ib in range(4)])[
      pos[:, None] // b, pos[None, :] // b]
  allowed = ((seg[:, None] == seg[None, :]) & (j <= i)
             & ((i - j < w) | (pos[:, None] < g) | (pos[None, :] < g) | rand))
  np.testing.assert_array_equal(seen, allowed | (i == j))
  assert (allowed & ~((i - j < w) & (j <= i))).any()  # the sparse keys add to the window
  apply = jax.jit(model.apply)  # (jitted, as above: eagerly every op compiled on its own)
  alone = apply({"params": params}, tokens[:, 9:])[0]
  packed = apply({"params": params}, tokens, jnp.asarray(seg)[None], jnp.asarray(pos)[None])
  np.testing.assert_allclose(packed[0, 9:], alone, atol=2e-5, rtol=2e-5)


def test_bidirectional_random_blocks_do_not_depend_on_the_padding():
  """An encoder's random key blocks are drawn over model.max_len's blocks: a document padded to
  16 or to 40 positions (a scoring batch's bucket) gets the same logits (drawn over the padded
  row's blocks, they changed with it)."""
  from transformer_jax.models.encoder import EncoderLM  # pylint: disable=g-import-not-at-top
  cfg = _cfg(num_layers=2, attention_window=2, random_blocks=1, block_size=2, init_std=0.3)
  model = EncoderLM(cfg)
  doc = np.random.default_rng(2).integers(3, 97, 12)
  def logits(length):
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :12] = doc
    seg = (np.arange(length) < 12).astype(np.int32)[None]
    return jax.jit(model.apply)({"params": params}, jnp.asarray(tokens), jnp.asarray(seg),
                                jnp.asarray(np.arange(length) * seg))[0, :12]
  params = _init(model, jnp.zeros((1, 16), jnp.int32))
  np.testing.assert_allclose(logits(16), logits(40), atol=2e-5, rtol=2e-5)


def test_sparse_patterns_scanned_equal_unrolled_and_decode_through_the_cache():
  cfg = _cfg(attention_window=3, window_pattern="LG", global_tokens=2, random_blocks=2,
             block_size=4, num_layers=3)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, 97, (2, 16)), jnp.int32)
  model = DecoderLM(cfg)
  params = _init(model, tokens)
  full = assert_kv_cache_matches(model, params, tokens, prefill=7)
  apply = lambda cfg, p: jax.jit(DecoderLM(cfg).apply)({"params": p}, tokens)
  scanned = apply(dataclasses.replace(cfg, scan_layers=True),
                  stack.stack_layers(params, cfg.num_layers))
  np.testing.assert_allclose(scanned, full, atol=2e-5, rtol=2e-5)
  for other in ({"global_tokens": 0}, {"random_blocks": 0}):
    changed = apply(dataclasses.replace(cfg, **other), params)
    assert not np.allclose(changed, full, atol=1e-4), other


def test_windowed_training_memory_grows_linearly_with_length():
  """The compiled step's temporaries (CPU memory_analysis) double with the length under a
  window, one it does not divide too; without one they grow faster (the T x T scores)."""
  def temp_bytes(t, window):
    cfg = _cfg(attention_window=window, num_layers=1, max_len=t)
    model = DecoderLM(cfg)
    tokens = jnp.zeros((1, t), jnp.int32)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), tokens)["params"]))
    grad = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).sum()))
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

  windowed = [temp_bytes(t, 64) for t in (512, 1024, 2048)]
  full = [temp_bytes(t, 0) for t in (1024, 2048)]
  odd = temp_bytes(2047, 64)  # a length the window does not divide (it fell back to T x T)
  print("windowed", windowed, "full", full, "odd", odd)
  assert windowed[2] / windowed[1] < 2.3 and windowed[1] / windowed[0] < 2.3
  assert full[1] / full[0] > 3 and odd < 1.2 * windowed[2]


# ------------------------------------------------------------------------------ ring attention
@pytest.mark.parametrize("causal, window, sequence", [(True, 0, 4), (False, 0, 4), (True, 24, 8),
                                                      (True, 0, 2), (False, -20, 4)])
def test_ring_attention_equals_full_attention(causal, window, sequence):
  """Sequence sharded over `sequence` devices of a data x sequence mesh (8 CPU devices): values
  and gradients (the ring's own backward) equal the reference on packed rows, causal
  (zigzag-balanced) or not, windowed (window < 0: |window| as a traced value, as a scanned
  stack's per-layer window is)."""
  mesh = jax.make_mesh((8 // sequence, sequence), ("data", "sequence"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  q, k, v, _, seg = _inputs(2, 64, 2, 2, 8, seed=5)
  mask = attention.mask(seg, seg, causal)
  want = _windowed_reference(mask, abs(window)) if window else (
      lambda q, k, v: attention.reference(q, k, v, mask))
  batch = "data" if 8 // sequence <= 2 else None
  fn = lambda q, k, v: ring.ring_attention(
      q, k, v, seg, causal=causal, axis="sequence", batch_axes=batch,
      window=jnp.int32(-window) if window < 0 else window)
  with jax.set_mesh(mesh):
    _check(fn, want, (q, k, v), tol=2e-5)
    text = jax.jit(fn).lower(q, k, v).as_text()
  assert "collective_permute" in text  # the chunks go round the ring


def test_ring_attention_in_bfloat16_keeps_to_the_fp32_reference():
  """bf16 inputs (what training feeds it): the ring's output and its own backward's gradients
  stay within 2 % (of the largest value) of the fp32 reference, as the bf16 reference does."""
  mesh = jax.make_mesh((2, 4), ("data", "sequence"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  q, k, v, _, seg = _inputs(2, 64, 2, 2, 8, seed=6)
  mask = attention.mask(seg, seg, True)
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  fns = {"ring": lambda *a: ring.ring_attention(*a, seg, causal=True, axis="sequence"),
         "reference": lambda *a: attention.reference(*a, mask)}

  def outputs(fn, dtype):
    run = lambda *a: fn(*(x.astype(dtype) for x in a)).astype(jnp.float32)
    out, vjp = jax.vjp(run, q, k, v)
    return [out, *vjp(w)]

  with jax.set_mesh(mesh):
    exact = jax.jit(lambda: outputs(fns["reference"], jnp.float32))()
    for name, fn in fns.items():
      got = jax.jit(lambda fn=fn: outputs(fn, jnp.bfloat16))()
      errors = [float(jnp.abs(g - e).max() / jnp.abs(e).max()) for g, e in zip(got, exact)]
      print(name, errors)
      assert max(errors) < 2e-2, (name, errors)


@pytest.mark.parametrize("family", ["gpt2.py:tiny", "bert.py:tiny"])
def test_a_sequence_parallel_train_step_passes_chunks_round_the_ring(family):
  """mesh.sequence=4: the batch's tokens are split over the sequence axis and the compiled step
  holds the ring's collective-permutes (not an all-gather of the whole sequence); its losses
  equal one device's (tests/test_step.py, test_sharded_equals_single_device)."""
  config = config_lib.load(f"{REPO}/configs/{family}", ["mesh.data=2", "mesh.sequence=4",
                                                      "model.num_layers=1"])
  config_lib.validate(config, 8)
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:8]))
  assert trainer.batch_sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp", "expert"),
                                                                   "sequence")
  text = trainer.lower_train_step().compile().as_text()
  assert "collective-permute" in text


def test_sequence_parallel_training_equals_one_device_and_resumes_on_another_size(tiny_data,
                                                                                   tmp_path):
  """8 steps on one device vs 4 steps with mesh.sequence=4 (x data 2), resumed for 4 more with
  mesh.sequence=2: every logged loss within 1e-4 (the checkpoint restores across sizes)."""

  def run(workdir, devices, **mesh):
    extra = {"train.steps": 8, "train.log_every": 1, "checkpoint.every_steps": 4,
             "eval.every_steps": 0, "model.num_layers": 1,
             **{f"mesh.{k}": v for k, v in mesh.items()}}
    config = config_lib.load(f"{REPO}/configs/gpt2.py:tiny", tiny_overrides(tiny_data, **extra))
    loop.train(config, str(workdir), quiet=True, devices=jax.devices()[:devices],
               stop_after=4 if mesh.get("sequence") == 4 else None)
    with open(workdir / "metrics.jsonl") as f:
      return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}

  want = run(tmp_path / "one", 1)
  got = run(tmp_path / "ring", 8, data=2, sequence=4)
  assert sorted(got) == [1, 2, 3, 4]
  got = run(tmp_path / "ring", 4, data=2, sequence=2)
  assert sorted(got) == sorted(want) == list(range(1, 9))
  for step, loss in want.items():
    assert got[step] == pytest.approx(loss, rel=1e-4), step


def test_zigzag_gives_every_device_the_same_causal_work():
  for p in (2, 4, 8):
    order = ring.zigzag(64, p).reshape(p, -1)
    assert sorted(order.ravel()) == list(range(64))
    work = [sum(int(i) + 1 for i in rows) for rows in order]  # visible keys of each query
    assert len(set(work)) == 1, work


# ------------------------------------------------------------------------------ RoPE scaling
ROPES = [
    ("linear", {"factor": 4.0}),
    ("dynamic", {"factor": 2.0}),
    ("llama3", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}),
    ("llama3", {"factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                "original_max_position_embeddings": 48}),
    ("yarn", {"factor": 2.0, "original_max_position_embeddings": 32}),
    ("yarn", {"factor": 1.6, "original_max_position_embeddings": 40, "beta_fast": 16.0,
              "beta_slow": 2.0, "attention_factor": 1.3}),
]


def _hf_llama_config(kind, rope, head_dim, theta, max_len=64):
  transformers = pytest.importorskip("transformers")
  return transformers.LlamaConfig(
      num_hidden_layers=2, hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=1,
      intermediate_size=64, vocab_size=100, max_position_embeddings=max_len, head_dim=head_dim,
      rope_parameters={"rope_type": kind, "rope_theta": theta, **rope})


@pytest.mark.parametrize("kind, rope", ROPES)
@pytest.mark.parametrize("head_dim, theta", [(16, 10000.0), (64, 500000.0)])
def test_rope_frequencies_equal_hugging_face(kind, rope, head_dim, theta):
  # pylint: disable-next=g-import-not-at-top
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  hf = _hf_llama_config(kind, rope, head_dim, theta)
  cfg = _cfg(head_dim=head_dim, **llama.read_rope(hf.to_dict()))
  for length in (32, 64, 200):  # dynamic: within, at and beyond max_len
    want, want_scale = ROPE_INIT_FUNCTIONS[kind](hf, None, seq_len=length)
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    got, scale = layers.rope_frequencies(cfg, head_dim, positions)
    got = np.reshape(got, (-1, head_dim // 2))  # dynamic's: one row per token
    np.testing.assert_allclose(got, np.broadcast_to(want.numpy(), got.shape), rtol=2e-6)
    assert scale == pytest.approx(want_scale, rel=1e-6)
  if kind == "dynamic":  # each document's own length, as HF's forward of it alone: two packed
    # documents (40 and 160 tokens), then padding (segment 0 at position 0), in one row
    positions = jnp.asarray([[*range(40), *range(160), *[0] * 56], [*range(256)]], jnp.int32)
    segments = jnp.asarray([[1] * 40 + [2] * 160 + [0] * 56, [1] * 256], jnp.int32)
    got, _ = layers.rope_frequencies(cfg, head_dim, positions, segments)
    lengths = [64] * 40 + [160] * 160 + [64] * 56, [256] * 256
    for row, row_lengths in zip(got, lengths):
      want = {n: ROPE_INIT_FUNCTIONS[kind](hf, None, seq_len=n)[0] for n in set(row_lengths)}
      np.testing.assert_allclose(row, np.stack([want[n] for n in row_lengths]), rtol=2e-6)


def test_a_packed_document_under_dynamic_rope_gives_its_logits_alone():
  """Dynamic NTK's theta is each document's own: a short document packed before a long one
  (past max_len) gets the logits it gets alone, and the long one those of its own row."""
  cfg = _cfg(rope_scaling="dynamic", rope_factor=4.0, max_len=8, head_dim=16, init_std=0.5,
             num_layers=2)
  model = DecoderLM(cfg)
  short, long = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 26))
  short = short[:6]
  tokens = jnp.asarray([np.concatenate([short, long])], jnp.int32)
  segments = jnp.asarray([[1] * 6 + [2] * 26], jnp.int32)
  positions = jnp.asarray([[*range(6), *range(26)]], jnp.int32)
  params = _init(model, tokens)
  apply = jax.jit(model.apply)  # (a program per shape, where eagerly every op compiled alone)
  packed = apply({"params": params}, tokens, segments, positions)[0]
  for got, doc in ((packed[:6], short), (packed[6:], long)):
    alone = apply({"params": params}, jnp.asarray([doc], jnp.int32))[0]
    # (fp32 rounding of these logits, up to ~10: 1.1e-5 jitted, 3.1e-5 eagerly on stop 56's
    # host with 4 layers; the long document under its row's theta (length 32, not 26) is 2.7 off)
    np.testing.assert_allclose(got, alone, atol=2e-4)


def _save(model, path):
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  model.save_pretrained(path)
  return model.eval()


def _hf_logits(model, ids):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("kind, rope", [ROPES[0], ROPES[1], ROPES[2], ROPES[5]])
def test_scaled_llama_logits_match_transformers_beyond_the_original_context(kind, rope,
                                                                             tmp_path):
  transformers = pytest.importorskip("transformers")
  # Dynamic scales past max_position_embeddings; the others past the original context.
  original = rope.get("original_max_position_embeddings", 24)
  max_len = 24 if kind == "dynamic" else int(original * rope["factor"])
  hf = _hf_llama_config(kind, rope, 16, 10000.0, max_len=max_len)
  ref_model = _save(transformers.LlamaForCausalLM(hf), tmp_path)
  ids = np.random.default_rng(0).integers(0, 100, (2, 56))  # past 24, 32 and 40 (original)
  model, params = from_hf(str(tmp_path))
  assert model.cfg.rope_scaling == kind
  diff = np.abs(hf_forward(model, params, input_ids=ids) - _hf_logits(ref_model, ids)).max()
  assert diff < 1e-4, diff


def test_mistral_sliding_window_round_trip_matches_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  hf = transformers.MistralConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=128, vocab_size=100,
                                  max_position_embeddings=64, sliding_window=5, head_dim=16)
  ref_model = _save(transformers.MistralForCausalLM(hf), tmp_path / "in")
  ids = np.random.default_rng(1).integers(0, 100, (2, 20))
  want = _hf_logits(ref_model, ids)
  for scan in (False, True):
    model, params = from_hf(str(tmp_path / "in"), scan_layers=scan)
    assert model.cfg.attention_window == 5
    assert np.abs(hf_forward(model, params, input_ids=ids) - want).max() < 1e-4
  full = DecoderLM(dataclasses.replace(model.cfg, attention_window=0))
  assert np.abs(hf_forward(full, params, input_ids=ids) - want).max() > 1e-3  # the window counts
  written = to_hf(model, params, str(tmp_path / "out"), hf_config=ref_model.config.to_dict())
  assert written["model_type"] == "mistral" and written["sliding_window"] == 5
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
  assert np.abs(_hf_logits(again, ids) - want).max() < 1e-6


def test_a_windowed_model_is_not_exported_as_a_family_without_windows(tmp_path):
  assert table_for(_cfg()).MODEL_TYPE == "llama"
  assert table_for(_cfg(attention_window=8)).MODEL_TYPE == "mistral"
  with pytest.raises(ConfigError, match="no Hugging Face family"):
    table_for(_cfg(attention_window=8, window_pattern="LG"))
  with pytest.raises(ConfigError, match="no Hugging Face family"):
    table_for(model_config(attention_window=8))  # GPT-2 shaped


def test_passkey_prompts_and_their_scoring(tiny_data):
  """Prompts of the asked length hold the key at the asked depth; scoring counts a key as found
  exactly when greedy decoding writes it."""
  tok = tokenization.load(tiny_data["tokenizer"])
  for depth in (0.0, 0.5, 1.0):
    prompt, key = passkey.example(tok, 400, depth, 71432)
    assert abs(len(prompt) - 400) <= 2 and tok.decode(key).strip() == "71432"
    needle = tok.encode(passkey.NEEDLE.format(key=71432))
    starts = [i for i in range(len(prompt)) if prompt[i:i + len(needle)] == needle]
    filler = len(prompt) - 1 - len(needle) - len(tok.encode(passkey.QUESTION))
    assert starts == [1 + round(depth * filler)], (depth, starts, filler)
    assert tok.decode(prompt).endswith(passkey.QUESTION)
  no_bos = types.SimpleNamespace(encode=tok.encode, bos_id=-1, eos_id=tok.eos_id)
  prompt, _ = passkey.example(no_bos, 200, 0.5, 12345)  # a Hugging Face tokenizer without bos
  assert prompt[0] == tok.eos_id and min(prompt) >= 0 and abs(len(prompt) - 200) <= 2
  # a tokenizer that puts a space before every text (Llama-2's tokenizer.json) encoded the key
  # alone as a lone space and the number, which greedy decoding never writes after "is"
  words = {}
  legacy = types.SimpleNamespace(bos_id=1, eos_id=2, encode=lambda text: [
      words.setdefault(w, len(words) + 3) for w in re.findall("▁[^▁]*", "▁" + text.replace(
          " ", "▁"))])
  assert passkey.example(legacy, 60, 0.5, 71432)[1] == [words["▁71432"]]
  # scoring's greedy flag is greedy decoding's answer: a key is found exactly when the model
  # writes it (here: its own greedy continuation, found; with one token changed, not)
  from transformer_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  from transformer_jax.inference import sampling  # pylint: disable=g-import-not-at-top
  config = config_lib.base.get_config()
  config.model.update(family="decoder", max_len=128)
  model = DecoderLM(_cfg(vocab_size=tok.vocab_size, max_len=128, init_std=0.3, num_layers=2))
  params = _init(model)
  lm = scoring.TextModel(config, params, tok, batch_size=2, model=model)
  prompts = [passkey.example(tok, n, 0.5, k)[0] for n, k in ((60, 12345), (90, 67890))]
  written = sampling.generate(model, params, prompts, 4, temperature=0.0)  # (left-padded)
  other = [w[:-1] + [(w[-1] + 1) % tok.vocab_size] for w in written]
  assert [g for _, g in lm.ids_loglikelihood(list(zip(prompts, written)))] == [True, True]
  assert [g for _, g in lm.ids_loglikelihood(list(zip(prompts, other)))] == [False, False]


def test_long_context_recipes_extend_the_context_by_rope_scaling_and_train():
  """configs/llama.py:SIZE_long: 8x the context, llama3 RoPE scaling from the original length,
  the sequence over 8 chips for the big sizes; tiny_long takes a training step on this CPU (one:
  a step of its 8 x 512 tokens takes ~1 s)."""
  for size in ("1b", "7b", "70b"):
    short = config_lib.load(f"{REPO}/configs/llama.py:{size}")
    config = config_lib.load(f"{REPO}/configs/llama.py:{size}_long")
    config_lib.validate(config, 64)
    assert config.data.seq_len == config.model.max_len == 8 * short.data.seq_len
    assert config.model.rope_original_max_len == short.data.seq_len
    assert (config.model.rope_scaling, config.mesh.sequence) == ("llama3", 8)
  config = config_lib.load(f"{REPO}/configs/llama.py:tiny_long")
  config_lib.validate(config, 1)
  trainer = Trainer(config, sharding.make_mesh(config, jax.devices()[:1]))
  state = trainer.init_state(0)
  batch = synthetic_batch(config, trainer.model, seed=0)
  state, m = trainer.train_step(state, trainer.put_batch(batch), jax.random.key(0))
  assert np.isfinite(float(m["loss"])) and int(state.step) == 1


def test_a_sequence_axis_from_dcn_or_a_fill_is_checked_as_mesh_sequence():
  """mesh.dcn_sequence=2, or mesh.sequence=-1 filling 4 devices, is ring attention too: sparse
  patterns and a prefix LM are refused (they attended densely, and to the future)."""
  sparse = ["model.attention_window=8", "model.global_tokens=2"]
  for mesh, devices in ((["mesh.dcn_sequence=2"], None), (["mesh.data=1", "mesh.sequence=-1"], 4)):
    config = config_lib.load("configs/gpt2.py:tiny", mesh + sparse)
    with pytest.raises(ConfigError, match=r"^a sequence axis of (2|4) .* cannot serve "
                                          r"model.global_tokens"):
      config_lib.validate(config, devices)
    prefix = config_lib.load("configs/gpt2.py:tiny", mesh + ["data.objective=prefix_lm"])
    with pytest.raises(ConfigError, match=r"cannot serve data.objective=prefix_lm"):
      objectives.check(prefix, sequence=config_lib.sequence_size(prefix.mesh, devices))
  # and the model itself, called without the Trainer's check
  model, tokens = DecoderLM(model_config()), jnp.ones((2, 16), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens)
  config = config_lib.load("configs/gpt2.py:tiny", ["mesh.data=2", "mesh.sequence=4"])
  mesh = sharding.make_mesh(config, jax.devices()[:8])
  with sharding.context(mesh, sharding.rules(config)), pytest.raises(
      ConfigError, match=r"^a prefix LM cannot run with a "):
    jax.eval_shape(lambda p: model.apply(p, tokens, prefix_BT=tokens), params)


@pytest.mark.parametrize("override, message", [
    ("mesh.sequence=3", "data.seq_len=64 must be a multiple of twice the sequence axis, 6"),
    ("model.global_tokens=2", "add to a sliding window: set model.attention_window > 0"),
    ("model.window_pattern=LX", "model.window_pattern='LX': letters L"),
    ("model.window_pattern=LG", "with a model.attention_window > 0"),
    ("model.rope_scaling=yarn", "needs model.position=rotary"),
    ("model.rope_scaling=ntk", "model.rope_scaling='ntk' is not one of"),
    ("model.attention_window=-1", "model.attention_window must be >= 0"),
    ("model.position=rotary model.attention_window=4 model.random_blocks=1 model.max_len=32",
     "model.random_blocks are drawn over model.max_len=32's blocks in scoring and generation, "
     "over data.seq_len=64's in training"),  # (its eval and generation: other blocks, silently)
])
def test_bad_long_context_keys_are_one_line_errors(override, message):
  config = config_lib.load("configs/gpt2.py:tiny", override.split())
  with pytest.raises(ConfigError, match=re.escape(message)) as e:
    config_lib.validate(config)
  assert "\n" not in str(e.value)


def test_prefix_lm_generation_keeps_bidirectional_blocks_and_lengths_are_checked():
  """A prefix LM's one-token steps run as the prefix LM (BigBird's bidirectional random-block
  table, as the full forward with the prompt as prefix); generation past learned positions, or a
  prefix LM's random blocks past max_len, is refused (NaN logits read as token 0, or tables no
  full forward pass draws)."""
  from transformer_jax.inference import beam, sampling  # pylint: disable=g-import-not-at-top
  cfg = _cfg(attention_window=2, random_blocks=2, block_size=2, max_len=32, init_std=0.3,
             num_layers=2)  # (two layers: each draws its own random blocks)
  model = DecoderLM(cfg)
  params = _init(model)
  apply = jax.jit(model.apply)
  for length in (5, 11, 23):  # (23 + 10 reads all 32 positions: the cache's blocks are max_len's)
    prompt = np.random.default_rng(length).integers(3, 97, length).tolist()
    new = sampling.generate(model, params, [prompt], 10, temperature=0.0, prefix=True)[0]
    row = list(prompt)
    for _ in range(10):  # full passes over rows padded to 32 (segment 0): one compile
      n = len(row)
      pad = lambda values, n=n: jnp.asarray([list(values) + [0] * (32 - n)])
      logits = apply({"params": params}, pad(row), pad([1] * n), pad(range(n)),
                     prefix_BT=pad([1] * length + [0] * (n - length)))
      row.append(int(jnp.argmax(logits[0, n - 1])))
    assert new == row[length:], length
  with pytest.raises(ConfigError, match="past model.max_len=32 .prefix LM random blocks"):
    sampling.generate(model, params, [[5] * 30], 4, temperature=0.0, prefix=True)
  learned = DecoderLM(_cfg(max_len=16, position="learned", num_layers=2))
  params = _init(learned)
  # 14 + 3 tokens read 16 positions (the last pick is never fed), as transformers generates them
  # (full causal passes over the row padded to 16: what follows a position never reaches it)
  row, apply = [5] * 14, jax.jit(learned.apply)
  for _ in range(3):
    logits = apply({"params": params}, jnp.asarray([row + [0] * (16 - len(row))]))
    row.append(int(jnp.argmax(logits[0, len(row) - 1])))
  assert sampling.generate(learned, params, [[5] * 14], 3, temperature=0.0) == [row[14:]]
  with pytest.raises(ConfigError, match="reads 17 positions, past model.max_len=16 .learned "):
    sampling.generate(learned, params, [[5] * 14], 4, temperature=0.0)
  seq2seq = families.build_model(config_lib.load(f"{REPO}/configs/transformer.py:tiny",
                                                 ["model.position=learned", "model.max_len=16"]))
  with pytest.raises(ConfigError, match="learned positions"):
    beam.beam_search(seq2seq, {}, [[5] * 8], beam_size=2, max_len=20, start_id=1, eos_id=2)


def test_a_decoder_with_relative_positions_has_t5s_bias_and_caches_it():
  """model.position=relative in a decoder-only model: its stack's T5 bias table (the model had
  no position signal at all), causal buckets, and the KV cache gives the full pass's logits."""
  cfg = _cfg(position="relative", init_std=0.3, num_layers=2)
  model = DecoderLM(cfg)
  params = _init(model)
  assert params["relative_bias"].shape == (cfg.relative_buckets, cfg.num_heads)
  tokens = jnp.asarray([[5, 6, 7, 5, 6, 7, 5, 9, 11, 12]])
  full = assert_kv_cache_matches(model, params, tokens, prefill=3)
  flat = {**params, "relative_bias": jnp.zeros_like(params["relative_bias"])}
  flat_logits = jax.jit(model.apply)({"params": flat}, tokens)
  assert float(jnp.max(jnp.abs(flat_logits - full))) > 1e-3
