"""The cost of a compiled train step: its fit in HBM (memory analysis, or XLA's out-of-memory
message), its FLOPs, HBM bytes and collectives per chip, and a roofline step time from them.
Importing it does not import jax (see hardware.py)."""

import copy
import math
import re

from transformer_jax import config as config_lib
from transformer_jax.perf import collectives
from transformer_jax.perf import topology
from transformer_jax.perf.hardware import Chip


def argument_bytes_per_chip(abstract_state_leaves) -> int:
  """Train state bytes on one chip, from its leaves' shardings (the donated state's outputs reuse
  these buffers; the batch's few MB are left out)."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
             for leaf in abstract_state_leaves)


_UNITS = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def parse_oom(message: str, argument_bytes: int):
  """(bytes needed per chip, bytes available) from XLA:TPU's out-of-memory message, or Nones.
  'HLO temporaries (X) exceeds available HBM (Y)' counts temporaries only: the arguments are
  added; 'Used X of Y hbm' is the total."""
  num = r"([\d.]+)([KMGT])?B?"
  m = re.search(rf"temporaries \({num}\) exceeds available HBM \({num}\)", message)
  if m:
    return (float(m.group(1)) * _UNITS.get(m.group(2), 1) + argument_bytes,
            float(m.group(3)) * _UNITS.get(m.group(4), 1))
  m = re.search(rf"Used {num} of {num} hbm", message)
  if m:
    return (float(m.group(1)) * _UNITS.get(m.group(2), 1),
            float(m.group(3)) * _UNITS.get(m.group(4), 1))
  return None, None


COLLECTIVES = collectives.KINDS
COSTS = ("flops", "bytes", "ici_s", "dcn_s", "ici_bytes", "dcn_bytes") + COLLECTIVES  # kinds: s
COMM = COSTS[2:]


def program_cost(compiled, devices, chip: Chip) -> dict:
  """Per-chip COSTS of a compiled program: FLOPs and HBM bytes accessed from XLA's cost analysis,
  and its collectives' seconds and bytes over ICI and DCN (perf/collectives.py)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0]
  if chip.ici_link_gbps:
    comm = collectives.link_time(collectives.collectives(compiled.as_text()), devices,
                                 chip.ici_link_gbps, chip.dcn_gbps, chip.wraps)
  else:  # no published link bandwidth (v4): not priced
    comm = dict.fromkeys(COSTS[2:6], 0.0) | {"by_kind_s": {}}
  return {"flops": float(analysis.get("flops", 0.0)),
          "bytes": float(analysis.get("bytes accessed", 0.0)),
          **{k: comm[k] for k in COSTS[2:6]},
          **{k: comm["by_kind_s"].get(k, 0.0) for k in COLLECTIVES}}


def step_cost(config, devices, compiled, chip: Chip, compile_probe) -> tuple[dict, str]:
  """(COSTS, how) per chip of one train step. XLA's cost analysis counts a loop body once, not
  once per iteration, so a microbatch scan's FLOPs and bytes are multiplied out here (which also
  counts the optimizer update that many times: a small excess); collectives.py counts each
  collective once per trip of its loops itself, so a gradient all-reduce inside the microbatch
  loop counts m times and one after it (each data shard summing its own microbatches first,
  training/step.py) once. A scanned layer stack (whose program's cost is no simple sum of its
  parts) is replaced by two more compiles (`compile_probe(config)` -> compiled program),
  unrolled with 1 and 2 layers and the same microbatches: cost(L) = c1 + (L - 1)(c2 - c1).
  A scanned stack whose layers' windows differ (model.window_pattern) gets each layer's window
  as a traced value and attends to every key under a mask: its probes are all-global layers
  (probes of its pattern's first two layers, static windows skipping key blocks, understated
  its FLOPs 37 % in one measured case: 6 layers LLLLLG, window 16, 1024 tokens). The loss-chunk
  scan (train.loss_chunk) is multiplied out too: _loss_chunks. `devices`: the mesh's devices in
  order (the programs' device ids index it)."""
  m, layers = config.train.microbatches, config.model.num_layers
  times = lambda cost: {k: m * v if k in ("flops", "bytes") else v for k, v in cost.items()}
  price = lambda probe: times(program_cost(compile_probe(probe), devices, chip))
  if not config.model.scan_layers:
    cost = times(program_cost(compiled, devices, chip))
    return (_loss_chunks(config, cost, price),
            "compiled program" + (f" x {m} microbatches" if m > 1 else ""))
  # (imported here: jax must not load before the AOT check loads its CUDA plugin, hardware.py)
  from transformer_jax.models import stack  # pylint: disable=g-import-not-at-top
  from transformer_jax.models.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  windows = stack.layer_windows(ModelConfig.from_config(config.model), layers)
  mixed = [("model.window_pattern", "G")] if len(set(windows)) > 1 else []
  unrolled = []
  for n in (1, 2):
    probe = copy.deepcopy(config)
    for key, value in [("model.num_layers", n), ("model.scan_layers", False)] + mixed:
      config_lib.set_value(probe, key, str(value))
    unrolled.append(probe)
  with topology.quiet_fd2():
    c1, c2 = map(price, unrolled)
    excess = _loss_chunks(unrolled[0], c1, price)  # (the same for any number of layers)
  comm = program_cost(compiled, devices, chip)  # the scanned program's own, trips counted
  cost = {k: comm[k] if k in COMM else c1[k] + (layers - 1) * (c2[k] - c1[k]) for k in COSTS}
  return ({k: v + excess[k] - c1[k] for k, v in cost.items()},
          "unrolled 1- and 2-layer compiles, extrapolated to all layers")


