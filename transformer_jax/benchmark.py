"""Time training steps after compilation:

  python -m transformer_jax.benchmark --config=configs/gpt2.py:bench_cpu --steps=10
      [--compare=hf[,hf_compile]] [--compile_only] [--rounds=3] [--baseline=KEY=VALUE;...]
      [--reference_ops=OP,...] [--config.KEY=VALUE ...]
      [--matmul_floor] [--grid="KEY=V1,V2;KEY2=V3,V4" [--grid_timeout=SECONDS]]
      [--moe [--moe_capacity=1.25]] [--profile [--profile_dir=DIR]]

Batches are random tokens of the config's shape (the input pipeline is not timed here;
--checkpoint also times async Orbax saves of the train state: save_block_s (how long the loop
is blocked), save_total_s, save_block_vs_step. --data_only times only the input pipeline: packed tokens/s of one process producing every row of
the global batch, JSON key data_tokens_per_s). The last
line printed is one JSON object: tokens_per_s, step_time_s (median), mfu, compile_s,
peak_memory_bytes, params.

--compare=hf[,hf_compile] also runs the same shapes as Hugging Face transformers' model of the
config's family + torch AdamW (clip 1.0), eager and/or under torch.compile (perf/peers.py: the
dtype policy, attention and optimizer kernels of each side), each in a worker process of its own,
interleaved with ours round by round so machine noise hits all alike; the JSON gains, per peer,
PEER_tokens_per_s, PEER_mfu (our formula), PEER_params, PEER_warmup_s and ratio_vs_PEER (ours /
theirs, medians); a peer that fails (e.g. out of memory beside ours) is dropped and its error
is PEER_error, so our own figures and profile still come out.

A baseline of our own step runs interleaved as well when asked for: --baseline="KEY=VALUE;..."
overrides config keys for it (e.g. "model.attention_chunks=1"), and --reference_ops=OP,... (or
`all`) traces it with those hand-differentiated ops (transformer_jax/models/ops.py) replaced by
their plain-autodiff formulas. The JSON gains baseline_step_time_s and speedup_vs_baseline.

--matmul_floor also times every matmul of the compiled step on its own (transformer_jax/perf/matmuls.py)
and prints them, largest total first; the JSON gains matmul_floor_s (their sum: the step time if
nothing but the matmuls ran, at the speed the matmul kernels reach alone), matmul_gflops (per
step) and other_s (step_time_s - matmul_floor_s). One device only (no mesh.cpu_devices).

--grid runs this same command once per combination of the listed config values (KEY=V1,V2,...
per axis, axes separated by `;`; values hold no `,` or `;`), each in a fresh process (its own
peak memory and compile; one that fails or runs out of memory is recorded and the grid goes on;
each gets --grid_timeout seconds, default 900). Every point's config is loaded and validated
before the first runs. It prints one line per point as it finishes, then a table fastest first,
and last one JSON object: grid (each point's overrides with its JSON, or its error) and best
(the fastest point's overrides). Exit code 1 if every point failed. E.g. the GPU sweep of
benchmarks/RESULTS.md: --grid="train.batch_size=4,8,16;model.remat=none,dots,full;
model.attention_impl=xla,cudnn".

--compile_only runs no step: it lowers (traces) and compiles the train step from abstract inputs,
once per round (and the --baseline config's, interleaved), and prints lower_s and compile_s
(medians over rounds) and temp_bytes (the compiled step's scratch memory per device, from XLA's
memory_analysis()), plus baseline_lower_s, baseline_compile_s, baseline_temp_bytes and
compile_ratio_vs_baseline.

--profile runs --steps more steps under JAX's profiler after the timed rounds and prints where
the device time of a step goes, by kernel class (matmul, attention, collective, copy, optimizer,
fusion, idle) and the top ops (transformer_jax/perf/profile.py); the JSON gains profile (that
breakdown, or {"error": ...} when the trace has no op of the step, e.g. a GPU without CUPTI).
The trace (for TensorBoard or XProf) is kept in --profile_dir if given (a gs:// one: written
locally, read, then uploaded).

--moe times an MoE config's step dropless, with capacity factor --moe_capacity and as the dense
model of the same active parameters, side by side (transformer_jax/perf/moe_bench.py).

Batches are random but of the config's objective's own shape (objectives.synthetic_batch), so
every family and objective is timed. JAX and the project's modules are imported inside the modes
that need them: the --grid parent only starts children, and the --compare worker runs PyTorch
alone, neither with JAX's memory or threads.
"""

