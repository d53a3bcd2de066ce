"""A run's data position in its checkpoints: one JSON file per logical data shard, beside the
train state (checkpoint.py saves and restores it as the item "data")."""

import dataclasses
import hashlib
import json
import re
from typing import Any

import grain
import orbax.checkpoint as ocp

from transformer_jax.config import ConfigError


ORDER_MARK = "order_seed"  # in a data position file: "hashed", or "raw" (the order from before)
ROWS_MARK = "rows"  # in a data position file: the pipeline's ROWS_VERSION that wrote it
DIGEST_MARK = "sha256"  # in a data position file: of its other keys (none before: not checked)


def _digest(saved: dict) -> str:
  return hashlib.sha256(json.dumps({k: v for k, v in saved.items() if k != DIGEST_MARK},
                                   sort_keys=True).encode()).hexdigest()


class DataHandler(grain.checkpoint.CheckpointHandler):
  """The data position as one JSON file per logical data shard (`shard-K-of-S.json`), written by
  the first process that reads shard K. Any set of processes that reads all S shards restores
  it, whatever their number; a different S is refused. Checkpoints from before data shards
  (grain's `process_I-of-N.json`, one process per shard) still restore, and a file without
  ORDER_MARK (grain's state alone, from before the hashed order seeds) restores into the order
  it indexes. Every file says its order and the rows version it was read with
  (pipeline.ROWS_VERSION; a file with the mark and without the version: 1)."""

  def save(self, directory, item=None, args=None):
    del item
    for k, state in args.states.items():
      state = json.loads(json.dumps({ORDER_MARK: "raw" if args.legacy_order else "hashed",
                                     ROWS_MARK: args.rows, "grain": state}))
      state[DIGEST_MARK] = _digest(state)
      (directory / f"shard-{k}-of-{args.num_shards}.json").write_text(json.dumps(state, indent=1))

  def restore(self, directory, item=None, args=None):
    del item
    it = args.item
    every = _read_whole(directory, it)
    states, legacy, versions = {}, False, set()
    for k in it.shards:
      saved = every[k]
      if isinstance(saved, dict) and ORDER_MARK in saved:
        legacy |= saved[ORDER_MARK] == "raw"
        versions.add(saved.get(ROWS_MARK, 1))
        saved = saved["grain"]
      else:  # written before the order seeds were hashed (pipeline._order_seed)
        legacy = True
        versions.add(None)
      states[str(k)] = saved
    rows = None if None in versions else max(versions - {it.rows_version}, default=it.rows_version)
    it.set_state(states, legacy_order=legacy, rows=rows)
    return it


def _read_whole(directory, it) -> dict:
  """{shard: its parsed position file} for ALL of the run's data shards, not only the shards
  this process reads: every process comes to the same verdict on a damaged file (one that saw
  none hung in the set-aside's barrier). A missing or unparsable file beside others of the
  run's shard count (or with none), or one whose checksum differs, is damage: OSError or
  ValueError, which sets the checkpoint aside; files of another count only are a ConfigError
  naming what resumes."""
  names = {p.name for p in directory.iterdir()}
  n = it.num_shards
  missing = [k for k in range(n)
             if f"shard-{k}-of-{n}.json" not in names and f"process_{k}-of-{n}.json" not in names]
  if not missing:  # (the pre-shard format: process_K-of-N.json)
    every = {}
    for k in range(n):
      name = f"shard-{k}-of-{n}.json" if f"shard-{k}-of-{n}.json" in names else \
          f"process_{k}-of-{n}.json"
      saved = every[k] = json.loads((directory / name).read_text())
      if isinstance(saved, dict) and DIGEST_MARK in saved and saved[DIGEST_MARK] != _digest(saved):
        raise ValueError(f"{directory}/{name} is not the one saved: its checksum differs")
    return every
  saved = sorted({m.group(1) for name in names
                  if (m := re.fullmatch(r"(?:shard-\d+|process_\d+)-of-(\d+)\.json", name))})
  if not saved or str(n) in saved:
    raise FileNotFoundError(f"{directory}/shard-{missing[0]}-of-{n}.json is missing")
  raise ConfigError(_shards_advice(saved, n, n // len(it.shards)))


def _shards_advice(saved: list, num_shards: int, readers: int) -> str:
  """Why a checkpoint's data position (saved with data.shards in `saved`) does not fit this run
  (`num_shards` shards, `readers` processes reading them), and what does."""
  said = (f"the checkpoint's data position was saved with data.shards={'/'.join(saved) or '?'}, "
          f"this run uses {num_shards}")
  if not saved or int(saved[0]) % readers == 0:
    return f"{said}: set --config.data.shards={saved[0] if saved else '...'} to resume exactly"
  fits = [n for n in range(1, int(saved[0]) + 1) if int(saved[0]) % n == 0]
  return (f"{said}, and its {readers} processes cannot read {saved[0]} shards whole: resume on "
          f"{' or '.join(map(str, fits))} processes (a data.shards set to a multiple of the "
          f"largest process count before the first step resumes on any of its divisors)")


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  states: dict[str, Any]  # shard -> grain state, only the shards this process writes
  num_shards: int
  legacy_order: bool = False  # a position in the order from before the hashed seeds ("raw")
  rows: int = 1  # the rows version the position indexes


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any  # a pipeline.ShardedBatches; restored in place


def data_save_args(iterator, writes=None) -> DataSave:
  """The iterator's position now (taken before an async save returns), for the shards in
  `writes` (default: all of this process's shards)."""
  state = iterator.get_state()
  writes = iterator.shards if writes is None else writes
  return DataSave({str(k): state[str(k)] for k in writes}, iterator.num_shards,
                  iterator.legacy_order, iterator.rows_version)