def _loss_chunks(config, cost: dict, price) -> dict:
  """`cost` (of `config`'s program, microbatches multiplied out) with its loss-chunk scan's body
  counted once per trip instead of once. The body's cost is priced by one more compile
  (`price(config)` -> cost) with chunks of C' = min(2C, tokens): body(C) = (cost(C') -
  cost(C)) / (C'/C - 1), the matmuls of a chunk being linear in its tokens; n = ceil(tokens / C)
  trips (a microbatch's tokens of the global batch, as training/step.py cuts them)."""
  from transformer_jax.data import objectives  # pylint: disable=g-import-not-at-top
  chunk = config.train.loss_chunk
  tokens = (config.train.batch_size // config.train.microbatches
            * (objectives.spec(config.data).target_len or config.data.seq_len))
  if not chunk or chunk >= tokens:
    return cost
  wider = min(2 * chunk, tokens)
  probe = copy.deepcopy(config)
  config_lib.set_value(probe, "train.loss_chunk", str(wider))
  body = {k: (v - cost[k]) / (wider / chunk - 1) for k, v in price(probe).items()}
  trips = -(-tokens // chunk)
  return {k: v + (trips - 1) * body[k] if k in ("flops", "bytes") else v for k, v in cost.items()}


def hbm(mem, capacity: float) -> dict:
  """The fit, from a compiled program's memory analysis. Peak HBM per chip = arguments + outputs
  - aliased + temporaries + code. The state is donated, so its outputs alias its arguments
  (counted once); temp_size is XLA's buffer assignment of every intermediate, already packed by
  liveness (the peak, not a sum); the executable itself also lives in HBM."""
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  return {"fits": total <= capacity, "hbm_per_chip_bytes": int(total),
          "hbm_breakdown": {"arguments": mem.argument_size_in_bytes,
                            "outputs": mem.output_size_in_bytes,
                            "aliased": mem.alias_size_in_bytes,
                            "temporaries": mem.temp_size_in_bytes,
                            "code": mem.generated_code_size_in_bytes}}


def estimate(cost: dict, model_flops: float, chips: int, chip: Chip, tokens: int) -> dict:
  """The roofline step time per chip, max(compute, HBM, communication), and what it implies.
  A chip does at least its share of the model's FLOPs; XLA's count can be lower (on v5e it
  reports 0.65-0.85x the model's for models that count 1.2x on v5p). Collectives are priced only
  where the chip's link bandwidths are published (not v4)."""
  flops_chip, bytes_chip = cost["flops"], cost["bytes"]
  compute_s = max(flops_chip, model_flops / chips) / (chip.peak_tflops * 1e12)
  memory_s = bytes_chip / (chip.hbm_gbps * 1e9)
  comm_s = cost["ici_s"] + cost["dcn_s"] if chip.ici_link_gbps else None
  terms = {"compute": compute_s, "memory": memory_s, "communication": comm_s or 0.0}
  bound = max(terms, key=terms.get)
  step_s = terms[bound]
  return dict(
      flops_per_step_per_chip=flops_chip, flops_per_step=flops_chip * chips,
      bytes_accessed_per_chip=bytes_chip, compute_time_s=compute_s, memory_time_s=memory_s,
      communication_time_s=comm_s,
      **{key: cost[k] if comm_s is not None else None for key, k in (
          ("ici_time_s", "ici_s"), ("dcn_time_s", "dcn_s"), ("ici_bytes_per_chip", "ici_bytes"),
          ("dcn_bytes_per_chip", "dcn_bytes"))},
      communication_by_kind_s={k: cost[k] for k in COLLECTIVES if cost[k]},
      step_time_estimate_s=step_s, bound=bound,
      tokens_per_s_estimate=tokens / step_s if step_s else None,
      mfu_estimate=model_flops / (step_s * chips * chip.peak_tflops * 1e12) if step_s else None,
      hardware_flops_ratio=flops_chip * chips / model_flops if model_flops else None)
