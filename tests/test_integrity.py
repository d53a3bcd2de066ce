"""Checkpoint fingerprints (training/integrity.py): a checkpoint whose arrays changed on disk is
never loaded as if it were the one saved."""

import glob
import importlib
import json
import os
import shutil
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from orbax.checkpoint._src.serialization import replica_slices
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from transformer_jax import config as config_lib
from transformer_jax.config import ConfigError
from transformer_jax.training import checkpoint
from transformer_jax.training import integrity
from transformer_jax.training.checkpoint import Checkpoints

DTYPES = (np.float32, ml_dtypes.bfloat16, np.float16, np.int32, np.int8, np.uint8, np.uint32,
          np.bool_)


def _reference(a: np.ndarray) -> str:
  """The checksum, in numpy: the sum of the elements' mixed bits times their odd index weights,
  mod 2**32."""
  a = a.astype(np.uint8) if a.dtype == np.bool_ else a
  bits = a.reshape(-1).view(f"uint{8 * a.dtype.itemsize}").astype(np.uint32)
  for shift, factor in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
    bits = (bits ^ (bits >> shift)) * np.uint32(factor)
  bits = (bits ^ (bits >> 16)).astype(np.uint64)
  weights = (np.arange(bits.size, dtype=np.uint64) * 0x9E3779B1 % 2**32) | 1
  return f"{int(sum(int(v) for v in bits * weights % 2**32) % 2**32):08x}"


def _sum(a) -> str:
  return integrity.fingerprint({"x": jnp.asarray(a)})["x"].split()[-1]


def _random(rng, dtype, shape):
  if dtype == np.bool_:
    return rng.random(shape) < 0.5
  if np.dtype(dtype).kind in "iu":
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True, dtype=dtype)
  return (rng.standard_normal(shape) * 3).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_a_checksum_is_the_references_and_changes_with_any_one_element(dtype):
  rng = np.random.default_rng(0)
  for shape in [(), (7,), (3, 5, 2)]:
    a = _random(rng, dtype, shape)
    assert _sum(a) == _reference(a), shape
    bits = 8 * np.dtype(dtype).itemsize
    for _ in range(6):  # one bit of one element flipped (a bool: the element toggled)
      b = a.copy().reshape(-1)
      i = rng.integers(b.size)
      if dtype == np.bool_:
        b[i] = ~b[i]
      else:
        view = b.view(f"uint{bits}")
        view[i] ^= np.array(1 << int(rng.integers(bits))).astype(view.dtype)
      assert _sum(b.reshape(shape)) != _sum(a), (shape, i)
    flat = a.reshape(-1)
    if flat.size > 1:  # two unequal elements swapped
      i, j = next((i, j) for i in range(flat.size) for j in range(i + 1, flat.size)
                  if flat[i] != flat[j])
      b = flat.copy()
      b[[i, j]] = b[[j, i]]
      assert _sum(b.reshape(shape)) != _sum(a)


def test_a_fingerprint_does_not_depend_on_the_sharding_and_names_dtype_and_shape():
  mesh = jax.make_mesh((4, 2), ("a", "b"), devices=jax.devices()[:8])
  rng = np.random.default_rng(1)
  values = {"w": rng.standard_normal((8, 8)).astype(np.float32),
            "v": rng.standard_normal(16).astype(ml_dtypes.bfloat16),
            "n": np.arange(12, dtype=np.int32).reshape(3, 4)}
  one = integrity.fingerprint({k: jnp.asarray(v) for k, v in values.items()})
  assert one["w"] == f"float32[8, 8] {_reference(values['w'])}"
  assert one["v"].startswith("bfloat16[16] ") and one["n"].startswith("int32[3, 4] ")
  for specs in [dict(w=P("a", "b"), v=P("a"), n=P()), dict(w=P("b", "a"), v=P(("a", "b")),
                                                             n=P(None, "b"))]:
    sharded = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}
    assert integrity.fingerprint(sharded) == one, specs
  single = jax.make_mesh((1,), ("a",), devices=jax.devices()[:1])  # (one program over it too)
  assert integrity.fingerprint({k: jax.device_put(v, NamedSharding(single, P()))
                                for k, v in values.items()}) == one