import itertools
import json
import resource
import statistics
import subprocess
import sys
import time

from transformer_jax import cli
from transformer_jax.config import ConfigError


class JaxRunner:
  """Our jitted, sharded train step on random batches of the config's shape."""

  def __init__(self, config, reference_ops=()):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    from transformer_jax.models import ops  # pylint: disable=g-import-not-at-top
    from transformer_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
    from transformer_jax.perf import counting, hardware  # pylint: disable=g-import-not-at-top
    from transformer_jax.training import fit  # pylint: disable=g-import-not-at-top
    from transformer_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top
    from transformer_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
    distributed.use_cpu_devices(config.mesh.cpu_devices)
    config_lib.validate(config, jax.device_count())
    self.jax, self.config = jax, config
    self.trainer = Trainer(config, sharding.make_mesh(config))
    self.batches = 0
    t0 = time.perf_counter()
    self.state = self.trainer.init_state(config.seed)
    restore = ops.use_references(reference_ops)
    try:  # the step is traced (and compiled) here, so the swap only affects this runner
      fit.resolve(self.trainer)  # (train.microbatches=0, as training chooses: in compile_s)
      self._step()
    finally:
      restore()
    self.compile_s = time.perf_counter() - t0
    self.params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))
    self.flops_per_token = counting.for_config(config, self.trainer.model.cfg, self.state.params)
    self.peak, self.peak_source = hardware.peak_flops_per_device(
        self.trainer.model.cfg.compute_dtype, self.trainer.compiler_options, fresh=True)

  def remeasure_peak(self):
    """A measured (CPU) peak is re-taken every round and the best kept: one measurement can
    land in a slow moment of a shared machine and inflate MFU."""
    if self.peak_source.startswith("measured"):
      from transformer_jax.perf import hardware  # pylint: disable=g-import-not-at-top
      self.peak = max(self.peak, hardware.peak_flops_per_device(
          self.trainer.model.cfg.compute_dtype, self.trainer.compiler_options, fresh=True)[0])

  def next_batch(self):
    """A new random batch of the objective's shape, on the devices."""
    self.batches += 1
    import numpy as np  # pylint: disable=g-import-not-at-top
    from transformer_jax.data import objectives  # pylint: disable=g-import-not-at-top
    batch = objectives.synthetic_batch(self.trainer.objective, self.config.train.batch_size,
                                       self.config.model.vocab_size, self.batches)
    if self.trainer.mixture_size:  # a mixture's rows name their source, as the pipeline's do
      from transformer_jax.data import mixture  # pylint: disable=g-import-not-at-top
      rows, length = self.config.train.batch_size, max(v.shape[1] for v in batch.values())
      source = np.arange(rows, dtype=np.int32) % self.trainer.mixture_size  # (mixture.tag's)
      batch[mixture.SOURCE_KEY] = np.repeat(source[:, None], length, 1)
    return self.trainer.put_batch(batch)

  def run_step(self, batch):
    self.state, m = self.trainer.train_step(self.state, batch, self.jax.random.key(0))
    self.jax.block_until_ready(m)

  def _step(self):
    self.run_step(self.next_batch())

  def program_text(self) -> str:
    """The compiled train step's optimized HLO: jit's own cached executable (measured: 4 ms,
    no second compile)."""
    return self.trainer.lower_train_step().compile().as_text()

  def time_steps(self, n):
    """Each step's seconds; its batch is made and on the devices before the clock starts, as
    the Hugging Face peer's is (perf/peers.py)."""
    out = []
    for _ in range(n):
      batch = self.jax.block_until_ready(self.next_batch())
      t = time.perf_counter()
      self.run_step(batch)
      out.append(time.perf_counter() - t)
    return out


