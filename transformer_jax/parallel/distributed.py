"""Multi-process start-up: one `jax.distributed.initialize` call, from wherever the job runs.

Every process of a job runs the same command. How the processes find each other:
  explicit   TJAX_COORDINATOR=HOST:PORT, TJAX_NUM_PROCESSES=N, TJAX_PROCESS_ID=I (launch/local.sh
             sets these; `python -m transformer_jax.train` also takes them as flags, each flag
             in place of its variable)
  SLURM      a job step (srun) with more than one task: JAX reads SLURM_* itself. A process of
             an allocation outside any step (salloc's shell, an sbatch script's own commands)
             is a single process: nothing starts its peers, and JAX finds no step to join
  Cloud TPU  a TPU VM (/dev/accel* or /dev/vfio present): JAX reads the VM's metadata itself
  none       a single process (the default on a laptop)
TJAX_DISTRIBUTED=off (or no, 0, false; any case) skips all of it.
"""

import glob
import os

import jax
import numpy as np

from transformer_jax.config import ConfigError

ENV = ("TJAX_COORDINATOR", "TJAX_NUM_PROCESSES", "TJAX_PROCESS_ID")
HEARTBEAT_TIMEOUT_S = 30  # a silent process is declared dead after this long (env TJAX_HEARTBEAT_TIMEOUT_S)
INIT_TIMEOUT_S = 120  # how long processes wait for each other at start-up


def _explicit(coordinator, num_processes, process_id):
  if not coordinator or ":" not in coordinator:
    raise ConfigError(f"coordinator {coordinator!r} must be HOST:PORT")
  try:
    n, i = int(num_processes), int(process_id)
  except (TypeError, ValueError):
    raise ConfigError(f"num_processes={num_processes!r} and process_id={process_id!r} must be "
                      "integers") from None
  if n < 1 or not 0 <= i < n:
    raise ConfigError(f"process_id={i} must be in [0, num_processes={n})")
  return {"coordinator_address": coordinator, "num_processes": n, "process_id": i}


# What JAX's SLURM detection (jax/_src/clusters/slurm_cluster.py) reads: SLURM_STEP_NODELIST
# exists inside a job step only (srun), not in an allocation's own shell or batch script.
SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")
OFF, ON = ("off", "no", "0", "false"), ("auto", "on", "yes", "1", "true", "")


def _switch(env) -> bool:
  """Whether TJAX_DISTRIBUTED lets a multi-process start happen (default auto)."""
  value = env.get("TJAX_DISTRIBUTED", "auto")
  if value.strip().lower() not in OFF + ON:
    raise ConfigError(f"TJAX_DISTRIBUTED={value!r} must be off (or no, 0, false) or auto")
  return value.strip().lower() not in OFF


def _merged(flags, env) -> list:
  """The explicit settings, each from its flag or else its TJAX_* variable ('' when neither);
  a flag and a variable that disagree are refused (one of them is stale)."""
  values = []
  for (flag, value, unset), name in zip(flags, ENV):
    given = str(value) if value != unset else ""
    if given and name in env and env[name] != given:
      raise ConfigError(f"--{flag}={given} and {name}={env[name]} disagree: drop one")
    values.append(given or env.get(name, ""))
  return values


def detect(coordinator="", num_processes=0, process_id=-1, environ=None):
  """The keyword arguments for jax.distributed.initialize, or None for a single process.
  Flags and TJAX_* variables (each flag in place of its variable) win over SLURM and Cloud
  TPU detection."""
  env = os.environ if environ is None else environ
  flags = (("coordinator", coordinator, ""), ("num_processes", num_processes, 0),
           ("process_id", process_id, -1))
  explicit = any(value != unset for _, value, unset in flags)
  if not _switch(env):
    if explicit:  # the flags were dropped: each process ran alone
      raise ConfigError(f"TJAX_DISTRIBUTED={env['TJAX_DISTRIBUTED']}, but --coordinator/"
                        "--num_processes/--process_id ask for a multi-process run: drop one or "
                        "the other")
    return None
  if explicit or any(k in env for k in ENV):
    values = _merged(flags, env)
    missing = [f"--{flag} (or {name})" for (flag, _, _), name, value in zip(flags, ENV, values)
               if value == ""]
    if missing:
      raise ConfigError(f"{', '.join(missing)} not set (an explicit multi-process run needs "
                        "all three)")
    return _explicit(*values)
  if all(k in env for k in SLURM_STEP) and env["SLURM_NTASKS"].isdigit() and int(
      env["SLURM_NTASKS"]) > 1:
    return {}
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return {}
  return None


def use_cpu_devices(count: int, environ=None):
  """Splits this host's CPU into `count` XLA devices (`mesh.cpu_devices`; 0 leaves XLA's
  default). Must run before JAX starts its backends; other platforms ignore it. In a job that
  launch/local.sh started with --devices-per-process M (TJAX_CPU_DEVICES_PER_PROCESS), a
  config's other count is refused: it would win over M unsaid."""
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    raise ConfigError(f"mesh.cpu_devices must be an int >= 0, got {count!r}")
  launched = (os.environ if environ is None else environ).get("TJAX_CPU_DEVICES_PER_PROCESS")
  if count and launched and count != int(launched):
    raise ConfigError(f"mesh.cpu_devices={count} and launch/local.sh's --devices-per-process "
                      f"{launched} disagree (each process would get {count} devices); give one")
  if count:
    jax.config.update("jax_num_cpu_devices", int(count))


_JOB = {"processes": 1}  # this process's job, as initialize() started it


def processes() -> int:
  """How many processes this process's job has (1 until initialize() starts a larger one)."""
  return _JOB["processes"]


def initialize(coordinator="", num_processes=0, process_id=-1):
  """Starts JAX's distributed runtime when the job has several processes; returns
  (process_index, process_count). CPU processes talk over gloo (loopback or TCP)."""
  kwargs = detect(coordinator, num_processes, process_id)
  if kwargs is None:
    return 0, 1
  if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs, initialization_timeout=INIT_TIMEOUT_S,
                             heartbeat_timeout_seconds=int(os.environ.get(
                                 "TJAX_HEARTBEAT_TIMEOUT_S", HEARTBEAT_TIMEOUT_S)))
  _JOB["processes"] = jax.process_count()
  return jax.process_index(), jax.process_count()


def batch_rows(batch_sharding, batch_size: int, seq_len: int) -> dict:
  """{process index: (start, stop)}: the rows of each global batch that a process's devices
  hold, hence the rows it must read. Processes that hold the same rows (the batch replicated
  over a model axis that spans hosts) read the same data."""
  spans = {}
  for device, index in batch_sharding.devices_indices_map((batch_size, seq_len)).items():
    start, stop, _ = index[0].indices(batch_size)
    spans.setdefault(device.process_index, set()).add((start, stop))
  rows = {}
  for p, parts in spans.items():
    start, stop = min(a for a, _ in parts), max(b for _, b in parts)
    if sum(b - a for a, b in parts) != stop - start:
      raise ConfigError(f"the mesh gives process {p} batch rows {sorted(parts)}, which are not "
                        "contiguous; order the mesh's batch axes over hosts first")
    rows[p] = (start, stop)
  return rows


def data_writers(rows: dict, process: int) -> bool:
  """Whether `process` writes the data position of the shards it reads: only the first process
  reading a given range of rows does."""
  return all(rows[q] != rows[process] for q in rows if q < process)


def fetch(x):
  """The whole value of a jax.Array as numpy on every process, also where it spans processes
  (np.asarray cannot fetch the shards other hosts hold)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)