def test_prepared_checksum_programs_are_the_ones_a_save_runs():
  """`prepare` compiles, in its thread, every program that fingerprinting arrays of those
  shardings, shapes and dtypes (made by a jit, as a train step makes them) runs: none is
  compiled after it, and the checksums are the reference's."""
  mesh = jax.make_mesh((2, 4), ("a", "b"), devices=jax.devices()[:8])
  shardings = {"w": NamedSharding(mesh, P("b", "a")), "m": NamedSharding(mesh, P(None, "a")),
               "k": NamedSharding(mesh, P()), "s": NamedSharding(mesh, P())}
  values = {"w": np.arange(24 * 6, dtype=np.float32).reshape(24, 6) / 3,
            "m": np.arange(10 * 14, dtype=np.float32).reshape(10, 14).astype(ml_dtypes.bfloat16),
            "k": np.asarray(jax.random.key_data(jax.random.key(3))),
            "s": np.asarray(7, np.int32)}
  made = jax.jit(lambda v: v, out_shardings=shardings)(values)
  made["k"] = jax.jit(jax.random.wrap_key_data, out_shardings=shardings["k"])(made["k"])
  integrity.prepare(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                sharding=x.sharding),
                                 made)).join(timeout=120)
  before = set(integrity._compiled)  # pylint: disable=protected-access
  got = integrity.fingerprint(made)
  assert set(integrity._compiled) == before  # pylint: disable=protected-access
  for name in ("w", "m", "s"):
    assert got[name].split()[-1] == _reference(values[name]), name
  assert got["k"].split()[-1] == _reference(values["k"])


def test_a_save_waiting_on_a_failed_prepared_compile_compiles_the_program_itself(monkeypatch):
  """The thread's compile fails (say, out of memory beside the first step's) while a save waits
  for it: the save compiles the program itself (it raised the thread's error)."""
  mesh_sums, lowered_in = integrity._mesh_sums, []  # pylint: disable=protected-access

  class Failing:  # (the thread's lowering fails after a while; the main thread's works)
    def __init__(self, jitted):
      self.jitted = jitted

    def lower(self, *args):
      lowered_in.append(threading.current_thread().name)
      if lowered_in[-1] == "checksum-compiles":
        time.sleep(0.5)
        raise RuntimeError("the thread's compile failed")
      return self.jitted.lower(*args)

  monkeypatch.setattr(integrity, "_compiled", {})
  monkeypatch.setattr(integrity, "_mesh_sums", lambda mesh, spec: Failing(mesh_sums(mesh, spec)))
  mesh = jax.make_mesh((2, 4), ("a", "b"), devices=jax.devices()[:8])
  x = jax.device_put(np.arange(64, dtype=np.float32).reshape(16, 4), NamedSharding(mesh, P("b")))
  thread = integrity.prepare({"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)})
  while not lowered_in:  # (the thread holds the program's entry: the save waits on it)
    time.sleep(0.01)
  assert integrity.fingerprint({"x": x})["x"].split()[-1] == _reference(np.asarray(x))
  thread.join(timeout=60)
  assert lowered_in == ["checksum-compiles", "MainThread"]


def _state(seed: float):
  """A small train state: dict params and optimizer state, a step."""
  w = np.arange(40 * 48, dtype=np.float32).reshape(40, 48) * seed
  return {"params": {"layer": {"kernel": jnp.asarray(w), "bias": jnp.full(48, seed)}},
          "opt_state": {"mu": jnp.asarray(w / 7)}, "step": jnp.asarray(int(seed), jnp.int32)}


def _abstract(state, dtype=None):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype,
                                                     sharding=x.sharding), state)


@pytest.fixture
def saved(tmp_path):
  """A workdir with checkpoints 5 and 10 of `_state(5.)`, `_state(10.)` (kept in a copy)."""
  ckpt = config_lib.base.get_config().checkpoint
  ckpt.async_save = False
  ckpts = Checkpoints(str(tmp_path / "w"), ckpt)
  for step in (5, 10):
    ckpts.save(step, _state(float(step)), force=True)
  ckpts.close()
  shutil.copytree(tmp_path / "w", tmp_path / "copy")
  return tmp_path / "w", ckpt


def test_a_replicated_array_under_a_mib_per_replica_is_written_whole_by_one(tmp_path,
                                                                              monkeypatch):
  """Orbax's replica-parallel save cut every replicated array into one eager slice per device
  (a program per shape and device, compiled at the first save): only arrays whose slices reach
  MIN_REPLICA_SLICE_BYTES are cut now. Both restore as saved; the arrays' metadata is kept."""
  data, cut = replica_slices.ReplicaSlice.data, []

  def spy(self):
    if self.slice_args is not None:
      cut.append(self.unsliced_data.shape)
    return data(self)

  monkeypatch.setattr(replica_slices.ReplicaSlice, "data", spy)
  replicated = NamedSharding(jax.make_mesh((4,), ("d",), devices=jax.devices()[:4]), P())
  rows = checkpoint.MIN_REPLICA_SLICE_BYTES * 4 // (4 * 256)  # 4 slices of 1 MiB exactly
  state = {"small": jnp.arange(40 * 48, dtype=jnp.float32).reshape(40, 48),
           "big": jnp.arange(rows * 256, dtype=jnp.float32).reshape(rows, 256)}
  state = jax.device_put(state, replicated)
  ckpt = config_lib.base.get_config().checkpoint
  ckpt.async_save = False
  ckpts = Checkpoints(str(tmp_path), ckpt)
  ckpts.save(1, state)
  assert cut == [(rows, 256)] * 4
  assert os.listdir(tmp_path / "checkpoints/1/state/array_metadatas")  # (as Orbax's own handler)
  step, restored = ckpts.restore(_abstract(state))
  assert step == 1
  for name in state:
    np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(state[name]))