def _compile_times(config):
  """(lower_s, compile_s, temp_bytes) of the train step for `config`, from abstract inputs (no
  state); temp_bytes is XLA's memory_analysis() of the compiled step: its scratch (activations,
  gradients in flight) on one device, beside the arguments and outputs."""
  import jax  # pylint: disable=g-import-not-at-top
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import fit  # pylint: disable=g-import-not-at-top
  from transformer_jax.training.step import Trainer  # pylint: disable=g-import-not-at-top
  config_lib.validate(config, jax.device_count())
  trainer = Trainer(config, sharding.make_mesh(config))
  fit.resolve(trainer)  # train.microbatches=0: the count training would run, timed below
  t0 = time.perf_counter()
  lowered = trainer.lower_train_step()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  memory = compiled.memory_analysis()
  return t1 - t0, t2 - t1, getattr(memory, "temp_size_in_bytes", -1)


def _time_async_save(runner, rounds, step_s):
  """How long an async Orbax save of the train state blocks the loop (the call's return), next
  to the whole write (until it is committed), median over `rounds` saves to a temp dir."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  from transformer_jax.training import integrity  # pylint: disable=g-import-not-at-top
  ckpt_cfg = runner.config.checkpoint.copy_and_resolve_references()
  with ckpt_cfg.unlocked():
    ckpt_cfg.update(async_save=True, keep=2)
  block, total = [], []
  # (compiled before the first save, as training compiles them beside its first step)
  integrity.prepare(runner.trainer.abstract_state).join()
  with tempfile.TemporaryDirectory() as tmp:
    ckpts = checkpoint.Checkpoints(tmp, ckpt_cfg)
    for r in range(rounds):
      runner.time_steps(1)  # a fresh state to save, as in training
      t = time.perf_counter()
      ckpts.save(r + 1, runner.state, force=True)
      block.append(time.perf_counter() - t)
      ckpts.wait()
      total.append(time.perf_counter() - t)
      print(f"save {r}: blocked {block[-1]:.3f}s, written in {total[-1]:.3f}s", flush=True)
    ckpts.close()
  b = statistics.median(block)
  return {"save_block_s": round(b, 4), "save_total_s": round(statistics.median(total), 4),
          "save_block_vs_step": round(b / step_s, 3)}


def _data_only(config, steps, rounds):
  """Input-pipeline throughput of one process reading every row of the global batch: documents
  from the TFDS ArrayRecord source -> SentencePiece (unless data.pretokenize: ids read as written
  when the dataset was prepared) -> objective -> packing (data.packing) -> batches (with
  data.num_workers grain workers). No model, no device."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from transformer_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  pipeline.validate(config)
  it = pipeline.make_train_iterator(config)
  t0 = time.perf_counter()
  next(it)  # the first batch pays for preparing the corpus (once) and loading the tokenizer
  first_s = time.perf_counter() - t0
  rates, real = [], []
  for r in range(rounds):
    t, batches = time.perf_counter(), [next(it) for _ in range(steps)]
    dt = time.perf_counter() - t
    rows, length = batches[0][next(iter(batches[0]))].shape
    rates.append(steps * rows * length / dt)
    seg = [b.get("segment_ids", b.get("encoder_segment_ids")) for b in batches]
    real.append(float(np.mean([np.mean(s > 0) for s in seg])))
    print(f"round {r}: {rates[-1]:,.0f} packed tokens/s ({steps} batches in {dt:.2f}s)",
          flush=True)
  it.close()
  out = {"data_tokens_per_s": round(statistics.median(rates), 1),
         "non_padding_fraction": round(statistics.median(real), 4),
         "first_batch_s": round(first_s, 2), "rows": config.train.batch_size,
         "seq_len": config.data.seq_len, "objective": config.data.objective,
         "num_workers": config.data.num_workers, "pretokenize": config.data.pretokenize,
         "packing": config.data.packing}
  print(json.dumps(out))
  return out


def _compile_only(config, baseline_config, baseline_overrides, rounds):
  ours, ref = [], []
  for r in range(rounds):  # interleaved, so machine noise hits both alike
    ours.append(_compile_times(config))
    line = (f"round {r}: ours lower {ours[-1][0]:.2f}s compile {ours[-1][1]:.2f}s "
            f"temp {ours[-1][2] / 2**20:.1f} MiB")
    if baseline_config:
      ref.append(_compile_times(baseline_config))
      line += (f", baseline lower {ref[-1][0]:.2f}s compile {ref[-1][1]:.2f}s "
               f"temp {ref[-1][2] / 2**20:.1f} MiB")
    print(line, flush=True)
  med = lambda xs, i: round(statistics.median(x[i] for x in xs), 3)
  m = config.model
  out = {"lower_s": med(ours, 0), "compile_s": med(ours, 1), "temp_bytes": ours[-1][2],
         "num_layers": m.num_layers, "scan_layers": m.scan_layers, "remat": m.remat}
  if baseline_config:
    out.update(baseline=baseline_overrides, baseline_lower_s=med(ref, 0),
               baseline_compile_s=med(ref, 1), baseline_temp_bytes=ref[-1][2],
               compile_ratio_vs_baseline=round(med(ours, 1) / med(ref, 1), 3))
  print(json.dumps(out))