def test_a_checkpoint_whose_arrays_changed_on_disk_is_set_aside_and_the_previous_restored(saved):
  workdir, ckpt = saved
  # checkpoint 10's arrays replaced by others of the same structure (a bad copy): read silently
  # before fingerprints
  shutil.rmtree(workdir / "checkpoints/10/state")
  shutil.copytree(workdir / "checkpoints/5/state", workdir / "checkpoints/10/state")
  abstract = _abstract(_state(1.))
  with pytest.raises(ConfigError, match=r"^checkpoint 10 in .* is unreadable \(ValueError: its "
                     r"array params/layer/bias is not the one saved: its checksum differs\); "
                     r"saved steps: 5, 10 \(a training run"):
    Checkpoints(str(workdir), ckpt, read_only=True).restore_params(abstract["params"])
  said = []
  ckpts = Checkpoints(str(workdir), ckpt)
  step, state = ckpts.restore(abstract, report=said.append)
  assert step == 5 and float(state["params"]["layer"]["bias"][0]) == 5.0
  assert len(said) == 1 and said[0].startswith("checkpoint 10 is unreadable (ValueError: its "
                                               "array opt_state/mu is not the one saved")
  assert os.listdir(workdir / "checkpoints_unreadable")[0].startswith("10-")


def test_a_flipped_byte_is_never_loaded_and_checkpoints_without_a_fingerprint_still_load(saved):
  workdir, ckpt = saved
  victim = max(glob.glob(f"{workdir}/checkpoints/10/state/ocdbt.process_0/d/*"),
               key=os.path.getsize)
  data = bytearray(open(victim, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(victim, "wb").write(data)
  said = []
  step, _ = Checkpoints(str(workdir), ckpt).restore(_abstract(_state(1.)), report=said.append)
  assert step == 5 and said[0].startswith("checkpoint 10 is unreadable")
  # a checkpoint saved before fingerprints (no record) loads; so does one read in another dtype
  # (Orbax casts: the record is not compared)
  copy = workdir.parent / "copy"
  meta = copy / "checkpoints/10/_CHECKPOINT_METADATA"
  record = json.loads(meta.read_text())
  assert set(record["custom_metadata"][integrity.KEY]) == {
      "params/layer/kernel", "params/layer/bias", "opt_state/mu", "step"}
  step, state = Checkpoints(str(copy), ckpt).restore(_abstract(_state(1.)))
  assert step == 10
  bf16 = _abstract(_state(1.))
  bf16["params"] = _abstract(bf16["params"], jnp.bfloat16)
  step, state = Checkpoints(str(copy), ckpt).restore(bf16)
  assert step == 10 and state["params"]["layer"]["bias"].dtype == jnp.bfloat16
  del record["custom_metadata"]
  meta.write_text(json.dumps(record))
  shutil.rmtree(copy / "checkpoints/10/state")
  shutil.copytree(copy / "checkpoints/5/state", copy / "checkpoints/10/state")
  step, state = Checkpoints(str(copy), ckpt).restore(_abstract(_state(1.)))
  assert step == 10 and float(state["params"]["layer"]["bias"][0]) == 5.0


def test_the_closed_event_loop_reports_of_a_failed_restore_are_dropped(monkeypatch):
  """Orbax's in-flight reads of a failed restore each reported "Event loop is closed" through
  sys.unraisablehook (~100 tracebacks), its un-awaited reads theirs when collected; others pass."""
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  checkpoint.drop_closed_loop_reports()
  checkpoint.drop_closed_loop_reports()  # (once: no chain of hooks)
  report = lambda e, o=None: types.SimpleNamespace(
      exc_type=type(e), exc_value=e, exc_traceback=None, err_msg=None, object=o)
  sys.unraisablehook(report(RuntimeError("Event loop is closed")))
  # a read that Orbax's failed restore never awaited (a coroutine of its code), collected
  ser = importlib.import_module("orbax.checkpoint._src.serialization.serialization")
  read = ser._read_array_index_and_device_put  # pylint: disable=protected-access
  sys.unraisablehook(report(ValueError("OUT_OF_RANGE: Error reading"),
                            types.SimpleNamespace(cr_code=read.__code__)))
  assert seen == []
  sys.unraisablehook(report(RuntimeError("another")))
  ours = types.SimpleNamespace(cr_code=report.__code__)
  sys.unraisablehook(report(ValueError("not orbax's"), ours))
  assert [str(r.exc_value) for r in seen] == ["another", "not orbax's"]