class Worker:
  """A peer (perf/peers.py) in a child process (`--worker=PEER`): same interface, answers over
  a pipe."""

  def __init__(self, kind, argv):
    args = [a for a in argv if a.startswith("--config")]
    self.kind = kind
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "transformer_jax.benchmark", f"--worker={kind}"] + args,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.ready = self._read()  # once built and warmed up: its parameters and warm-up time

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      raise ConfigError(f"benchmark worker exited with code {self.proc.wait()} (see above)")
    return json.loads(line)

  def time_steps(self, n):
    self.proc.stdin.write(f"{n}\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self):
    try:
      self.proc.stdin.close()
    except BrokenPipeError:  # it exited already
      pass
    self.proc.wait(timeout=60)


def _serve(kind, config):
  """Worker side: build the peer, then time `n` steps for each `n` read from stdin."""
  from transformer_jax.perf import peers  # pylint: disable=g-import-not-at-top
  runner = peers.runner(kind, config)
  print(json.dumps({"params": runner.params, "warmup_s": round(runner.warmup_s, 2)}), flush=True)
  for line in sys.stdin:
    times = runner.time_steps(int(line))
    runner.release()
    print(json.dumps(times), flush=True)


FLAGS = {"steps": 10, "rounds": 3, "compare": "", "baseline": "", "reference_ops": "",
         "worker": "", "compile_only": False, "data_only": False, "checkpoint": False,
         "matmul_floor": False, "grid": "", "grid_timeout": 900, "moe": False,
         "moe_capacity": 1.25, "profile": False, "profile_dir": ""}
# The flags each special mode reads (the others, given, would do nothing).
MODE_FLAGS = {"data_only": ("steps", "rounds"), "compile_only": ("baseline", "rounds"),
              "moe": ("steps", "rounds", "moe_capacity")}


def main(argv):
  spec, overrides, f = cli.parse(argv, FLAGS)
  if not spec:
    raise ConfigError("--config=FILE.py[:ARG] is required")
  for mode, used in MODE_FLAGS.items():
    idle = [f"--{k}" for k in FLAGS if f[k] != FLAGS[k] and k != mode and k not in used]
    if f[mode] and idle:
      raise ConfigError(f"{', '.join(idle)} do(es) nothing with --{mode} (it reads "
                        f"{', '.join('--' + k for k in used)})")
  for child, parent in (("profile_dir", "profile"), ("grid_timeout", "grid"),
                        ("moe_capacity", "moe")):
    if f[child] != FLAGS[child] and not f[parent]:
      raise ConfigError(f"--{child} does nothing without --{parent}")
  if f["steps"] < 1 or f["rounds"] < 1:
    raise ConfigError("--steps and --rounds must be >= 1")
  if f["profile_dir"]:  # (a file there was a profile "error" in the JSON, after the timings)
    cli.output_folder("profile_dir", f["profile_dir"])
  from transformer_jax.perf import peers  # pylint: disable=g-import-not-at-top
  f["compare"] = peers.check(f["compare"])
  if f["worker"]:
    peers.check(f["worker"])
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.models import ops  # pylint: disable=g-import-not-at-top
  config = config_lib.load(spec, overrides)
  if f["grid"]:
    if f["compile_only"] or f["data_only"] or f["worker"]:
      raise ConfigError("--grid times training steps: drop --compile_only / --data_only")
    return _grid(argv, _grid_points(spec, overrides, f["grid"]), f["grid_timeout"])
  if f["worker"]:
    return _serve(f["worker"], config)
  if f["moe"]:
    from transformer_jax.perf import moe_bench  # pylint: disable=g-import-not-at-top
    return moe_bench.main(JaxRunner, spec, overrides, f["steps"], f["rounds"], f["moe_capacity"])
  reference_ops = [o for o in f["reference_ops"].split(",") if o]
  if reference_ops == ["all"]:
    reference_ops = list(ops.REFERENCES)
  for name in reference_ops:
    if name not in ops.REFERENCES:
      raise ConfigError(f"--reference_ops: unknown op {name!r} (known: all, "
                        f"{', '.join(ops.REFERENCES)})")
  baseline_overrides = [o.strip() for o in f["baseline"].split(";") if o.strip()]
  if bad := [o for o in baseline_overrides if "=" not in o]:  # (it said: override '...')
    raise ConfigError(f"--baseline={f['baseline']}: {bad[0]!r} is not KEY=VALUE (the baseline "
                      f"is this config with the overrides \"KEY=VALUE;...\")")
  if f["data_only"]:
    return _data_only(config, f["steps"], f["rounds"])
  if f["compile_only"]:
    baseline_config = (config_lib.load(spec, overrides + baseline_overrides)
                       if baseline_overrides else None)
    return _compile_only(config, baseline_config, baseline_overrides, f["rounds"])
  if f["matmul_floor"] and config.mesh.cpu_devices > 1:
    raise ConfigError("--matmul_floor times one device's program: drop mesh.cpu_devices")
  if f["matmul_floor"]:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.default_backend() != "cpu":  # (a GPU's GEMMs are cuBLAS custom-calls, not dots)
      raise ConfigError(f"--matmul_floor reads XLA:CPU's dot instructions, not a "
                        f"{jax.default_backend()}'s matmul kernels: use --profile there")
  baseline = config_lib.load(spec, overrides + baseline_overrides) if (
      baseline_overrides or reference_ops) else None
  print(json.dumps(_time_training(config, baseline, f, argv, reference_ops, baseline_overrides)))


def _time_training(config, baseline_config, f, argv, reference_ops, baseline_overrides) -> dict:
  """The default mode: our train step (and a baseline's, and Hugging Face's with --compare)
  timed in interleaved rounds; the report's dict."""
  peers, failed = [], {}  # built first: they must not share our memory
  for kind in f["compare"]:
    try:
      peers.append(Worker(kind, argv))
    except (ConfigError, ValueError, OSError) as e:  # (e.g. out of memory): ours still count
      failed[kind] = str(e)
  ours = JaxRunner(config)
  if peers and ours.jax.device_count() > 1:
    for p in peers:
      p.close()
    raise ConfigError(f"--compare runs each peer on one device; this step runs on "
                      f"{ours.jax.device_count()}: compare on one (e.g. CUDA_VISIBLE_DEVICES=0, "
                      f"or without mesh.cpu_devices)")
  baseline = JaxRunner(baseline_config, reference_ops) if baseline_config else None
  ours_t, ref_t, theirs_t = [], [], {p.kind: [] for p in peers}
  for r in range(f["rounds"]):  # interleaved, so machine noise hits all alike
    ours_t += ours.time_steps(f["steps"])
    ours.remeasure_peak()
    line = f"round {r}: ours {statistics.median(ours_t):.4f}s/step"
    if baseline:
      ref_t += baseline.time_steps(f["steps"])
      line += f", baseline {statistics.median(ref_t):.4f}s/step"
    for p in list(peers):
      try:
        theirs_t[p.kind] += p.time_steps(f["steps"])
      except (ConfigError, ValueError, OSError) as e:  # a peer failing mid-run: dropped, said
        failed[p.kind] = str(e)
        peers.remove(p)
        p.close()
        continue
      line += f", {p.kind} {statistics.median(theirs_t[p.kind]):.4f}s/step"
    print(line, flush=True)
  for p in peers:
    p.close()
  tokens = config.train.batch_size * config.data.seq_len
  step = statistics.median(ours_t)
  tps = tokens / step
  out = {"tokens_per_s": round(tps, 1), "step_time_s": round(step, 5),
         "mfu": round(tps * ours.flops_per_token / (ours.peak * ours.jax.device_count()), 4),
         "compile_s": round(ours.compile_s, 2),
         "peak_memory_bytes": _peak_memory(ours.jax), "params": ours.params,
         "flops_per_token": ours.flops_per_token, "peak_source": ours.peak_source,
         "devices": ours.jax.device_count(), "dtype": config.model.dtype,
         "batch_size": config.train.batch_size, "seq_len": config.data.seq_len}
  if f["checkpoint"]:
    out.update(_time_async_save(ours, f["rounds"], step))
  if f["matmul_floor"]:
    out.update(_matmul_floor(ours, step))
  if f["profile"]:
    out["profile"] = _profile(ours, f["steps"], f["profile_dir"])
  out.update({f"{kind}_error": error for kind, error in failed.items()})
  for p in peers:  # the same MFU formula on both sides
    peer_tps = tokens / statistics.median(theirs_t[p.kind])
    out.update({f"{p.kind}_tokens_per_s": round(peer_tps, 1),
                f"{p.kind}_mfu": round(peer_tps * ours.flops_per_token / (
                    ours.peak * ours.jax.device_count()), 4),
                f"{p.kind}_params": p.ready["params"], f"{p.kind}_warmup_s": p.ready["warmup_s"],
                f"ratio_vs_{p.kind}": round(tps / peer_tps, 3)})
  if baseline:
    ref_step = statistics.median(ref_t)
    out.update(baseline=baseline_overrides, reference_ops=reference_ops,
               baseline_step_time_s=round(ref_step, 5),
               speedup_vs_baseline=round(ref_step / step, 3))
  return out


def _grid_points(spec, overrides, grid):
  """Every combination of --grid's values as override lists, each loaded and validated here,
  so that a bad key or value is one line before anything runs."""
  from transformer_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  axes = []
  for item in (x.strip() for x in grid.split(";")):
    key, sep, values = item.partition("=")
    values = [v.strip() for v in values.split(",") if v.strip()]
    if not (sep and key.strip() and values):
      raise ConfigError(f"--grid: {item!r} is not KEY=V1,V2,... (axes separated by ';')")
    if given := [o for o in overrides if o.partition("=")[0] == key.strip()]:
      raise ConfigError(f"--grid varies {key.strip()}, which --config.{given[0]} also sets: give "
                        "it in one place")
    axes.append([f"{key.strip()}={v}" for v in values])
  points = [list(p) for p in itertools.product(*axes)]
  for point in points:
    try:
      config_lib.validate(config_lib.load(spec, overrides + point))
    except ConfigError as e:
      raise ConfigError(f"--grid point {' '.join(point)}: {e}") from None
  return points


def _grid(argv, points, timeout_s):
  """Runs this command once per point in a child process; see the module doc."""
  if timeout_s <= 0:
    raise ConfigError(f"--grid_timeout must be > 0, got {timeout_s}")
  grid_flags = ("--grid=", "--grid_timeout=", "--grid-timeout=")
  base = [sys.executable, "-m", "transformer_jax.benchmark"] + [
      a for a in argv if not a.startswith(grid_flags)]
  results = []
  for i, point in enumerate(points):
    name = " ".join(point)
    try:
      proc = subprocess.run(base + [f"--config.{o}" for o in point], capture_output=True,
                            text=True, timeout=timeout_s)
      lines = proc.stdout.strip().splitlines()
      if proc.returncode == 0 and lines:
        result = {"overrides": point, **json.loads(lines[-1])}
      else:
        err = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        err = err[-1].removeprefix("error: ") if err else f"exit code {proc.returncode}"
        result = {"overrides": point, "error": err[:300]}
    except subprocess.TimeoutExpired:
      result = {"overrides": point, "error": f"timed out after {timeout_s} s"}
    results.append(result)
    print(f"[{i + 1}/{len(points)}] {name}: " + (
        f"failed: {result['error']}" if "error" in result else
        f"{result['tokens_per_s']:,.0f} tokens/s, step {result['step_time_s']:.4f} s, "
        f"MFU {result['mfu']:.3f}, peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB"),
          flush=True)
  done = sorted((r for r in results if "error" not in r), key=lambda r: -r["tokens_per_s"])
  print(f"{'tokens/s':>12} {'step s':>8} {'MFU':>6}  overrides")
  for r in done:
    print(f"{r['tokens_per_s']:12,.0f} {r['step_time_s']:8.4f} {r['mfu']:6.3f}  "
          f"{' '.join(r['overrides'])}")
  print(json.dumps({"grid": results, "best": done[0]["overrides"] if done else None}))
  if not done:
    sys.exit(1)


def _matmul_floor(runner, step_s):
  """Each matmul of the runner's compiled step timed alone; their sum against the step time."""
  from transformer_jax.perf import matmuls  # pylint: disable=g-import-not-at-top
  if runner.jax.device_count() > 1:
    raise ConfigError("--matmul_floor times one device's program; run it on one device")
  hlo = runner.program_text()
  try:
    timed = matmuls.time_dots(matmuls.dots(hlo), options=runner.trainer.compiler_options)
  except ValueError as e:
    raise ConfigError(f"--matmul_floor: {e}") from None
  timed.sort(key=lambda x: -x[1] * x[2])
  print(f"{'count':>5} {'ms each':>8} {'ms total':>9} {'GFLOP/s':>8}  dot")
  for dot, count, t in timed:
    print(f"{count:5d} {t * 1e3:8.2f} {count * t * 1e3:9.1f} {dot.flops / t / 1e9:8.1f}  "
          f"{dot.describe()}")
  floor = sum(count * t for _, count, t in timed)
  flops = sum(count * dot.flops for dot, count, _ in timed)
  return {"matmul_floor_s": round(floor, 4), "matmul_gflops": round(flops / 1e9, 2),
          "other_s": round(step_s - floor, 4)}


def _profile(runner, steps, trace_dir):
  """`steps` of the runner's steps under JAX's profiler, broken down by perf/profile.py. The
  trace is kept in `trace_dir` if given: a gs:// one's is written to a local folder, read there
  (the breakdown reads local files) and uploaded once read."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from transformer_jax.config import paths  # pylint: disable=g-import-not-at-top
  from transformer_jax.perf import profile  # pylint: disable=g-import-not-at-top
  hlo = runner.program_text()
  try:  # a failed profile (no CUPTI on a GPU, a profiler already running) loses no timings
    with paths.local_folder(trace_dir) if trace_dir else tempfile.TemporaryDirectory() as where:
      runner.jax.profiler.start_trace(where)
      try:
        for i in range(steps):
          batch = runner.next_batch()  # made and copied to the devices outside the step's span
          with runner.jax.profiler.StepTraceAnnotation(profile.STEP, step_num=i):
            runner.run_step(batch)
      finally:
        runner.jax.profiler.stop_trace()
      report = profile.summarize(where, hlo)
  except Exception as e:  # pylint: disable=broad-except
    print(f"profile: {type(e).__name__}: {e}", flush=True)
    return {"error": f"{type(e).__name__}: {e}"}
  print(profile.table(report), flush=True)
  return report


def _peak_memory(jax):
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: the process's peak RSS


if __name__ == "__main__":
  cli.entry(main, compile_cache=False)  # its figures include compile times
